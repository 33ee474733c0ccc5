// The CPU kernel, written once over a SIMD traits type V (simd_*.h) and
// compiled once per instruction set by isa_*.cc. Include after defining
// GPTQ_ISA_NS and including the traits headers; everything lives in that
// ISA's namespace, and nothing here instantiates standard-library templates
// (see internal.h).
//
// Chunks and the permuted K order
// -------------------------------
// Each packed block (block_size codes, docs/CUSTOM_OP.md) is read as `nfull`
// full chunks of C = W*S codes followed by a tail of block_size - nfull*C
// codes. V::Unpack<BITS> turns one chunk into S vectors of W lanes in which
// lane j of vector s holds code j*S + s of the chunk: that is the order the
// bytes yield codes most cheaply (nibbles, 2-bit pairs, 3-byte groups of eight
// 3-bit codes). Instead of shuffling the codes back, the activations are laid
// out once per call in the same permuted order, so k' = block start + chunk
// start + s*W + j pairs with natural column k = block start + chunk start +
// j*S + s. Tail columns keep their natural place and are read one code at a
// time from the bit stream. Positions past K (padding of the last block) get
// zero activations. Buffers over positions stop at Kp, just past the chunk
// holding column K-1, not at n_blocks * block_size: block_size may be far
// larger than K (the spec allows it), and memory must follow K.
//
// Paths
// -----
// * Decode (few rows of A, no g_idx): per output column and block, dot the
//   zero-centred codes c_k - z (exact in fp32) with the activations and apply
//   the group's scale afterwards:  sum_k a_k (c_k - z) s = s sum_k a_k (c_k - z).
//   Factoring the zero point out, s (sum a_k c_k - z sum a_k), would subtract
//   two large sums (8-bit codes sit around z = 128) and lose digits.
// * Dequantize + GEMM (many rows, or g_idx): dequantize a tile of NR output
//   columns x kc permuted positions of W to fp32 as (c - z) * s, rounded once
//   like the reference dequantization, then a register-blocked
//   micro-kernel computes that tile of Y^T = W A^T against A packed in panels
//   of MP = 2W rows (so the dequantized rows are read as broadcast scalars and
//   never need transposing). The tile is written block-interleaved (TileOut:
//   W positions of each column contiguous, so every broadcast comes from one
//   pointer at a constant offset), and the accumulators, columns of Y^T, reach
//   Y through W x W register transposes (StoreTile).

#include "kernel_common.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

// Everything one call needs, shared read-only by its tasks.
struct Call {
  const GptqMatMulParams* p = nullptr;
  int64_t M = 0, K = 0, N = 0, bs = 0, n_blocks = 0, blob = 0, n_groups = 0;
  int64_t Kp = 0;  // permuted positions in use: [0, Kp) holds every column < K (see the header comment)
  int bits = 0;
  int64_t nfull = 0;  // full chunks per block
  int64_t C = 0;      // codes per chunk
  int64_t CB = 0;     // bytes per chunk
  const float* scales_f32 = nullptr;
  const uint16_t* scales_f16 = nullptr;
  const uint8_t* zp = nullptr;
  float zp_default = 0.0f;
  const int32_t* kperm = nullptr;  // [K] natural column -> permuted position
  const int32_t* gperm = nullptr;  // [Kp] group of each permuted position, or nullptr
  // Activations: decode: [M][Kp] rows; GEMM: [ceil(M/MP)][Kp][MP] panels.
  float* act = nullptr;
  float* Yf = nullptr;    // [M][N] fp32 result (Y itself when T is float32)
  const float* bias = nullptr;  // fp32 [N] or nullptr (applied by the decode path / final pass)
  // Task partition.
  int64_t cols_per_task = 0;  // decode
  int64_t n_tile_groups = 0, m_splits = 0, tiles_per_group = 0, panels_per_split = 0;  // GEMM
  const int64_t* kpanels = nullptr;  // GEMM: k-panel boundaries, kpanels[0] = 0 .. kpanels[n_kpanels] = Kp
  int64_t n_kpanels = 0;
  int64_t rows_per_task = 0;  // packing / final pass
  bool failed_alloc = false;  // set by a task that could not get scratch memory

  float Scale(int64_t idx) const { return scales_f32 ? scales_f32[idx] : HalfToFloatScalar(scales_f16[idx]); }
  float Zero(int64_t idx) const { return zp ? float(zp[idx]) : zp_default; }
  const uint8_t* Blob(int64_t n, int64_t b) const { return p->B + (n * n_blocks + b) * blob; }
};

// Permuted position of natural column k (see the header comment).
inline int64_t PermutedPosition(const Call& c, int64_t k, int64_t S, int64_t W) {
  const int64_t b = k / c.bs;
  const int64_t o = k - b * c.bs;
  if (o >= c.nfull * c.C) return k;
  const int64_t chunk = o / c.C;
  const int64_t q = o - chunk * c.C;
  return b * c.bs + chunk * c.C + (q % S) * W + q / S;
}

// One row of A as fp32 (converting from fp16 into scratch if needed).
template <class V>
inline const float* RowAsFloat(const Call& c, int64_t m, float* scratch) {
  if (c.p->dtype == DType::kFloat32) return static_cast<const float*>(c.p->A) + m * c.K;
  V::HalfToFloat(static_cast<const uint16_t*>(c.p->A) + m * c.K, scratch, c.K);
  return scratch;
}

// ------------------------------------------------------------------ dequantization

// A contiguous row: position q of the range goes to row[q].
template <class V>
struct RowOut {
  float* row;
  void Put(int64_t q, typename V::F v) const { V::Store(row + q, v); }
  void PutScalar(int64_t q, float x) const { row[q] = x; }
};

// Writes W[n, k'] = (code - zero) * scale for permuted positions [p0, p1) of
// row n to out (position p0 + q through out.Put / out.PutScalar at q). p0 and p1 lie on chunk boundaries (block starts,
// chunk starts, tail starts). `gscale` / `gzero` hold the row's per-group
// scale and zero point when g_idx is present.
template <class V, int BITS, class Out>
inline void DequantRange(const Call& c, int64_t n, int64_t p0, int64_t p1, const float* gscale, const float* gzero,
                         const Out& out) {
  using F = typename V::F;
  constexpr int S = (BITS == 3) ? 8 : 8 / BITS;
  constexpr int64_t C = int64_t(V::W) * S;  // == c.C
  constexpr int64_t CB = C * BITS / 8;      // == c.CB
  int64_t pos = p0;
  // Block by block (one division per call, not one per chunk).
  for (int64_t b = p0 / c.bs; pos < p1; ++b) {
    const int64_t start = b * c.bs;
    const int64_t end = MinI(start + c.bs, p1);
    const int64_t full_end = MinI(start + c.nfull * C, end);
    const uint8_t* blob = c.Blob(n, b);
    const uint8_t* src = pos < full_end ? blob + ((pos - start) / C) * CB : blob;
    float s = 0.0f, z = 0.0f;
    if (!c.gperm) {
      s = c.Scale(n * c.n_groups + b);
      z = c.Zero(n * c.n_groups + b);
    }
    const F sv = V::Set1(s), zv = V::Set1(z);
    for (; pos < full_end; pos += C, src += CB) {
      F cv[S];
      V::template Unpack<BITS>(src, cv);
      const int64_t q = pos - p0;
      if (!c.gperm) {
        GPTQ_UNROLL
        for (int i = 0; i < S; ++i) out.Put(q + i * V::W, V::Mul(V::Sub(cv[i], zv), sv));
      } else {
        for (int i = 0; i < S; ++i) {
          const int32_t* gi = c.gperm + pos + i * V::W;
          out.Put(q + i * V::W, V::Mul(V::Sub(cv[i], V::Gather(gzero, gi)), V::Gather(gscale, gi)));
        }
      }
    }
    for (; pos < end; ++pos) {
      const float code = float(ExtractCode(blob, c.blob, BITS, pos - start));
      if (!c.gperm) {
        out.PutScalar(pos - p0, (code - z) * s);
      } else {
        const int32_t g = c.gperm[pos];
        out.PutScalar(pos - p0, (code - gzero[g]) * gscale[g]);
      }
    }
  }
}

// Per-group scale and zero point of row n (for the g_idx paths).
inline void RowGroups(const Call& c, int64_t n, float* gscale, float* gzero) {
  for (int64_t g = 0; g < c.n_groups; ++g) {
    gscale[g] = c.Scale(n * c.n_groups + g);
    gzero[g] = c.Zero(n * c.n_groups + g);
  }
}

// ------------------------------------------------------------------ decode path

// Columns n0..n0+NB-1 for rows r0..r0+R-1, no g_idx.
template <class V, int BITS, int R, int NB>
inline void DecodeTile(const Call& c, int64_t r0, int64_t n0) {
  using F = typename V::F;
  constexpr int S = (BITS == 3) ? 8 : 8 / BITS;
  constexpr int C = V::W * S;
  constexpr int CB = C * BITS / 8;
  F tot[R][NB];
  float tot_tail[R][NB];  // the scaled tail sums
  const float* act[R];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    act[r] = c.act + (r0 + r) * c.Kp;
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      tot[r][j] = V::Zero();
      tot_tail[r][j] = 0.0f;
    }
  }
  for (int64_t b = 0; b < c.n_blocks; ++b) {
    const uint8_t* blob[NB];
    float zero[NB];
    F zv[NB];
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      blob[j] = c.Blob(n0 + j, b);
      zero[j] = c.Zero((n0 + j) * c.n_groups + b);
      zv[j] = V::Set1(zero[j]);
    }
    // Two accumulators per (row, column) so consecutive FMAs are independent.
    F acc[R][NB][2];
    GPTQ_UNROLL
    for (int r = 0; r < R; ++r)
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) acc[r][j][0] = acc[r][j][1] = V::Zero();
    const int64_t kb = b * c.bs;
    // Chunks wholly past K (padding of the last block) meet zero activations.
    const int64_t nfull = MinI(c.nfull, CeilDiv(c.K - kb, C));
    for (int64_t i = 0; i < nfull; ++i) {
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) {
        F cv[S];
        V::template Unpack<BITS>(blob[j] + i * CB, cv);
        GPTQ_UNROLL
        for (int s = 0; s < S; ++s) {
          const F centred = V::Sub(cv[s], zv[j]);
          GPTQ_UNROLL
          for (int r = 0; r < R; ++r) {
            acc[r][j][s & 1] = V::Fma(centred, V::Load(act[r] + kb + i * C + s * V::W), acc[r][j][s & 1]);
          }
        }
      }
    }
    float tail[R][NB];
    GPTQ_UNROLL
    for (int r = 0; r < R; ++r)
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) tail[r][j] = 0.0f;
    for (int64_t q = c.nfull * C, q_end = MinI(c.bs, c.K - kb); q < q_end; ++q) {
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) {
        const float centred = float(ExtractCode(blob[j], c.blob, BITS, q)) - zero[j];
        GPTQ_UNROLL
        for (int r = 0; r < R; ++r) tail[r][j] += centred * act[r][kb + q];
      }
    }
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      const float s = c.Scale((n0 + j) * c.n_groups + b);
      const F sv = V::Set1(s);
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r) {
        tot[r][j] = V::Fma(sv, acc[r][j][0], V::Fma(sv, acc[r][j][1], tot[r][j]));
        tot_tail[r][j] += s * tail[r][j];
      }
    }
  }
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      float y = V::Hsum(tot[r][j]) + tot_tail[r][j];
      if (c.bias) y += c.bias[n0 + j];
      c.Yf[(r0 + r) * c.N + n0 + j] = y;
    }
  }
}

template <class V, int BITS, int R>
inline void DecodeColumns(const Call& c, int64_t r0, int64_t n0, int64_t n1) {
  // Four columns at a time give enough independent work per loop; the 3-bit
  // chunk unpacks to 8 vectors, so two columns keep it in registers.
  constexpr int NB = (BITS == 3 || R > 2) ? 2 : 4;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) DecodeTile<V, BITS, R, NB>(c, r0, n);
  for (; n < n1; ++n) DecodeTile<V, BITS, R, 1>(c, r0, n);
}

template <class V, int BITS>
void DecodeTask(void* ctx, size_t task) {
  const Call& c = *static_cast<const Call*>(ctx);
  const int64_t n0 = int64_t(task) * c.cols_per_task;
  const int64_t n1 = MinI(c.N, n0 + c.cols_per_task);
  for (int64_t r0 = 0; r0 < c.M; r0 += 4) {
    switch (MinI(4, c.M - r0)) {
      case 1: DecodeColumns<V, BITS, 1>(c, r0, n0, n1); break;
      case 2: DecodeColumns<V, BITS, 2>(c, r0, n0, n1); break;
      case 3: DecodeColumns<V, BITS, 3>(c, r0, n0, n1); break;
      default: DecodeColumns<V, BITS, 4>(c, r0, n0, n1); break;
    }
  }
}

// Decode with g_idx: dequantize each row of W once, dot it with every row of A.
template <class V, int BITS>
void DecodeGidxTask(void* ctx, size_t task) {
  using F = typename V::F;
  Call& c = *static_cast<Call*>(ctx);
  const int64_t n0 = int64_t(task) * c.cols_per_task;
  const int64_t n1 = MinI(c.N, n0 + c.cols_per_task);
  float* w = static_cast<float*>(detail::ThreadScratch(detail::kScratchDequant, size_t(c.Kp) * sizeof(float)));
  float* groups = static_cast<float*>(detail::ThreadScratch(detail::kScratchGroups, size_t(2 * c.n_groups) * sizeof(float)));
  if (!w || !groups) {
    c.failed_alloc = true;
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    RowGroups(c, n, groups, groups + c.n_groups);
    DequantRange<V, BITS>(c, n, 0, c.Kp, groups, groups + c.n_groups, RowOut<V>{w});
    for (int64_t m = 0; m < c.M; ++m) {
      const float* a = c.act + m * c.Kp;
      F acc[4] = {V::Zero(), V::Zero(), V::Zero(), V::Zero()};
      int64_t k = 0;
      for (; k + 4 * V::W <= c.Kp; k += 4 * V::W) {
        for (int u = 0; u < 4; ++u) acc[u] = V::Fma(V::Load(w + k + u * V::W), V::Load(a + k + u * V::W), acc[u]);
      }
      for (; k + V::W <= c.Kp; k += V::W) acc[0] = V::Fma(V::Load(w + k), V::Load(a + k), acc[0]);
      float y = V::Hsum(acc[0]) + V::Hsum(acc[1]) + V::Hsum(acc[2]) + V::Hsum(acc[3]);
      for (; k < c.Kp; ++k) y += w[k] * a[k];
      if (c.bias) y += c.bias[n];
      c.Yf[m * c.N + n] = y;
    }
  }
}

// Lays out rows of A in permuted order ([M][Kp], zero padded).
template <class V>
void PackDecodeTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  float* row_buf = static_cast<float*>(detail::ThreadScratch(detail::kScratchRow, size_t(c.K) * sizeof(float)));
  if (!row_buf) {
    c.failed_alloc = true;
    return;
  }
  const int64_t m = int64_t(task);
  const float* a = RowAsFloat<V>(c, m, row_buf);
  float* dst = c.act + m * c.Kp;
  for (int64_t k = 0; k < c.Kp; ++k) dst[k] = 0.0f;
  for (int64_t k = 0; k < c.K; ++k) dst[c.kperm[k]] = a[k];
}

// ------------------------------------------------------------------ GEMM path

template <class V>
struct GemmShape {
  static constexpr int MP = 2 * V::W;                  // rows of A per panel (vector dimension)
  static constexpr int NR = V::W >= 16 ? 12 : (V::W >= 8 ? 6 : 4);  // columns of W per tile
};

// The dequantized tile of one (tile, k panel) of kc positions, as the
// micro-kernel reads it: kc / W blocks of [NR][W] (column i's W consecutive
// positions contiguous, so one pointer with constant offsets serves every
// broadcast), then the remaining r = kc % W positions as [NR][r]. TileOut
// writes column i of it for DequantRange.
template <class V>
struct TileOut {
  static constexpr int NR = GemmShape<V>::NR;
  static constexpr int W = V::W;
  float* wd;
  int64_t full;  // positions in whole blocks: kc / W * W
  int64_t r;     // kc - full
  int i;         // column within the tile
  void PutScalar(int64_t q, float x) const {
    if (q < full) {
      wd[(q / W * NR + i) * W + q % W] = x;
    } else {
      wd[full * NR + i * r + (q - full)] = x;
    }
  }
  void Put(int64_t q, typename V::F v) const {
    if (q % W == 0 && q + W <= full) {
      V::Store(wd + (q / W * NR + i) * W, v);
      return;
    }
    // A chunk after a block tail of odd length: off the block grid.
    float lanes[W];
    V::Store(lanes, v);
    for (int l = 0; l < W; ++l) PutScalar(q + l, lanes[l]);
  }
};

// acc[i] = sum over k in [0, kc) of wd(i, k) * panel[k][0..MP), wd laid out
// by TileOut. kHalf: a last panel of at most W rows (e.g. all of m = 16 on
// AVX-512), packed narrow as [Kp][W] (PanelStride): only the first vector is
// computed, acc[i][1] is zero.
template <class V, bool kHalf>
inline void MicroKernel(const float* wd, int64_t kc, const float* panel, typename V::F (*acc)[2]) {
  using F = typename V::F;
  constexpr int NR = GemmShape<V>::NR;
  constexpr int MP = GemmShape<V>::MP;
  constexpr int W = V::W;
  constexpr int U = W < 4 ? W : 4;  // positions per unrolled step
  constexpr int P = kHalf ? W : MP;  // panel stride
  F a[NR][2];
  GPTQ_UNROLL
  for (int i = 0; i < NR; ++i) a[i][0] = a[i][1] = V::Zero();
  const int64_t nb = kc / W, r = kc - nb * W;
  for (int64_t b = 0; b < nb; ++b) {
    const float* wp = wd + b * NR * W;
    const float* pp = panel + b * W * P;
    for (int k0 = 0; k0 < W; k0 += U) {
      GPTQ_UNROLL
      for (int kk = k0; kk < k0 + U; ++kk) {
        const F x0 = V::Load(pp + kk * P);
        if constexpr (kHalf) {
          GPTQ_UNROLL
          for (int i = 0; i < NR; ++i) a[i][0] = V::Fma(V::Set1(wp[i * W + kk]), x0, a[i][0]);
        } else {
          const F x1 = V::Load(pp + kk * MP + W);
          GPTQ_UNROLL
          for (int i = 0; i < NR; ++i) {
            const F w = V::Set1(wp[i * W + kk]);
            a[i][0] = V::Fma(w, x0, a[i][0]);
            a[i][1] = V::Fma(w, x1, a[i][1]);
          }
        }
      }
    }
  }
  const float* wr = wd + nb * NR * W;
  const float* pr = panel + nb * W * P;
  for (int64_t k = 0; k < r; ++k) {
    const F x0 = V::Load(pr + k * P);
    const F x1 = kHalf ? V::Zero() : V::Load(pr + k * P + W);
    GPTQ_UNROLL
    for (int i = 0; i < NR; ++i) {
      const F w = V::Set1(wr[i * r + k]);
      a[i][0] = V::Fma(w, x0, a[i][0]);
      if constexpr (!kHalf) a[i][1] = V::Fma(w, x1, a[i][1]);
    }
  }
  GPTQ_UNROLL
  for (int i = 0; i < NR; ++i) {
    acc[i][0] = a[i][0];
    acc[i][1] = a[i][1];
  }
}

// Positions' stride in panel mp: MP, or W for a last panel of at most W rows
// (MicroKernel's kHalf). Panel mp starts at act + mp * Kp * MP either way.
template <class V>
inline int64_t PanelStride(const Call& c, int64_t mp) {
  return c.M - mp * GemmShape<V>::MP <= V::W ? V::W : GemmShape<V>::MP;
}

// Packs rows [mp*MP, mp*MP+MP) of A into panel mp: [Kp][PanelStride], zero padded.
template <class V>
void PackGemmTask(void* ctx, size_t task) {
  constexpr int MP = GemmShape<V>::MP;
  Call& c = *static_cast<Call*>(ctx);
  float* row_buf = static_cast<float*>(detail::ThreadScratch(detail::kScratchRow, size_t(c.K) * sizeof(float)));
  if (!row_buf) {
    c.failed_alloc = true;
    return;
  }
  const int64_t mp = int64_t(task);
  float* panel = c.act + mp * c.Kp * MP;
  const int64_t ps = PanelStride<V>(c, mp);
  for (int64_t i = 0; i < c.Kp * ps; ++i) panel[i] = 0.0f;
  const int64_t rows = MinI(MP, c.M - mp * MP);
  // fp32 rows are scattered straight from A in slabs of columns, so the
  // written part of the panel stays in cache; fp16 rows go through row_buf.
  if (c.p->dtype == DType::kFloat32) {
    const float* A = static_cast<const float*>(c.p->A);
    constexpr int64_t kSlab = 256;
    for (int64_t k0 = 0; k0 < c.K; k0 += kSlab) {
      const int64_t k1 = MinI(c.K, k0 + kSlab);
      for (int64_t j = 0; j < rows; ++j) {
        const float* a = A + (mp * MP + j) * c.K;
        for (int64_t k = k0; k < k1; ++k) panel[int64_t(c.kperm[k]) * ps + j] = a[k];
      }
    }
  } else {
    for (int64_t j = 0; j < rows; ++j) {
      const float* a = RowAsFloat<V>(c, mp * MP + j, row_buf);
      for (int64_t k = 0; k < c.K; ++k) panel[int64_t(c.kperm[k]) * ps + j] = a[k];
    }
  }
}

// y[j][i] = acc's column i, row j (+= with `add`) for j < rows, i < nr: the
// accumulators (columns of Y^T) transposed in registers W x W at a time, each
// row of Y written with one masked store per group of W columns.
template <class V>
inline void StoreTile(const typename V::F (*acc)[2], float* y, int64_t ldy, int rows, int nr, bool add) {
  using F = typename V::F;
  constexpr int NR = GemmShape<V>::NR;
  constexpr int W = V::W;
  for (int h = 0; h < 2 && h * W < rows; ++h) {
    const int hr = int(MinI(W, rows - h * W));
    GPTQ_UNROLL
    for (int c0 = 0; c0 < NR; c0 += W) {
      if (c0 >= nr) break;
      const int cols = int(MinI(W, nr - c0));
      F r[W];
      GPTQ_UNROLL
      for (int i = 0; i < W; ++i) r[i] = c0 + i < NR ? acc[c0 + i][h] : V::Zero();
      V::Transpose(r);
      float* yr = y + (h * W) * ldy + c0;
      for (int j = 0; j < hr; ++j) {
        const F v = add ? V::Add(V::LoadFirst(yr + j * ldy, cols), r[j]) : r[j];
        V::StoreFirst(yr + j * ldy, v, cols);
      }
    }
  }
}

template <class V, int BITS>
void GemmTask(void* ctx, size_t task) {
  using F = typename V::F;
  constexpr int NR = GemmShape<V>::NR;
  constexpr int MP = GemmShape<V>::MP;
  Call& c = *static_cast<Call*>(ctx);
  const int64_t group = int64_t(task) / c.m_splits;
  const int64_t split = int64_t(task) % c.m_splits;
  const int64_t n_tiles = CeilDiv(c.N, NR);
  const int64_t n_panels = CeilDiv(c.M, MP);
  const int64_t t0 = group * c.tiles_per_group, t1 = MinI(n_tiles, t0 + c.tiles_per_group);
  const int64_t mp0 = split * c.panels_per_split, mp1 = MinI(n_panels, mp0 + c.panels_per_split);
  if (t0 >= t1 || mp0 >= mp1) return;

  int64_t max_kc = 0;
  for (int64_t i = 0; i < c.n_kpanels; ++i) max_kc = MaxI(max_kc, c.kpanels[i + 1] - c.kpanels[i]);
  float* wd = static_cast<float*>(detail::ThreadScratch(detail::kScratchDequant, size_t(NR * max_kc) * sizeof(float)));
  float* groups = nullptr;
  if (c.gperm) {
    groups = static_cast<float*>(detail::ThreadScratch(detail::kScratchGroups, size_t(2 * NR * c.n_groups) * sizeof(float)));
  }
  if (!wd || (c.gperm && !groups)) {
    c.failed_alloc = true;
    return;
  }
  for (int64_t kp = 0; kp < c.n_kpanels; ++kp) {
    const int64_t p0 = c.kpanels[kp], p1 = c.kpanels[kp + 1];
    const int64_t kc = p1 - p0;
    const int64_t full = kc / V::W * V::W;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbase = t * NR;
      for (int i = 0; i < NR; ++i) {
        const TileOut<V> dst{wd, full, kc - full, i};
        const int64_t n = nbase + i;
        if (n >= c.N) {
          for (int64_t k = 0; k < kc; ++k) dst.PutScalar(k, 0.0f);
          continue;
        }
        float* gs = nullptr;
        float* gz = nullptr;
        if (c.gperm) {
          gs = groups + 2 * i * c.n_groups;
          gz = gs + c.n_groups;
          RowGroups(c, n, gs, gz);
        }
        DequantRange<V, BITS>(c, n, p0, p1, gs, gz, dst);
      }
      // The next tile's codes for this k panel come from NR rows far apart in
      // B; ask for them now so the loads below overlap with this tile's GEMM.
      if (t + 1 < t1) {
        const int64_t byte0 = p0 * c.bits / 8, byte1 = (p1 * c.bits + 7) / 8;
        for (int i = 0; i < NR && nbase + NR + i < c.N; ++i) {
          const uint8_t* row = c.p->B + (nbase + NR + i) * c.n_blocks * c.blob;
          for (int64_t off = byte0; off < byte1; off += 64) __builtin_prefetch(row + off);
        }
      }
      const int nr = int(MinI(NR, c.N - nbase));
      for (int64_t mp = mp0; mp < mp1; ++mp) {
        F acc[NR][2];
        const float* panel = c.act + mp * c.Kp * MP + p0 * PanelStride<V>(c, mp);
        if (c.M - mp * MP <= V::W) {
          MicroKernel<V, true>(wd, kc, panel, acc);
        } else {
          MicroKernel<V, false>(wd, kc, panel, acc);
        }
        StoreTile<V>(acc, c.Yf + mp * MP * c.N + nbase, c.N, int(MinI(MP, c.M - mp * MP)), nr, kp > 0);
      }
    }
  }
}

// ------------------------------------------------------------------ final pass

// Adds the bias (GEMM path) and converts to fp16 where T is float16.
template <class V>
void FinishTask(void* ctx, size_t task) {
  const Call& c = *static_cast<const Call*>(ctx);
  const bool add_bias = c.bias != nullptr;
  const int64_t m0 = int64_t(task) * c.rows_per_task, m1 = MinI(c.M, m0 + c.rows_per_task);
  for (int64_t m = m0; m < m1; ++m) {
    float* y = c.Yf + m * c.N;
    if (add_bias) {
      for (int64_t n = 0; n < c.N; ++n) y[n] += c.bias[n];
    }
    if (c.p->dtype == DType::kFloat16) V::FloatToHalf(y, static_cast<uint16_t*>(c.p->Y) + m * c.N, c.N);
  }
}

// ------------------------------------------------------------------ driver

// Largest M served by the decode path; beyond it dequantizing once and
// running the GEMM micro-kernel wins. Measured at m = 8 (one thread, 4-bit
// g128): decode 2.9 ms against GEMM 5.8 ms on 2048 x 2048, 9.9 ms (as fast as
// fp32 MatMul) against 21 ms on 4096 x 4096; at m = 16 the two are even.
constexpr int64_t kDecodeMaxRows = 8;

template <class V, int BITS>
Status RunBits(const GptqMatMulParams& p, const ParallelRunner& runner) {
  constexpr int S = (BITS == 3) ? 8 : 8 / BITS;
  constexpr int64_t MP = GemmShape<V>::MP;
  constexpr int64_t NR = GemmShape<V>::NR;
  Call c;
  SetCallShape<BITS>(p, c);
  c.C = int64_t(V::W) * S;
  c.CB = c.C * BITS / 8;
  c.nfull = c.bs / c.C;
  // The last block's positions end with the chunk holding column K-1, or at K
  // when that column is in the block's tail.
  const int64_t last_start = (c.n_blocks - 1) * c.bs, last_cols = c.K - last_start;
  c.Kp = last_start + (last_cols <= c.nfull * c.C ? CeilDiv(last_cols, c.C) * c.C : last_cols);
  const int threads = runner.threads > 0 ? runner.threads : 1;

  Buffer kperm(size_t(c.K) * sizeof(int32_t));
  if (!kperm.ptr) return Status::kOutOfMemory;
  for (int64_t k = 0; k < c.K; ++k) kperm.as<int32_t>()[k] = int32_t(PermutedPosition(c, k, S, V::W));
  c.kperm = kperm.as<int32_t>();

  Buffer gperm(p.g_idx ? size_t(c.Kp) * sizeof(int32_t) : 0);
  if (p.g_idx) {
    if (!gperm.ptr) return Status::kOutOfMemory;
    int32_t* gp = gperm.as<int32_t>();
    for (int64_t k = 0; k < c.Kp; ++k) gp[k] = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      const int32_t g = p.g_idx[k];
      if (g < 0 || g >= c.n_groups) return Status::kBadGroupIndex;
      gp[c.kperm[k]] = g;
    }
    c.gperm = gp;
  }

  Buffer bias_f(p.bias && p.dtype == DType::kFloat16 ? size_t(c.N) * sizeof(float) : 0);
  if (p.bias) {
    if (p.dtype == DType::kFloat32) {
      c.bias = static_cast<const float*>(p.bias);
    } else {
      if (!bias_f.ptr) return Status::kOutOfMemory;
      V::HalfToFloat(static_cast<const uint16_t*>(p.bias), bias_f.as<float>(), c.N);
      c.bias = bias_f.as<float>();
    }
  }

  Buffer y_f(p.dtype == DType::kFloat16 ? size_t(c.M * c.N) * sizeof(float) : 0);
  if (p.dtype == DType::kFloat16) {
    if (!y_f.ptr) return Status::kOutOfMemory;
    c.Yf = y_f.as<float>();
  } else {
    c.Yf = static_cast<float*>(p.Y);
  }
  c.rows_per_task = MaxI(1, CeilDiv(c.M, int64_t(threads) * 4));
  const size_t finish_tasks = size_t(CeilDiv(c.M, c.rows_per_task));

  if (c.M <= kDecodeMaxRows) {
    Buffer act(size_t(c.M * c.Kp) * sizeof(float));
    if (!act.ptr) return Status::kOutOfMemory;
    c.act = act.as<float>();
    // A few rows: cheaper here than a trip through the thread pool.
    for (int64_t m = 0; m < c.M; ++m) PackDecodeTask<V>(&c, size_t(m));
    if (c.failed_alloc) return Status::kOutOfMemory;
    // Enough tasks to balance threads, each at least a few tiles wide.
    c.cols_per_task = MaxI(16, CeilDiv(CeilDiv(c.N, int64_t(threads) * 8), 4) * 4);
    const size_t tasks = size_t(CeilDiv(c.N, c.cols_per_task));
    if (c.gperm) {
      runner.run(runner.ctx, tasks, &DecodeGidxTask<V, BITS>, &c);
    } else {
      runner.run(runner.ctx, tasks, &DecodeTask<V, BITS>, &c);
    }
    if (c.failed_alloc) return Status::kOutOfMemory;
    // The decode path added the bias already.
    if (p.dtype == DType::kFloat16) {
      c.bias = nullptr;
      runner.run(runner.ctx, finish_tasks, &FinishTask<V>, &c);
    }
    return Status::kOk;
  }

  const int64_t n_panels = CeilDiv(c.M, MP);
  Buffer act(size_t(n_panels * c.Kp * MP) * sizeof(float));
  if (!act.ptr) return Status::kOutOfMemory;
  c.act = act.as<float>();
  runner.run(runner.ctx, size_t(n_panels), &PackGemmTask<V>, &c);
  if (c.failed_alloc) return Status::kOutOfMemory;

  // Split output tiles over tasks, and rows of A too when there are few tiles.
  const int64_t n_tiles = CeilDiv(c.N, NR);
  const int64_t n_groups_tasks = MinI(n_tiles, int64_t(threads) * 4);
  c.tiles_per_group = CeilDiv(n_tiles, n_groups_tasks);
  c.n_tile_groups = CeilDiv(n_tiles, c.tiles_per_group);
  c.m_splits = MinI(n_panels, MaxI(1, CeilDiv(int64_t(threads) * 2, c.n_tile_groups)));
  c.panels_per_split = CeilDiv(n_panels, c.m_splits);
  c.m_splits = CeilDiv(n_panels, c.panels_per_split);

  // K panels, cut on chunk boundaries: the slices of packed A one task sweeps
  // per (tile, k panel) are sized to about 1 MiB, 128..1024 positions. (2 MiB
  // had measured best on a 1 MiB-L2 Zen 5 while each pass over Y was a scalar
  // scatter; with StoreTile's transposed stores, m = 512 on a 2 MiB-L2 Xeon
  // ran 62 ms at kc = 512 against 73-83 ms at 1024, 2048 x 2048.)
  const int64_t kc_fit = (int64_t(1024 * 1024) / int64_t(sizeof(float))) / (c.panels_per_split * MP);
  const int64_t kc_target = MaxI(c.C, MinI(int64_t(1024), MaxI(int64_t(128), kc_fit)) / c.C * c.C);
  Buffer kpanels(size_t(c.Kp / c.C + c.n_blocks + 2) * sizeof(int64_t));
  if (!kpanels.ptr) return Status::kOutOfMemory;
  int64_t* kb = kpanels.as<int64_t>();
  int64_t nk = 0;
  kb[0] = 0;
  for (int64_t pos = 0; pos < c.Kp;) {
    int64_t next = MinI(c.Kp, pos + kc_target);
    if (next < c.Kp) {
      const int64_t b = next / c.bs;
      const int64_t o = next - b * c.bs;
      next = b * c.bs + MinI((o / c.C) * c.C, c.nfull * c.C);
      if (next <= pos) {
        const int64_t o0 = pos - (pos / c.bs) * c.bs;
        next = o0 < c.nfull * c.C ? pos + c.C : MinI(c.Kp, (pos / c.bs + 1) * c.bs);
      }
    }
    kb[++nk] = next;
    pos = next;
  }
  c.kpanels = kb;
  c.n_kpanels = nk;

  runner.run(runner.ctx, size_t(c.n_tile_groups * c.m_splits), &GemmTask<V, BITS>, &c);
  if (c.failed_alloc) return Status::kOutOfMemory;
  if (c.bias || p.dtype == DType::kFloat16) runner.run(runner.ctx, finish_tasks, &FinishTask<V>, &c);
  return Status::kOk;
}

template <class V>
Status Run(const GptqMatMulParams& p, const ParallelRunner& runner) {
  return DispatchBits(p.bits, [&](auto bits) { return RunBits<V, decltype(bits)::kBits>(p, runner); });
}

// Codes per chunk for vector width W (to pick a narrower V for small blocks).
inline int64_t ChunkCodes(int bits, int w) { return int64_t(w) * (bits == 3 ? 8 : 8 / bits); }

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
