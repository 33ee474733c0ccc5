// SIMT fallback of GptqMatMul for M > 8 when the tensor-core path does not
// apply: float32 activations (kept in fp32 end to end, no fp16/bf16 rounding
// of A or W), K not a multiple of 8, or a misaligned A.
//
// Classic shared-memory tiling: CTA tile 64 x 64 x 16, 256 threads, 4 x 4
// outputs per thread. W tiles are dequantized element by element from the
// bit stream (dequant_generic), so every layout (g_idx, ragged or odd block
// sizes, 3-bit) takes the same code; each dequantized weight is reused by
// 64 rows of A.
#include "common.cuh"

namespace onnx_gptq_cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256, kPad = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_simt_kernel(const Problem p) {
  __shared__ __align__(16) float As[kBK][kBM + kPad];  // transposed: As[k][m]
  __shared__ __align__(16) float Ws[kBK][kBN + kPad];  // Ws[k][n]
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const T* __restrict__ A = static_cast<const T*>(p.A);

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
    for (int c = 0; c < kBM * kBK / kThreads; ++c) {
      const int idx = tid + c * kThreads;
      const int r = idx / kBK, kk = idx % kBK;
      const int64_t gm = m0 + r, gk = k0 + kk;
      As[kk][r] = (gm < p.M && gk < p.K) ? to_float<T>(A[gm * p.K + gk]) : 0.0f;
      const int64_t gn = n0 + r;
      Ws[kk][r] = (gn < p.N && gk < p.K) ? dequant_generic<T>(p, p.B + gn * p.row_bytes, gn, gk) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 w = *reinterpret_cast<const float4*>(&Ws[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }

  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ Y = static_cast<T*>(p.Y);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t gn = n0 + tx * 4 + j;
    if (gn >= p.N) continue;
    const float b = bias ? to_float<T>(bias[gn]) : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t gm = m0 + ty * 4 + i;
      if (gm < p.M) Y[gm * p.N + gn] = from_float<T>(acc[i][j] + b);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_gemm_simt(const Problem& p) {
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN), static_cast<unsigned>((p.M + kBM - 1) / kBM));
  gemm_simt_kernel<T><<<grid, kThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_gemm_simt<float>(const Problem&);
template cudaError_t launch_gemm_simt<__half>(const Problem&);
template cudaError_t launch_gemm_simt<__nv_bfloat16>(const Problem&);

}  // namespace onnx_gptq_cuda
