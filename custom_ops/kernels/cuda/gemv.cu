// GEMV path of GptqMatMul: M <= 8 rows of A (decode), memory-bound.
//
// Fast kernel (no g_idx, block_size % 32 == 0, B 16-byte aligned): then each
// packed row is one continuous bit stream and every run of 32 codes ("chunk",
// 4*bits bytes) lies in one group. A warp owns kRowsPerWarp output rows and a
// 1/ksplit share of K; lane i streams chunks i, i+32*ksplit, ... with one
// 128-bit (8-bit: two, 2-bit: one 64-bit, 3-bit: three 32-bit) streaming load
// per row, decodes the codes into float32 in registers and accumulates in
// float32; the ksplit warps of a row meet in shared memory at the end. Each A
// load and conversion serves kRowsPerWarp rows.
//
// Decoding without integer->float conversions (I2F is quarter rate):
// * exact (float32 T, and 8-bit codes): a code q in the low byte of the float
//   2**23 (bit pattern 0x4B000000; one PRMT) *is* the float 2**23 + q, and one
//   FADD of -(2**23 + zero_point) gives (q - zp) exactly; then one FFMA per row
//   of A. Per code and row: ~1.4 integer ops, 1 FADD, M FFMA.
// * offset (fp16/bf16 T, codes < 128): q in byte 2 under 0x3F gives exactly
//   f = 0.5 + q/256 (one PRMT), and sum_k a_k (q_k - zp)
//   = 256 * sum_k a_k f_k - (128 + zp) * sum_k a_k, with sum_k a_k shared by all
//   rows. This saves the FADD per code (the kernel is issue-bound otherwise)
//   at the price of ~2**-17 * sum_k |a_k| * scale of extra float32 rounding,
//   far below the fp16/bf16 rounding of the output.
// The scale is applied once per chunk: acc += scale * sum_k a_k (q_k - zp).
//
// Generic kernel (g_idx, odd block sizes, misaligned B): one warp per output
// row, lanes stride over K, each code read from the bit stream byte-wise.
#include "common.cuh"

namespace onnx_gptq_cuda {
namespace {

constexpr int kWarps = 8;         // warps per CTA
// Output rows per warp, sharing each A load: 4 for M <= 2; 2 for larger M,
// whose A registers (MT x 8 per lane) would otherwise cut occupancy.
__host__ __device__ constexpr int rows_per_warp(int mt) { return mt <= 2 ? 4 : 2; }
constexpr int kChunk = 32;        // codes per chunk
constexpr uint32_t kExactBits = 0x4B000000u;   // float 2**23; + code in byte 0 = 2**23 + q
constexpr float kExactF = 8388608.0f;
constexpr uint32_t kOffsetBits = 0x3F000000u;  // float 0.5; + code in byte 2 = 0.5 + q/256

// Byte `b` of x into byte 0 of 2**23 (bytes 1-2 zero, byte 3 0x4B): 2**23 + byte.
__device__ __forceinline__ float exact_float(uint32_t x, uint32_t b) {
  return __uint_as_float(__byte_perm(x, kExactBits, 0x7440u | b));
}
// Byte `b` (< 128) of x into byte 2 of 0.5 (bytes 0-1 zero, byte 3 0x3F): 0.5 + byte/256.
__device__ __forceinline__ float offset_float(uint32_t x, uint32_t b) {
  return __uint_as_float(__byte_perm(x, kOffsetBits, 0x7054u | (b << 8)));
}

// Packed bytes of one chunk (4*BITS bytes) as 32-bit words.
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint8_t* __restrict__ p, uint32_t (&w)[8]) {
  if constexpr (BITS == 4) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 v0 = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint4 v1 = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = v0.x; w[1] = v0.y; w[2] = v0.z; w[3] = v0.w;
    w[4] = v1.x; w[5] = v1.y; w[6] = v1.z; w[7] = v1.w;
  } else if constexpr (BITS == 2) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {  // 3 bits: 12 bytes, 4-byte aligned (chunk offsets are multiples of 12)
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
    w[0] = __ldcs(q); w[1] = __ldcs(q + 1); w[2] = __ldcs(q + 2);
  }
}

// Codes 8s .. 8s+7 of a chunk as floats: 2**23 + q (OFFSET false) or 0.5 + q/256 (OFFSET true).
template <int BITS, bool OFFSET>
__device__ __forceinline__ void decode8(const uint32_t (&w)[8], int s, float (&q)[8]) {
  static_assert(!(OFFSET && BITS == 8), "the offset encoding needs codes < 128");
  auto from_byte = [](uint32_t x, uint32_t b) { return OFFSET ? offset_float(x, b) : exact_float(x, b); };
  if constexpr (BITS == 4) {
    const uint32_t x = w[s];
    const uint32_t lo = x & 0x0F0F0F0Fu;         // codes 0, 2, 4, 6 in bytes 0..3
    const uint32_t hi = (x >> 4) & 0x0F0F0F0Fu;  // codes 1, 3, 5, 7
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = from_byte(lo, i);
      q[2 * i + 1] = from_byte(hi, i);
    }
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = from_byte(w[2 * s + i / 4], i % 4);
  } else if constexpr (BITS == 2) {
    const uint32_t x = w[s >> 1] >> (16 * (s & 1));  // 8 codes in the low 16 bits
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t t = (x >> (2 * j)) & 0x0303u;  // byte 0: code j, byte 1: code 4 + j
      q[j] = from_byte(t, 0);
      q[4 + j] = from_byte(t, 1);
    }
  } else {  // 3 bits: sub-chunk s is bits [24s, 24s + 24) of the 96-bit chunk
    uint32_t v;
    if (s == 0) v = w[0];
    else if (s == 1) v = __funnelshift_r(w[0], w[1], 24);
    else if (s == 2) v = __funnelshift_r(w[1], w[2], 16);
    else v = w[2] >> 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (OFFSET) {  // code i to bits 16..18
        const int sh = 3 * i - 16;
        const uint32_t t = sh >= 0 ? (v >> sh) : (v << -sh);
        q[i] = __uint_as_float((t & 0x70000u) | kOffsetBits);
      } else {
        q[i] = __uint_as_float(((v >> (3 * i)) & 7u) | kExactBits);
      }
    }
  }
}

// 8 consecutive elements of A starting at column k (zeros past K).
template <typename T>
__device__ __forceinline__ void load_a8(const T* __restrict__ a_row, int64_t k, int64_t K, bool a_vec,
                                        float (&a)[8]) {
  if (a_vec && k + 8 <= K) {
    if constexpr (sizeof(T) == 4) {
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(a_row + k));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(a_row + k) + 1);
      a[0] = v0.x; a[1] = v0.y; a[2] = v0.z; a[3] = v0.w;
      a[4] = v1.x; a[5] = v1.y; a[6] = v1.z; a[7] = v1.w;
    } else {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(a_row + k));
      const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_float<T>(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = (k + i < K) ? to_float<T>(a_row[k + i]) : 0.0f;
  }
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kWarps * 32)
gemv_fast_kernel(const Problem p, const int ksplit, const bool a_vec) {
  constexpr int kRowsPerWarp = rows_per_warp(MT);
  constexpr bool kOffset = sizeof(T) == 2 && BITS != 8;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row_groups = kWarps / ksplit;  // row groups per CTA
  const int rg = warp / ksplit;
  const int ks = warp % ksplit;
  const int64_t n_base = (static_cast<int64_t>(blockIdx.x) * row_groups + rg) * kRowsPerWarp;
  const int M = static_cast<int>(p.M);
  const T* __restrict__ A = static_cast<const T*>(p.A);
  const T* __restrict__ scales = static_cast<const T*>(p.scales);
  constexpr int kChunkBytes = 4 * BITS;
  const int n_chunks = static_cast<int>((p.K + kChunk - 1) / kChunk);
  const float default_zero = static_cast<float>(1 << (BITS - 1));

  // Row bases (clamped to row 0 past N: loaded, never stored).
  const uint8_t* row_ptr[kRowsPerWarp];
  int64_t row_group_base[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n_base + r < p.N ? n_base + r : 0;
    row_ptr[r] = p.B + n * p.row_bytes;
    row_group_base[r] = n * p.n_groups;
  }

  // Group of chunk c, tracked incrementally (no division in the loop):
  // c = g * chunks_per_group + rem.
  const int chunks_per_group = static_cast<int>(p.block_size / kChunk);
  const int step = ksplit * 32;
  const int step_g = step / chunks_per_group, step_rem = step % chunks_per_group;
  int c = ks * 32 + lane;
  int g = c / chunks_per_group, rem = c % chunks_per_group;

  float acc[MT][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.0f;

  for (; c < n_chunks; c += step) {
    const int64_t k0 = static_cast<int64_t>(c) * kChunk;
    uint32_t w[kRowsPerWarp][8];
    float scale[kRowsPerWarp], zero[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      load_chunk<BITS>(row_ptr[r] + static_cast<int64_t>(c) * kChunkBytes, w[r]);
      scale[r] = to_float<T>(scales[row_group_base[r] + g]);
      zero[r] = p.zp ? static_cast<float>(__ldg(p.zp + row_group_base[r] + g)) : default_zero;
    }
    float part[MT][kRowsPerWarp];  // sum_k a (q - zp) (exact) or sum_k a f (offset)
    float a_sum[MT];                // sum_k a (offset encoding only)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      a_sum[m] = 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) part[m][r] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < kChunk / 8; ++s) {
      float a[MT][8];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          load_a8<T>(A + static_cast<int64_t>(m) * p.K, k0 + 8 * s, p.K, a_vec, a[m]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) a[m][i] = 0.0f;
        }
        if constexpr (kOffset) {
#pragma unroll
          for (int i = 0; i < 8; ++i) a_sum[m] += a[m][i];
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float q[8];
        decode8<BITS, kOffset>(w[r], s, q);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          // exact: q - zp, computed exactly from 2**23 + q; offset: 0.5 + q/256 as is.
          const float d = kOffset ? q[i] : q[i] - (kExactF + zero[r]);
#pragma unroll
          for (int m = 0; m < MT; ++m) part[m][r] = fmaf(a[m][i], d, part[m][r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float dot = kOffset ? fmaf(256.0f, part[m][r], -(128.0f + zero[r]) * a_sum[m]) : part[m][r];
        acc[m][r] = fmaf(scale[r], dot, acc[m][r]);
      }
    }
    g += step_g;
    rem += step_rem;
    if (rem >= chunks_per_group) {
      rem -= chunks_per_group;
      ++g;
    }
  }

  __shared__ float red[kWarps][MT][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][m][r] = v;
    }
  __syncthreads();
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ Y = static_cast<T*>(p.Y);
  for (int idx = threadIdx.x; idx < row_groups * kRowsPerWarp * MT; idx += blockDim.x) {
    const int m = idx % MT;
    const int r = (idx / MT) % kRowsPerWarp;
    const int grp = idx / (MT * kRowsPerWarp);
    const int64_t n = (static_cast<int64_t>(blockIdx.x) * row_groups + grp) * kRowsPerWarp + r;
    if (m >= M || n >= p.N) continue;
    float v = 0.0f;
    for (int s = 0; s < ksplit; ++s) v += red[grp * ksplit + s][m][r];
    if (bias) v += to_float<T>(bias[n]);
    Y[static_cast<int64_t>(m) * p.N + n] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) gemv_generic_kernel(const Problem p) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= p.N) return;
  const int M = static_cast<int>(p.M);
  const T* __restrict__ A = static_cast<const T*>(p.A);
  const uint8_t* row = p.B + n * p.row_bytes;
  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.0f;
  for (int64_t k = lane; k < p.K; k += 32) {
    const float w = dequant_generic<T>(p, row, n, k);
#pragma unroll
    for (int m = 0; m < kGemvMaxM; ++m)
      if (m < M) acc[m] = fmaf(to_float<T>(A[m * p.K + k]), w, acc[m]);
  }
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ Y = static_cast<T*>(p.Y);
  const float b = bias ? to_float<T>(bias[n]) : 0.0f;
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) Y[m * p.N + n] = from_float<T>(v + b);
  }
}

// Enough warps to keep every SM streaming (~16 per SM), but at least one
// chunk per lane per warp.
int choose_ksplit(const Problem& p, int rows) {
  const int64_t row_warps = (p.N + rows - 1) / rows;
  const int64_t target = 16LL * sm_count();
  const int64_t n_chunks = (p.K + kChunk - 1) / kChunk;
  int ksplit = 1;
  while (ksplit < kWarps && row_warps * ksplit < target && n_chunks >= 2LL * 32 * ksplit) ksplit *= 2;
  return ksplit;
}

template <typename T, int BITS, int MT>
cudaError_t launch_fast(const Problem& p, bool a_vec) {
  constexpr int kRows = rows_per_warp(MT);
  const int ksplit = choose_ksplit(p, kRows);
  const int rows_per_cta = kRows * (kWarps / ksplit);
  const int64_t ctas = (p.N + rows_per_cta - 1) / rows_per_cta;
  gemv_fast_kernel<T, BITS, MT><<<static_cast<unsigned>(ctas), kWarps * 32, 0, p.stream>>>(p, ksplit, a_vec);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_fast_bits(const Problem& p, bool a_vec) {
  if (p.M <= 1) return launch_fast<T, BITS, 1>(p, a_vec);
  if (p.M <= 2) return launch_fast<T, BITS, 2>(p, a_vec);
  if (p.M <= 4) return launch_fast<T, BITS, 4>(p, a_vec);
  return launch_fast<T, BITS, 8>(p, a_vec);
}

}  // namespace

template <typename T>
cudaError_t launch_gemv(const Problem& p) {
  const bool fast = p.g_idx == nullptr && p.block_size % kChunk == 0 &&
                    (reinterpret_cast<uintptr_t>(p.B) % 16) == 0;
  if (fast) {
    // Vector loads of A need 16-byte aligned rows.
    const bool a_vec = (reinterpret_cast<uintptr_t>(p.A) % 16) == 0 &&
                       (p.K * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    switch (p.bits) {
      case 2: return launch_fast_bits<T, 2>(p, a_vec);
      case 3: return launch_fast_bits<T, 3>(p, a_vec);
      case 4: return launch_fast_bits<T, 4>(p, a_vec);
      case 8: return launch_fast_bits<T, 8>(p, a_vec);
      default: return cudaErrorInvalidValue;
    }
  }
  const int64_t ctas = (p.N + kWarps - 1) / kWarps;
  gemv_generic_kernel<T><<<static_cast<unsigned>(ctas), kWarps * 32, 0, p.stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_gemv<float>(const Problem&);
template cudaError_t launch_gemv<__half>(const Problem&);
template cudaError_t launch_gemv<__nv_bfloat16>(const Problem&);

}  // namespace onnx_gptq_cuda
