// accuracy_level 4 of the CPU kernel: A quantized to int8 per block of K, int8
// dot products. Written once over an int8 traits type V8 (int8_simd_x86.h,
// int8_scalar.h) and compiled once per instruction set by isa_int8_*.cc.
// Include after defining GPTQ_ISA_NS and including the traits header; like
// kernel_impl.h, nothing here instantiates standard-library templates.
//
// The math
// --------
// Row m of A is cut into the weight's blocks of K (groups, with g_idx). Each
// block b gets sa = max|a| / 127 and q_k = round(a_k / sa) in [-127, 127].
// With the weight's scale s and zero point z of that block,
//   sum_k a_k s (c_k - z) ~= sa s sum_k q_k c_k  -  s z (sa sum_k q_k),
// where sum q_k c_k is an exact integer dot product; sa * sum q_k (`asq`) is
// kept per (row, block), so the zero point costs one dot product over blocks
// per output, not one per code. The only error against fp32 math is the
// rounding of A: |a_k - sa q_k| <= sa / 2.
//
// Layout (SIMD instruction sets)
// ------------------------------
// V8::Unpack<BITS> turns CB bytes of codes into S vectors of 32 byte-wide
// codes in a lane order that is cheap to unpack (V8::LanePosition says which
// code lands where); the activations of each chunk are stored in that same
// order, as kernel_impl.h does for fp32. A "unit" is max(blob, CB) bytes of a
// row's codes: either one block of `cpb` chunks, or one chunk holding `bpc`
// short blocks (block_size 32 at 4 bits: two blocks per 32-byte chunk). The
// int32 lanes of a dot product then belong to one block each (lane d to block
// d * bpc / 8), so each unit is scaled by one 8-lane multiply with no
// horizontal sums. Blocks that do not fill a unit (the last ones of a row when
// n_blocks % bpc != 0), and geometries the units cannot tile (block_size * bits
// not a multiple of 8, or blobs that neither divide nor are divided by CB),
// are computed in natural order by scalar code.
//
// Paths
// -----
// * M <= GemvRowLimit (4, or 6 for packed weights up to 1 MiB), blocks of
//   whole chunks: int8_gemv.h, codes straight from B in the GEMM path's
//   vectors, zero points inside the integer dot products.
// * Other M <= kInt8DirectRows: per tile of columns, unpack codes straight from B.
// * Larger M: tasks own a range of columns and a block of rows; each unpacks
//   a tile of columns once into scratch and reuses it for every row of its
//   block (so unpacking is amortised and the activations stay in L2).
// * g_idx: K is sorted by group once per call (activations quantized per
//   group in that order); each output column's codes are gathered into the
//   same order, then dotted group by group.

#include "kernel_common.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {
namespace int8 {

// Everything one call needs, shared read-only by its tasks.
struct Call {
  const GptqMatMulParams* p = nullptr;
  int64_t M = 0, K = 0, N = 0, bs = 0, n_blocks = 0, blob = 0, n_groups = 0;
  // Length of an activation row: K rounded up to whole chunks where SIMD units
  // read past K, never n_blocks * block_size (block_size may exceed K).
  int64_t Ka = 0;
  int bits = 0;
  // SIMD geometry (n_units = 0: everything in natural order by scalar code).
  int64_t unit_bytes = 0, unit_codes = 0, cpb = 1, bpc = 1, n_units = 0, simd_blocks = 0;
  int64_t last_cpb = 1;  // chunks of the last unit that reach below K
  bool gemm_short = false;  // GEMM path with blocks shorter than a chunk (int8_gemm.h)
  bool gemv = false;        // GEMV path (int8_gemv.h)
  int64_t gemv_unit = 0;    // GEMV path: codes per block in the activation rows
  int code_offset = 0;  // subtracted from codes by the SIMD dot product (V8::CodeOffset)
  const float* scales_f32 = nullptr;
  const uint16_t* scales_f16 = nullptr;
  const uint8_t* zp = nullptr;
  float zp_default = 0.0f;
  const int32_t* kperm = nullptr;   // [K] natural column -> position in the activation rows
  const int32_t* qstart = nullptr;  // [n_q + 1] quantization blocks (positions) with g_idx
  int64_t n_q = 0;                  // quantization blocks per row: n_blocks, or n_groups with g_idx
  int64_t sa_stride = 0;            // n_q + 8: rows of sa are read 8 lanes at a time
  int8_t* act = nullptr;            // [M][Ka] quantized activations
  float* sa = nullptr;              // [M][sa_stride] activation scale per block
  float* asq = nullptr;             // [M][n_q] sa * sum of q per block
  int32_t* qsum = nullptr;          // [M][n_q] sum of q per block (the GEMV path's zero points)
  float* Yf = nullptr;              // [M][N] fp32 result (Y itself when T is float32)
  const float* bias = nullptr;      // fp32 [N] or nullptr
  int64_t cols_per_task = 0, rows_per_block = 0, col_groups = 0, rows_per_task = 0;
  bool failed_alloc = false;

  float Scale(int64_t idx) const { return scales_f32 ? scales_f32[idx] : HalfToFloatScalar(scales_f16[idx]); }
  float Zero(int64_t idx) const { return zp ? float(zp[idx]) : zp_default; }
  const uint8_t* Blob(int64_t n, int64_t b) const { return p->B + (n * n_blocks + b) * blob; }
};

// Position of natural column k in the activation rows (no g_idx).
template <class V8, int BITS>
inline int64_t UnitPosition(const Call& c, int64_t k) {
  if (k / c.bs >= c.simd_blocks) return k;  // natural-order tail
  constexpr int64_t C = V8::template Codes<BITS>();
  const int64_t u = k / c.unit_codes;
  const int64_t q = k - u * c.unit_codes;
  const int64_t chunk = q / C;
  return u * c.unit_codes + chunk * C + V8::template LanePosition<BITS>(q - chunk * C);
}

// ------------------------------------------------------------------ activations

// Quantizes rows of A: per block, sa and q (written at kperm positions).
template <class V8>
void QuantizeTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  // [K] fp32 row (fp16 input), [K] fp32 row in group order (g_idx), [K] int8.
  const size_t floats = size_t(c.K + (c.qstart ? c.K : 0));
  float* row = static_cast<float*>(detail::ThreadScratch(detail::kScratchRow, floats * sizeof(float) + size_t(c.K)));
  if (!row) {
    c.failed_alloc = true;
    return;
  }
  float* sorted = row + c.K;
  int8_t* qrow = reinterpret_cast<int8_t*>(row + floats);
  const int64_t m0 = int64_t(task) * c.rows_per_task, m1 = MinI(c.M, m0 + c.rows_per_task);
  for (int64_t m = m0; m < m1; ++m) {
    const float* a = nullptr;
    if (c.p->dtype == DType::kFloat32) {
      a = static_cast<const float*>(c.p->A) + m * c.K;
    } else {
      V8::HalfToFloat(static_cast<const uint16_t*>(c.p->A) + m * c.K, row, c.K);
      a = row;
    }
    int8_t* dst = c.act + m * c.Ka;
    float* sa = c.sa + m * c.sa_stride;
    float* asq = c.asq + m * c.n_q;
    for (int64_t i = c.n_q; i < c.sa_stride; ++i) sa[i] = 0.0f;
    if (!c.qstart) {
      // Padding (positions no column maps to: the last chunk's, the GEMM
      // path's last block) must meet zero activations.
      for (int64_t i = 0; i < c.Ka; ++i) dst[i] = 0;
      for (int64_t b = 0; b < c.n_blocks; ++b) {
        const int64_t k0 = b * c.bs, len = MinI(c.bs, c.K - k0);
        int32_t qsum = 0;
        sa[b] = V8::QuantizeBlock(a + k0, len, qrow + k0, &qsum);
        asq[b] = sa[b] * float(qsum);
        c.qsum[m * c.n_q + b] = qsum;
      }
      for (int64_t k = 0; k < c.K; ++k) dst[c.kperm[k]] = qrow[k];
    } else {
      for (int64_t k = 0; k < c.K; ++k) sorted[c.kperm[k]] = a[k];
      for (int64_t g = 0; g < c.n_q; ++g) {
        const int64_t p0 = c.qstart[g], p1 = c.qstart[g + 1];
        int32_t qsum = 0;
        sa[g] = V8::QuantizeBlock(sorted + p0, p1 - p0, dst + p0, &qsum);
        asq[g] = sa[g] * float(qsum);
        c.qsum[m * c.n_q + g] = qsum;
      }
    }
  }
}

// ------------------------------------------------------------------ no g_idx

// Widest tile the direct path uses for R rows (registers: R x NB int32 and
// fp32 accumulators plus the unpacked codes).
template <int BITS, int R>
constexpr int DirectCols() {
  return R == 1 ? (BITS == 2 ? 2 : 4) : (R == 2 && BITS != 2 ? 2 : 1);
}

// Natural-order dot product of codes [q0, q1) of one block with activations.
inline int32_t TailDot(const uint8_t* blob, int64_t blob_size, int bits, const int8_t* act, int64_t q0, int64_t q1) {
  int32_t acc = 0;
  for (int64_t q = q0; q < q1; ++q) acc += int32_t(ExtractCode(blob, blob_size, bits, q)) * int32_t(act[q]);
  return acc;
}

// zs[j][b] = s z_eff of column n + j, block b, for j < nb: the zero points'
// share of every output is sum_b zs[j][b] asq[r][b]. z_eff = z - code_offset
// where the SIMD dot product already subtracted code_offset from the codes.
inline void ZeroScales(const Call& c, int64_t n, int nb, float* zs) {
  // Scales and zero points of the tile after next, as for the codes in Tile.
  if (n + 3 * nb <= c.N) {
    const int64_t first = (n + 2 * nb) * c.n_groups, count = nb * c.n_groups;
    const char* sc = c.scales_f32 ? reinterpret_cast<const char*>(c.scales_f32 + first)
                                  : reinterpret_cast<const char*>(c.scales_f16 + first);
    const int64_t sc_bytes = count * (c.scales_f32 ? 4 : 2);
    for (int64_t off = 0; off < sc_bytes; off += 64) __builtin_prefetch(sc + off);
    if (c.zp) {
      for (int64_t off = 0; off < count; off += 64) __builtin_prefetch(c.zp + first + off);
    }
  }
  for (int j = 0; j < nb; ++j) {
    const int64_t row = (n + j) * c.n_groups;
    float* out = zs + j * c.n_blocks;
    // Plain loops over contiguous rows, so that the compiler vectorizes them.
    if (c.scales_f32 && c.zp) {
      const float* sc = c.scales_f32 + row;
      const uint8_t* zp = c.zp + row;
      for (int64_t b = 0; b < c.n_blocks; ++b) out[b] = sc[b] * float(zp[b]);
    } else {
      for (int64_t b = 0; b < c.n_blocks; ++b) out[b] = c.Scale(row + b) * c.Zero(row + b);
    }
    if (c.code_offset) {
      const float off = float(c.code_offset);
      for (int64_t b = 0; b < c.simd_blocks; ++b) out[b] -= c.Scale(row + b) * off;
    }
  }
}

// Columns n0..n0+NB-1 for rows r0..r0+R-1; zs from ZeroScales. kPre: the
// codes of the SIMD units come unpacked from `pre` ([NB][Ka]), else from B. kLanes: bpc > 1 (one chunk per unit, a scale
// per pair of int32 lanes), else one scale per unit.
template <class V8, int BITS, int R, int NB, bool kPre, bool kLanes>
inline void Tile(const Call& c, int64_t r0, int64_t n0, const uint8_t* pre, const float* zs) {
  using FV = typename V8::FV;
  using F = typename FV::F;
  using I = typename V8::I;
  constexpr int S = V8::template Vectors<BITS>();
  constexpr int64_t C = V8::template Codes<BITS>();
  constexpr int64_t CB = V8::template ChunkBytes<BITS>();
  const int64_t pre_stride = c.Ka;
  F facc[R][NB];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r)
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) facc[r][j] = FV::Zero();
  const int8_t* act[R];
  const float* sa[R];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    act[r] = c.act + (r0 + r) * c.Ka;
    sa[r] = c.sa + (r0 + r) * c.sa_stride;
  }
  const uint8_t* rowb[NB];
  GPTQ_UNROLL
  for (int j = 0; j < NB; ++j) rowb[j] = c.Blob(n0 + j, 0);
  for (int64_t u = 0; u < c.n_units; ++u) {
    const int64_t cpb = kLanes ? 1 : (u + 1 == c.n_units ? c.last_cpb : c.cpb);
    constexpr int64_t L = V8::template NarrowChunks<BITS>();
    for (int64_t ch0 = 0; ch0 < cpb; ch0 += L) {
      I nacc[R][NB];
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r)
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) nacc[r][j] = V8::IZero();
      for (int64_t ch = ch0, ch_end = MinI(cpb, ch0 + L); ch < ch_end; ++ch) {
        const int64_t code0 = u * c.unit_codes + ch * C;
        I cv[NB][S];
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) {
          if constexpr (kPre) {
            GPTQ_UNROLL
            for (int s = 0; s < S; ++s) cv[j][s] = V8::LoadI(pre + j * pre_stride + code0 + s * V8::W);
          } else {
            const uint8_t* src = rowb[j] + u * c.unit_bytes + ch * CB;
            // The tile after next: its rows follow these in B, and a row's short
            // stream gives the hardware prefetcher too little to lock on to
            // (two tiles ahead measured best at m = 1, 4096 x 4096).
            __builtin_prefetch(src + 2 * NB * c.n_blocks * c.blob);
            V8::template Unpack<BITS>(src, cv[j]);
          }
        }
        GPTQ_UNROLL
        for (int r = 0; r < R; ++r) {
          I av[S];
          GPTQ_UNROLL
          for (int s = 0; s < S; ++s) av[s] = V8::LoadI(act[r] + code0 + s * V8::W);
          GPTQ_UNROLL
          for (int j = 0; j < NB; ++j) nacc[r][j] = V8::template DotNarrow<BITS>(nacc[r][j], cv[j], av);
        }
      }
      // Scale the partial sums straight into fp32 (no int32 accumulator to
      // keep in registers): one scale per int32 lane, lane d belonging to
      // block u * bpc + d * bpc / 8.
      const int64_t b0 = u * c.bpc;
      F ws[NB];
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) {
        const int64_t idx = (n0 + j) * c.n_groups + b0;
        if constexpr (!kLanes) {
          ws[j] = FV::Set1(c.Scale(idx));
        } else if (c.scales_f32 && idx + 8 <= c.N * c.n_groups) {
          ws[j] = V8::LaneScales(c.scales_f32 + idx, int(c.bpc));
        } else {
          float tmp[8] = {};
          for (int64_t i = 0; i < c.bpc; ++i) tmp[i] = c.Scale(idx + i);
          ws[j] = V8::LaneScales(tmp, int(c.bpc));
        }
      }
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r) {
        const F sv = kLanes ? V8::LaneScales(sa[r] + b0, int(c.bpc)) : FV::Set1(sa[r][b0]);
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) {
          const I dot = V8::template Widen<BITS>(V8::IZero(), nacc[r][j]);
          facc[r][j] = FV::Fma(V8::ToFloat(dot), V8::MulF(sv, ws[j]), facc[r][j]);
        }
      }
    }
  }
  float y[R][NB];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r)
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) y[r][j] = FV::Hsum(facc[r][j]);
  // Blocks outside the SIMD units, in natural order.
  for (int64_t b = c.simd_blocks; b < c.n_blocks; ++b) {
    const int64_t k0 = b * c.bs, len = MinI(c.bs, c.K - k0);
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      const uint8_t* blob = c.Blob(n0 + j, b);
      const float s = c.Scale((n0 + j) * c.n_groups + b);
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r) y[r][j] += sa[r][b] * s * float(TailDot(blob, c.blob, BITS, act[r] + k0, 0, len));
    }
  }
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    const float* asq = c.asq + (r0 + r) * c.n_q;
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      float v = y[r][j] - V8::DotF(zs + j * c.n_blocks, asq, c.n_blocks);  // zero points
      if (c.bias) v += c.bias[n0 + j];
      c.Yf[(r0 + r) * c.N + n0 + j] = v;
    }
  }
}

template <class V8, int BITS, int R, int NB, bool kPre>
inline void RunTile(const Call& c, int64_t r0, int64_t n0, const uint8_t* pre, const float* zs) {
  if (c.bpc == 1) {
    Tile<V8, BITS, R, NB, kPre, false>(c, r0, n0, pre, zs);
  } else {
    Tile<V8, BITS, R, NB, kPre, true>(c, r0, n0, pre, zs);
  }
}

template <class V8, int BITS, int R>
inline void DirectColumns(const Call& c, int64_t r0, int64_t n0, int64_t n1, float* zs) {
  constexpr int NB = DirectCols<BITS, R>();
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    ZeroScales(c, n, NB, zs);
    RunTile<V8, BITS, R, NB, false>(c, r0, n, nullptr, zs);
  }
  for (; n < n1; ++n) {
    ZeroScales(c, n, 1, zs);
    RunTile<V8, BITS, R, 1, false>(c, r0, n, nullptr, zs);
  }
}

// Few rows: codes straight from B, every row per tile.
template <class V8, int BITS>
void DirectTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  float* zs = static_cast<float*>(detail::ThreadScratch(detail::kScratchGroups, size_t(4 * c.n_blocks) * sizeof(float)));
  if (!zs) {
    c.failed_alloc = true;
    return;
  }
  const int64_t n0 = int64_t(task) * c.cols_per_task;
  const int64_t n1 = MinI(c.N, n0 + c.cols_per_task);
  for (int64_t r0 = 0; r0 < c.M; r0 += 4) {
    switch (MinI(4, c.M - r0)) {
      case 1: DirectColumns<V8, BITS, 1>(c, r0, n0, n1, zs); break;
      case 2: DirectColumns<V8, BITS, 2>(c, r0, n0, n1, zs); break;
      case 3: DirectColumns<V8, BITS, 3>(c, r0, n0, n1, zs); break;
      default: DirectColumns<V8, BITS, 4>(c, r0, n0, n1, zs); break;
    }
  }
}

// Unpacks the SIMD units of columns [n, n + nb) into pre ([nb][Ka]).
template <class V8, int BITS>
inline void UnpackColumns(const Call& c, int64_t n, int nb, uint8_t* pre) {
  using I = typename V8::I;
  constexpr int S = V8::template Vectors<BITS>();
  constexpr int64_t C = V8::template Codes<BITS>();
  constexpr int64_t CB = V8::template ChunkBytes<BITS>();
  const int64_t stride = c.Ka;
  const int64_t chunks = c.n_units == 0 ? 0 : (c.n_units - 1) * c.cpb + c.last_cpb;
  for (int j = 0; j < nb; ++j) {
    const uint8_t* src = c.Blob(n + j, 0);
    uint8_t* dst = pre + j * stride;
    for (int64_t i = 0; i < chunks; ++i) {
      I cv[S];
      V8::template Unpack<BITS>(src + i * CB, cv);
      GPTQ_UNROLL
      for (int s = 0; s < S; ++s) V8::StoreI(dst + i * C + s * V8::W, cv[s]);
    }
  }
}

template <class V8, int BITS, int NB>
inline void BlockedRows(const Call& c, int64_t m0, int64_t m1, int64_t n, const uint8_t* pre, float* zs) {
  ZeroScales(c, n, NB, zs);
  // Two rows x NB columns: their accumulators and operands fill the 16
  // vector registers of AVX2 without spilling.
  int64_t r0 = m0;
  for (; r0 + 2 <= m1; r0 += 2) RunTile<V8, BITS, 2, NB, true>(c, r0, n, pre, zs);
  if (r0 < m1) RunTile<V8, BITS, 1, NB, true>(c, r0, n, pre, zs);
}

// Many rows: a task owns columns [n0, n1) x rows [m0, m1); each tile of
// columns is unpacked once and swept over the task's rows.
template <class V8, int BITS>
void BlockedTask(void* ctx, size_t task) {
  constexpr int NB = DirectCols<BITS, 2>();
  Call& c = *static_cast<Call*>(ctx);
  const int64_t group = int64_t(task) % c.col_groups, row_block = int64_t(task) / c.col_groups;
  const int64_t n0 = group * c.cols_per_task, n1 = MinI(c.N, n0 + c.cols_per_task);
  const int64_t m0 = row_block * c.rows_per_block, m1 = MinI(c.M, m0 + c.rows_per_block);
  uint8_t* pre = static_cast<uint8_t*>(
      detail::ThreadScratch(detail::kScratchCodes, size_t(NB * c.Ka)));
  float* zs = static_cast<float*>(detail::ThreadScratch(detail::kScratchGroups, size_t(4 * c.n_blocks) * sizeof(float)));
  if (!pre || !zs) {
    c.failed_alloc = true;
    return;
  }
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    UnpackColumns<V8, BITS>(c, n, NB, pre);
    BlockedRows<V8, BITS, NB>(c, m0, m1, n, pre, zs);
  }
  for (; n < n1; ++n) {
    UnpackColumns<V8, BITS>(c, n, 1, pre);
    BlockedRows<V8, BITS, 1>(c, m0, m1, n, pre, zs);
  }
}

// Largest M served by the direct path (codes unpacked per row tile); the GEMM
// path wins from m = 4 (4096 x 4096, 4-bit g128, one thread: 1.22 ms both at
// m = 4; at m = 2 direct 0.81 ms, GEMM 1.11 ms).
constexpr int64_t kInt8DirectRows = 3;

#include "int8_gemm.h"

// Largest M served by the GEMV path (int8_gemv.h) where it applies: it reads
// B once per 4 rows, the GEMM path once per 64 but with 4-row register tiles,
// so m = 5, 6 cost the GEMM path two tiles. Measured (4-bit g128, one thread,
// warm kernel): at m = 4 GEMV 74 / 276 / 1074 us against GEMM 94 / 276 / 1095
// on 576x1536 / 2048x2048 / 4096x4096; at m = 6 GEMV wins only on 576x1536
// (115 against 145 us), whose packed weight stays in L2 across the passes.
constexpr int64_t kInt8GemvRows = 4;
constexpr int64_t kInt8GemvRowsL2 = 6;
constexpr int64_t kInt8GemvL2Bytes = int64_t(1) << 20;

// The GEMV path's row limit for this weight.
inline int64_t GemvRowLimit(const Call& c) {
  return c.N * c.n_blocks * c.blob <= kInt8GemvL2Bytes ? kInt8GemvRowsL2 : kInt8GemvRows;
}

#include "int8_gemv.h"

// ------------------------------------------------------------------ g_idx

// Per output column: gather its codes into group order, then one exact dot
// product per (row, group).
template <class V8, int BITS>
void GidxTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  uint8_t* codes = static_cast<uint8_t*>(detail::ThreadScratch(detail::kScratchCodes, size_t(c.K)));
  if (!codes) {
    c.failed_alloc = true;
    return;
  }
  const int64_t n0 = int64_t(task) * c.cols_per_task, n1 = MinI(c.N, n0 + c.cols_per_task);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < c.n_blocks; ++b) {
      const uint8_t* blob = c.Blob(n, b);
      const int64_t k0 = b * c.bs, len = MinI(c.bs, c.K - k0);
      for (int64_t q = 0; q < len; ++q) codes[c.kperm[k0 + q]] = uint8_t(ExtractCode(blob, c.blob, BITS, q));
    }
    for (int64_t m = 0; m < c.M; ++m) {
      const int8_t* act = c.act + m * c.Ka;
      const float* sa = c.sa + m * c.sa_stride;
      const float* asq = c.asq + m * c.n_q;
      float y = 0.0f;
      for (int64_t g = 0; g < c.n_q; ++g) {
        const int64_t p0 = c.qstart[g], p1 = c.qstart[g + 1];
        if (p0 == p1) continue;
        const int64_t idx = n * c.n_groups + g;
        const float s = c.Scale(idx);
        const int32_t dot = V8::DotBytes(codes + p0, act + p0, p1 - p0);
        y += s * (sa[g] * float(dot) - c.Zero(idx) * asq[g]);
      }
      if (c.bias) y += c.bias[n];
      c.Yf[m * c.N + n] = y;
    }
  }
}

// ------------------------------------------------------------------ driver

// Converts the fp32 result to fp16 where T is float16.
template <class V8>
void FinishTask(void* ctx, size_t task) {
  const Call& c = *static_cast<const Call*>(ctx);
  const int64_t m0 = int64_t(task) * c.rows_per_task, m1 = MinI(c.M, m0 + c.rows_per_task);
  for (int64_t m = m0; m < m1; ++m) V8::FloatToHalf(c.Yf + m * c.N, static_cast<uint16_t*>(c.p->Y) + m * c.N, c.N);
}

// Rows per task of the blocked path: enough to amortise unpacking a tile of
// columns, few enough that their activations (rows x K bytes) stay in L2.
constexpr int64_t kInt8RowsPerBlock = 64;

// Chooses the SIMD units for this geometry (see the header comment); leaves
// n_units = 0 where they cannot tile the blocks.
template <class V8, int BITS>
inline void PlanUnits(Call& c) {
  constexpr int64_t CB = V8::template ChunkBytes<BITS>();
  constexpr int64_t C = V8::template Codes<BITS>();
  c.n_units = 0;
  c.simd_blocks = 0;
  c.Ka = c.K;
  if (!V8::kSimd || (c.bs * BITS) % 8 != 0) return;
  if (c.blob % CB == 0) {
    c.cpb = c.blob / CB;
    c.bpc = 1;
    c.n_units = c.n_blocks;
  } else if (CB % c.blob == 0 && 8 % (CB / c.blob) == 0 && c.bs * (CB / c.blob) == C) {
    c.cpb = 1;
    c.bpc = CB / c.blob;
    c.n_units = c.n_blocks / c.bpc;
  } else {
    return;
  }
  c.unit_bytes = c.cpb * CB;
  c.unit_codes = c.cpb * C;
  c.simd_blocks = c.n_units * c.bpc;
  c.code_offset = V8::template CodeOffset<BITS>();
  // Chunks wholly past K (padding of a last block longer than the rest of K)
  // meet zero activations: skip them rather than read them.
  c.last_cpb = c.bpc == 1 ? CeilDiv(c.K - (c.n_units - 1) * c.unit_codes, C) : 1;
  c.Ka = MaxI(c.K, c.bpc == 1 ? (c.n_units - 1) * c.unit_codes + c.last_cpb * C : c.n_units * C);
}

template <class V8, int BITS>
Status RunBits(const GptqMatMulParams& p, const ParallelRunner& runner) {
  Call c;
  SetCallShape<BITS>(p, c);
  const int threads = runner.threads > 0 ? runner.threads : 1;

  Buffer kperm(size_t(c.K) * sizeof(int32_t));
  Buffer qstart(p.g_idx ? size_t(c.n_groups + 1) * sizeof(int32_t) : 0);
  if (!kperm.ptr || !qstart.ptr) return Status::kOutOfMemory;
  int32_t* kp = kperm.as<int32_t>();
  bool use_gemm = false, use_gemv = false;
  if (!p.g_idx) {
    PlanUnits<V8, BITS>(c);
    if constexpr (V8::kSimd) {
      use_gemv = c.M <= GemvRowLimit(c) && UseGemv<V8, BITS>(c);
      use_gemm = !use_gemv && UseGemm<V8, BITS>(c);
      if (use_gemm) {
        c.Ka = c.n_blocks * c.bs;
        for (int64_t k = 0; k < c.K; ++k) kp[k] = int32_t(GemmPosition<V8, BITS>(c, k));
      } else if (use_gemv) {
        GemvPositions<V8, BITS>(c, kp);
      }
    }
    if (!use_gemm && !use_gemv) {
      for (int64_t k = 0; k < c.K; ++k) kp[k] = int32_t(UnitPosition<V8, BITS>(c, k));
    }
    c.n_q = c.n_blocks;
  } else {
    // Counting sort of K by group: qs[g] = first position of group g.
    int32_t* qs = qstart.as<int32_t>();
    for (int64_t g = 0; g <= c.n_groups; ++g) qs[g] = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      const int32_t g = p.g_idx[k];
      if (g < 0 || g >= c.n_groups) return Status::kBadGroupIndex;
      ++qs[g + 1];
    }
    for (int64_t g = 0; g < c.n_groups; ++g) qs[g + 1] += qs[g];
    Buffer fill(size_t(c.n_groups) * sizeof(int32_t));
    if (!fill.ptr) return Status::kOutOfMemory;
    for (int64_t g = 0; g < c.n_groups; ++g) fill.as<int32_t>()[g] = qs[g];
    for (int64_t k = 0; k < c.K; ++k) kp[k] = fill.as<int32_t>()[p.g_idx[k]]++;
    c.qstart = qs;
    c.n_q = c.n_groups;
    c.Ka = c.K;
  }
  c.kperm = kp;
  c.sa_stride = c.n_q + 8;

  Buffer act(size_t(c.M * c.Ka));
  Buffer sa(size_t(c.M * c.sa_stride) * sizeof(float));
  Buffer asq(size_t(c.M * c.n_q + 8) * sizeof(float));  // + 8: the GEMM path reads 8 lanes
  Buffer qsum(size_t(c.M * c.n_q) * sizeof(int32_t));
  Buffer bias_f(p.bias && p.dtype == DType::kFloat16 ? size_t(c.N) * sizeof(float) : 0);
  Buffer y_f(p.dtype == DType::kFloat16 ? size_t(c.M * c.N) * sizeof(float) : 0);
  if (!act.ptr || !sa.ptr || !asq.ptr || !qsum.ptr || !bias_f.ptr || !y_f.ptr) return Status::kOutOfMemory;
  c.act = act.as<int8_t>();
  c.sa = sa.as<float>();
  c.asq = asq.as<float>();
  c.qsum = qsum.as<int32_t>();
  if (p.bias) {
    if (p.dtype == DType::kFloat32) {
      c.bias = static_cast<const float*>(p.bias);
    } else {
      V8::HalfToFloat(static_cast<const uint16_t*>(p.bias), bias_f.as<float>(), c.N);
      c.bias = bias_f.as<float>();
    }
  }
  c.Yf = p.dtype == DType::kFloat16 ? y_f.as<float>() : static_cast<float*>(p.Y);

  c.rows_per_task = MaxI(1, CeilDiv(c.M, int64_t(threads) * 4));
  const size_t row_tasks = size_t(CeilDiv(c.M, c.rows_per_task));
  if (row_tasks == 1) {
    QuantizeTask<V8>(&c, 0);  // cheaper here than a trip through the thread pool
  } else {
    runner.run(runner.ctx, row_tasks, &QuantizeTask<V8>, &c);
  }
  if (c.failed_alloc) return Status::kOutOfMemory;

  // Enough column tasks to balance threads, each a few tiles wide.
  c.cols_per_task = MaxI(16, CeilDiv(CeilDiv(c.N, int64_t(threads) * 8), 4) * 4);
  if (p.g_idx) {
    runner.run(runner.ctx, size_t(CeilDiv(c.N, c.cols_per_task)), &GidxTask<V8, BITS>, &c);
  } else if (use_gemv) {
    if constexpr (V8::kSimd) runner.run(runner.ctx, size_t(CeilDiv(c.N, c.cols_per_task)), &GemvTask<V8, BITS>, &c);
  } else if (c.M <= kInt8DirectRows) {
    runner.run(runner.ctx, size_t(CeilDiv(c.N, c.cols_per_task)), &DirectTask<V8, BITS>, &c);
  } else {
    c.rows_per_block = kInt8RowsPerBlock;
    const int64_t row_blocks = CeilDiv(c.M, c.rows_per_block);
    // Fewer, wider column groups when row blocks already give enough tasks.
    const int64_t want_groups = MaxI(1, CeilDiv(int64_t(threads) * 8, row_blocks));
    c.cols_per_task = MaxI(4, CeilDiv(CeilDiv(c.N, want_groups), 4) * 4);
    c.col_groups = CeilDiv(c.N, c.cols_per_task);
    if constexpr (V8::kSimd) {
      if (use_gemm) {
        c.cols_per_task = MaxI(kGemmCols, CeilDiv(CeilDiv(c.N, want_groups), 4 * kGemmCols) * 4 * kGemmCols);
        c.col_groups = CeilDiv(c.N, c.cols_per_task);
        runner.run(runner.ctx, size_t(c.col_groups * row_blocks), &GemmTask<V8, BITS>, &c);
      }
    }
    if (!use_gemm) runner.run(runner.ctx, size_t(c.col_groups * row_blocks), &BlockedTask<V8, BITS>, &c);
  }
  if (c.failed_alloc) return Status::kOutOfMemory;
  if (p.dtype == DType::kFloat16) runner.run(runner.ctx, row_tasks, &FinishTask<V8>, &c);
  return Status::kOk;
}

template <class V8>
Status Run(const GptqMatMulParams& p, const ParallelRunner& runner) {
  return DispatchBits(p.bits, [&](auto bits) { return RunBits<V8, decltype(bits)::kBits>(p, runner); });
}

}  // namespace int8
}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
