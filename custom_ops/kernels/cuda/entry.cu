// C entry points (gptq_cuda.h): validate sizes, pick a kernel, launch.
//
// Dispatch:
//   M <= 8                     -> GEMV (gemv.cu), memory-bound decode path
//   M > 8, T fp16/bf16, K % 8 == 0, A 16-byte aligned -> tensor cores (gemm_tc.cu)
//   otherwise (fp32, odd K)    -> SIMT tiles (gemm_simt.cu)
#include <atomic>
#include <cstdio>
#include <cstring>

#include "common.cuh"
#include "gptq_cuda.h"

namespace onnx_gptq_cuda {

int sm_count() {
  static std::atomic<int> cache[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 108;
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    count = 108;  // an A100's worth: only tunes split-K, never correctness
  }
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

namespace {

thread_local char g_last_launch_error[256] = "";

int launch_failed(cudaError_t err) {
  std::snprintf(g_last_launch_error, sizeof(g_last_launch_error), "%s: %s", cudaGetErrorName(err),
                cudaGetErrorString(err));
  return ONNX_GPTQ_ERR_LAUNCH;
}

template <typename T>
cudaError_t dispatch(const Problem& p, DType dtype) {
  if (p.M <= kGemvMaxM) return launch_gemv<T>(p);
  if constexpr (sizeof(T) == 2) {
    if (tc_supported(p, dtype)) return launch_gemm_tc<T>(p);
  }
  return launch_gemm_simt<T>(p);
}

__global__ void check_g_idx_kernel(const int32_t* g_idx, int64_t K, int64_t n_groups,
                                   unsigned long long* first_bad) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = g_idx[k];
    if (g < 0 || g >= n_groups) atomicMin(first_bad, static_cast<unsigned long long>(k));
  }
}

}  // namespace
}  // namespace onnx_gptq_cuda

using namespace onnx_gptq_cuda;

extern "C" {

int onnx_gptq_cuda_matmul(const void* A, const uint8_t* B, const void* scales, const uint8_t* zero_points,
                          const int32_t* g_idx, const void* bias, void* Y, int64_t M, int64_t K, int64_t N,
                          int bits, int64_t block_size, int64_t n_groups, int dtype, void* stream) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return ONNX_GPTQ_ERR_BITS;
  if (dtype < 0 || dtype > 2) return ONNX_GPTQ_ERR_DTYPE;
  // Bounds keep every derived size and index well inside int64 (and grid limits).
  constexpr int64_t kMaxDim = int64_t{1} << 31;
  if (M < 0 || K < 1 || N < 0 || M > 65535LL * 64 || K >= kMaxDim || N >= kMaxDim) return ONNX_GPTQ_ERR_SHAPE;
  if (block_size < 1 || block_size >= kMaxDim) return ONNX_GPTQ_ERR_BLOCK_SIZE;
  const int64_t n_blocks = (K + block_size - 1) / block_size;
  const int64_t blob_size = (block_size * bits + 7) / 8;
  if (n_groups < 1 || n_groups > K || (g_idx == nullptr && n_groups != n_blocks)) return ONNX_GPTQ_ERR_N_GROUPS;
  if (M == 0 || N == 0) return ONNX_GPTQ_OK;  // empty output: nothing to compute
  if (A == nullptr || B == nullptr || scales == nullptr || Y == nullptr) return ONNX_GPTQ_ERR_NULL_POINTER;

  Problem p{};
  p.A = A;
  p.B = B;
  p.scales = scales;
  p.zp = zero_points;
  p.g_idx = g_idx;
  p.bias = bias;
  p.Y = Y;
  p.M = M;
  p.K = K;
  p.N = N;
  p.bits = bits;
  p.block_size = block_size;
  p.n_groups = n_groups;
  p.n_blocks = n_blocks;
  p.blob_size = blob_size;
  p.row_bytes = n_blocks * blob_size;
  p.stream = static_cast<cudaStream_t>(stream);

  cudaError_t err;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: err = dispatch<float>(p, DType::kFloat32); break;
    case DType::kFloat16: err = dispatch<__half>(p, DType::kFloat16); break;
    default: err = dispatch<__nv_bfloat16>(p, DType::kBFloat16); break;
  }
  return err == cudaSuccess ? ONNX_GPTQ_OK : launch_failed(err);
}

int onnx_gptq_cuda_check_g_idx(const int32_t* g_idx, int64_t K, int64_t n_groups, int64_t* bad_column,
                               void* stream) {
  if (bad_column) *bad_column = -1;
  if (K < 1) return ONNX_GPTQ_ERR_SHAPE;
  if (n_groups < 1) return ONNX_GPTQ_ERR_N_GROUPS;
  if (g_idx == nullptr) return ONNX_GPTQ_ERR_NULL_POINTER;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Plain cudaMalloc (not the stream-ordered pool, which some devices lack):
  // this check runs once per g_idx tensor and synchronises anyway.
  unsigned long long* d_first = nullptr;
  cudaError_t err = cudaMalloc(&d_first, sizeof(*d_first));
  if (err != cudaSuccess) return launch_failed(err);
  unsigned long long h_first = ~0ull;
  err = cudaMemcpyAsync(d_first, &h_first, sizeof(h_first), cudaMemcpyHostToDevice, s);
  if (err == cudaSuccess) {
    const int64_t blocks = (K + 255) / 256 < 1024 ? (K + 255) / 256 : 1024;
    check_g_idx_kernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(g_idx, K, n_groups, d_first);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) err = cudaMemcpyAsync(&h_first, d_first, sizeof(h_first), cudaMemcpyDeviceToHost, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  const cudaError_t free_err = cudaFree(d_first);
  if (err == cudaSuccess) err = free_err;
  if (err != cudaSuccess) return launch_failed(err);
  if (h_first != ~0ull) {
    if (bad_column) *bad_column = static_cast<int64_t>(h_first);
    return ONNX_GPTQ_ERR_G_IDX;
  }
  return ONNX_GPTQ_OK;
}

const char* onnx_gptq_cuda_last_launch_error(void) { return g_last_launch_error; }

}  // extern "C"
