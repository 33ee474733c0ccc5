// Device helpers and launcher declarations shared by the GptqMatMul CUDA kernels.
//
// Layout reminder (docs/CUSTOM_OP.md): row n of B is n_blocks blobs of
// blob_size bytes; inside blob b, column k = b*block_size + j holds its code in
// bits [j*bits, (j+1)*bits) of the blob read as a little-endian bit stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace onnx_gptq_cuda {

// Everything a launcher needs, validated by the entry point (entry.cu).
struct Problem {
  const void* A;             // T [M, K]
  const uint8_t* B;          // uint8 [N, n_blocks, blob_size]
  const void* scales;        // T [N, n_groups]
  const uint8_t* zp;         // uint8 [N, n_groups] or nullptr
  const int32_t* g_idx;      // int32 [K] or nullptr
  const void* bias;          // T [N] or nullptr
  void* Y;                   // T [M, N]
  int64_t M, K, N;
  int bits;
  int64_t block_size, n_groups, n_blocks, blob_size, row_bytes;  // row_bytes = n_blocks * blob_size
  cudaStream_t stream;
};

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Code of column k in one packed row (any bits <= 8, any block size).
// Reads the second byte only when the code straddles a byte boundary, so it
// never touches a byte outside the code's own blob. K and block_size are
// < 2**31 (checked by the entry point), so the division is 32-bit.
__device__ __forceinline__ uint32_t read_code(const uint8_t* __restrict__ row, int64_t k, int bits,
                                              int64_t block_size, int64_t blob_size) {
  const uint32_t kk = static_cast<uint32_t>(k), bs = static_cast<uint32_t>(block_size);
  const uint32_t b = kk / bs;
  const int64_t bit = static_cast<int64_t>(kk - b * bs) * bits;
  const uint8_t* p = row + static_cast<int64_t>(b) * blob_size + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = __ldg(p);
  if (shift + bits > 8) v |= static_cast<uint32_t>(__ldg(p + 1)) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

// Dequantized weight W[n, k] in float32, exactly as QuantizedWeight.dequantize:
// (code - zp[n, g]) * scales[n, g]. An out-of-range g_idx entry gives NaN
// (and no out-of-bounds read), so a bad model shows up instead of reading garbage.
template <typename T>
__device__ __forceinline__ float dequant_generic(const Problem& p, const uint8_t* __restrict__ row,
                                                 int64_t n, int64_t k) {
  const int64_t g = p.g_idx ? static_cast<int64_t>(__ldg(p.g_idx + k))
                            : static_cast<int64_t>(static_cast<uint32_t>(k) / static_cast<uint32_t>(p.block_size));
  if (g < 0 || g >= p.n_groups) return __int_as_float(0x7fc00000);
  const uint32_t code = read_code(row, k, p.bits, p.block_size, p.blob_size);
  const float zero = p.zp ? static_cast<float>(__ldg(p.zp + n * p.n_groups + g))
                          : static_cast<float>(1 << (p.bits - 1));
  const float scale = to_float<T>(static_cast<const T*>(p.scales)[n * p.n_groups + g]);
  return (static_cast<float>(code) - zero) * scale;
}

// Launchers (host). Each returns cudaSuccess or the launch error.
// gemv.cu: M <= kGemvMaxM.
constexpr int kGemvMaxM = 8;
template <typename T> cudaError_t launch_gemv(const Problem& p);
// gemm_tc.cu: T = __half / __nv_bfloat16; requires tc_supported(p).
bool tc_supported(const Problem& p, DType dtype);
template <typename T> cudaError_t launch_gemm_tc(const Problem& p);
// gemm_simt.cu: any T, any shape (the fallback).
template <typename T> cudaError_t launch_gemm_simt(const Problem& p);

// Number of SMs of the current device (cached per device).
int sm_count();

}  // namespace onnx_gptq_cuda
