// Tensor-core path of GptqMatMul for larger M (prefill), T = fp16 or bf16.
//
// CTA tile 128 (M) x 128 (N) x 32 (K), 8 warps each owning 64 x 32 of the
// output as 4 x 2 WMMA m16n16k16 fragments with float32 accumulators.
// Per K tile:
//   * A [128 x 32] is copied global -> shared with cp.async (16-byte chunks,
//     zero-filled past M and K), double-buffered;
//   * W [128 x 32] is fetched into registers one tile ahead (raw packed bytes
//     plus the tile's scale/zero point per row on the fast layout), and after
//     the MMAs of the current tile it is dequantized in float32,
//     ((q - zp) * scale, rounded once to T) and stored to the other shared
//     buffer, so global latency of both operands hides behind the MMAs.
// fp32 activations do not come here: they take the SIMT kernel (gemm_simt.cu)
// so that fp32 models keep fp32 products.
//
// The fast W fetch needs no g_idx, block_size % 32 == 0 (a 32-column K tile
// then lies in one group) and a 16-byte aligned B; otherwise each weight is
// decoded from the bit stream on its own (dequant_generic), which is slower
// but handles g_idx and ragged/odd block sizes.
#include <mma.h>

#include "common.cuh"

namespace onnx_gptq_cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kThreads = 256;
constexpr int kLds = kBK + 8;             // padded smem row (halves): 80 bytes, spreads banks
constexpr int kWarpM = 64, kWarpN = 32;   // warp tile
constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
constexpr int kScratchLd = 20;            // epilogue scratch row (floats)
constexpr int kCodesPerThread = kBN * kBK / kThreads;  // 16: one row, half a K tile
static_assert(kCodesPerThread == 16, "W fetch mapping assumes 16 codes per thread");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: write zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats -> one 32-bit word of two T.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Registers holding one thread's share of the next W tile.
template <int BITS, bool FAST> struct WFetch;

// Fast layout: 16 consecutive codes = 2*BITS bytes of one row, one group.
template <int BITS> struct WFetch<BITS, true> {
  uint32_t w[4];
  float scale, zero;

  template <typename T>
  __device__ __forceinline__ void fetch(const Problem& p, int64_t n, int64_t k) {
    w[0] = w[1] = w[2] = w[3] = 0;
    scale = 0.0f;
    zero = 0.0f;
    if (n >= p.N || k >= p.K) return;
    // k is a multiple of 16; the bytes exist up to n_blocks * block_size >= k + 16.
    const uint8_t* src = p.B + n * p.row_bytes + k * BITS / 8;
    if constexpr (BITS == 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 4) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      w[0] = v.x; w[1] = v.y;
    } else if constexpr (BITS == 2) {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(src));
    } else {  // 3 bits: 6 bytes, 2-byte aligned
      const unsigned short* s16 = reinterpret_cast<const unsigned short*>(src);
      w[0] = static_cast<uint32_t>(__ldg(s16)) | (static_cast<uint32_t>(__ldg(s16 + 1)) << 16);
      w[1] = __ldg(s16 + 2);
    }
    const int64_t g = static_cast<uint32_t>(k) / static_cast<uint32_t>(p.block_size);  // K < 2**31
    const T* scales = static_cast<const T*>(p.scales);
    scale = to_float<T>(scales[n * p.n_groups + g]);
    zero = p.zp ? static_cast<float>(__ldg(p.zp + n * p.n_groups + g)) : static_cast<float>(1 << (BITS - 1));
  }

  __device__ __forceinline__ float value(int i) const {  // i: compile-time after unrolling
    uint32_t code;
    if constexpr (BITS == 3) {
      const uint64_t v = static_cast<uint64_t>(w[0]) | (static_cast<uint64_t>(w[1]) << 32);
      code = static_cast<uint32_t>(v >> (3 * i)) & 7u;
    } else {
      code = (w[(i * BITS) / 32] >> ((i * BITS) % 32)) & ((1u << BITS) - 1u);
    }
    return (static_cast<float>(code) - zero) * scale;
  }
};

// Any layout: the 16 dequantized weights themselves.
template <int BITS> struct WFetch<BITS, false> {
  float v[16];

  template <typename T>
  __device__ __forceinline__ void fetch(const Problem& p, int64_t n, int64_t k) {
    const uint8_t* row = p.B + (n < p.N ? n : 0) * p.row_bytes;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      v[i] = (n < p.N && k + i < p.K) ? dequant_generic<T>(p, row, n, k + i) : 0.0f;
  }
  __device__ __forceinline__ float value(int i) const { return v[i]; }
};

template <typename T, int BITS, bool FAST>
__global__ void __launch_bounds__(kThreads) gemm_tc_kernel(const Problem p) {
  __shared__ __align__(128) unsigned char smem[2 * 2 * kBM * kLds * sizeof(T)];
  T (*As)[kBM][kLds] = reinterpret_cast<T (*)[kBM][kLds]>(smem);
  T (*Ws)[kBN][kLds] = reinterpret_cast<T (*)[kBN][kLds]>(smem + 2 * kBM * kLds * sizeof(T));

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int warp_m = warp / (kBN / kWarpN), warp_n = warp % (kBN / kWarpN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const T* __restrict__ A = static_cast<const T*>(p.A);
  const int64_t n_tiles = (p.K + kBK - 1) / kBK;

  // A: 128 rows x 4 chunks of 8 elements; thread t copies chunks t and t + 256.
  auto load_a = [&](int stage, int64_t k0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int idx = tid + c * kThreads;
      const int row = idx >> 2, col = (idx & 3) * 8;
      const int64_t gm = m0 + row, gk = k0 + col;
      const bool valid = gm < p.M && gk < p.K;  // K % 8 == 0: a chunk is all in or all out
      cp_async16(&As[stage][row][col], valid ? A + gm * p.K + gk : A, valid);
    }
  };
  // W: thread t owns row t / 2, columns 16 * (t % 2) .. +15 of the tile.
  const int w_row = tid >> 1, w_col = (tid & 1) * 16;
  auto store_w = [&](int stage, const WFetch<BITS, FAST>& f) {
    uint32_t packed[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) packed[i] = pack2<T>(f.value(2 * i), f.value(2 * i + 1));
    uint4* dst = reinterpret_cast<uint4*>(&Ws[stage][w_row][w_col]);
    dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  WFetch<BITS, FAST> wf;
  load_a(0, 0);
  cp_async_commit();
  wf.template fetch<T>(p, n0 + w_row, w_col);
  store_w(0, wf);

  for (int64_t t = 0; t < n_tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    const bool has_next = t + 1 < n_tiles;
    if (has_next) {
      // The other stage was last read by the MMAs of tile t - 1, which every
      // warp finished before the barrier closing that iteration.
      load_a(stage ^ 1, (t + 1) * kBK);
      cp_async_commit();
      wf.template fetch<T>(p, n0 + w_row, (t + 1) * kBK + w_col);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // A and W of tile t visible to all warps
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
        wmma::load_matrix_sync(a_frag[i], &As[stage][warp_m * kWarpM + i * 16][kk], kLds);
#pragma unroll
      for (int j = 0; j < kFragN; ++j)
        wmma::load_matrix_sync(b_frag[j], &Ws[stage][warp_n * kWarpN + j * 16][kk], kLds);
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
    if (has_next) store_w(stage ^ 1, wf);
    __syncthreads();  // tile t fully consumed before its buffers are refilled
  }

  // Epilogue: each warp stages one 16x16 fragment at a time through its own
  // scratch (aliasing the A buffers, free after the last barrier), adds bias,
  // converts to T and stores with bounds checks.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * kScratchLd;
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ Y = static_cast<T*>(p.Y);
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], kScratchLd, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, c = e & 15;
        const int64_t gm = m0 + warp_m * kWarpM + i * 16 + r;
        const int64_t gn = n0 + warp_n * kWarpN + j * 16 + c;
        if (gm < p.M && gn < p.N) {
          const float b = bias ? to_float<T>(bias[gn]) : 0.0f;
          Y[gm * p.N + gn] = from_float<T>(scratch[r * kScratchLd + c] + b);
        }
      }
      __syncwarp();
    }
}
static_assert(16 * kScratchLd * 4 * 8 <= 2 * kBM * kLds * 2, "epilogue scratch must fit in the A buffers");

template <typename T, int BITS, bool FAST>
cudaError_t launch(const Problem& p) {
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN), static_cast<unsigned>((p.M + kBM - 1) / kBM));
  gemm_tc_kernel<T, BITS, FAST><<<grid, kThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool tc_supported(const Problem& p, DType dtype) {
  return dtype != DType::kFloat32 && p.K % 8 == 0 && (reinterpret_cast<uintptr_t>(p.A) % 16) == 0 &&
         (p.M + kBM - 1) / kBM <= 65535 && (p.N + kBN - 1) / kBN <= 0x7fffffff;
}

template <typename T>
cudaError_t launch_gemm_tc(const Problem& p) {
  const bool fast = p.g_idx == nullptr && p.block_size % kBK == 0 && (reinterpret_cast<uintptr_t>(p.B) % 16) == 0;
  if (!fast) return launch<T, 8, false>(p);  // BITS unused by the generic fetch
  switch (p.bits) {
    case 2: return launch<T, 2, true>(p);
    case 3: return launch<T, 3, true>(p);
    case 4: return launch<T, 4, true>(p);
    case 8: return launch<T, 8, true>(p);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t launch_gemm_tc<__half>(const Problem&);
template cudaError_t launch_gemm_tc<__nv_bfloat16>(const Problem&);

}  // namespace onnx_gptq_cuda
