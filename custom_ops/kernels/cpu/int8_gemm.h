// The GEMM path of accuracy_level 4 (int8_impl.h includes this inside its
// namespace, after Call, ZeroScales and the activation quantization): many rows of A, no g_idx, blocks
// of whole chunks (bpc == 1). Only for SIMD traits (V8::kSimd).
//
// Block-interleaved layout
// ------------------------
// The per-block path (Tile in int8_impl.h) scales every block's int32 dot
// product separately: one convert, multiply and FMA per (row, column, block),
// as many operations as the dot products themselves at 4 bits, group 128.
// Here the blocks are cut into groups of P = 8, 4, 2 or 1 consecutive blocks
// (8 while they last, then the remainder in fours, twos, ones), and within a
// group the codes of the P blocks are interleaved so that the int32 lane d of
// every vector belongs to block d * P / 8 of the group. The dot products of a
// whole group then accumulate in the same registers, and each (row, column)
// is scaled once per group by a vector of per-lane scales (LaneScales): at
// 4 bits, group 128, one scaling per 32 dot-product vectors.
//
// A block's codes are first unpacked in the lane order of V8::Unpack (block
// position q' for code q); the P unpacked streams are then transposed as
// P x P elements of E = 32 / P bytes (V8::Transpose): vector v * P + x of the
// group holds element x of vector v of each block d at byte d * E. The
// activations of every row are stored in that same order, once per call.
//
// Register tiles: kGemmRows rows x kGemmCols columns of int32 (or int16
// pairs on AVX2 without VNNI) accumulators; a tile's missing rows or columns
// (edges of M and N) repeat the last valid one and are not stored.

constexpr int kGemmRows = 4;
constexpr int kGemmCols = 3;

// The group of block b: its first block and size P (see the header comment).
inline void GemmGroupOf(int64_t n_blocks, int64_t b, int64_t* b0, int* P) {
  const int64_t full = n_blocks / 8 * 8;
  if (b < full) {
    *b0 = b / 8 * 8;
    *P = 8;
    return;
  }
  int64_t start = full;
  for (int size = 4; size >= 1; size /= 2) {
    if ((n_blocks - full) & size) {
      if (b < start + size) {
        *b0 = start;
        *P = size;
        return;
      }
      start += size;
    }
  }
  *b0 = b;  // unreachable for b < n_blocks
  *P = 1;
}

// Size of the group starting at block b0.
inline int GemmGroupAt(int64_t n_blocks, int64_t b0) {
  int64_t first = 0;
  int P = 1;
  GemmGroupOf(n_blocks, b0, &first, &P);
  return P;
}

// Whether the GEMM path serves this call (after PlanUnits); sets gemm_short
// for 2- and 4-bit blocks shorter than a chunk whose codes fill whole vectors
// (block_size 32 at 4 bits, 32 and 64 at 2 bits), unpacked by V8::UnpackShort.
template <class V8, int BITS>
inline bool UseGemm(Call& c) {
  // Interleaving pads the last block to whole chunks of every lane: keep it
  // for block sizes that do not dwarf K.
  if (c.qstart || c.M <= kInt8DirectRows || c.n_blocks * c.bs > 2 * c.K) return false;
  if (c.n_units > 0 && c.bpc == 1) return true;
  c.gemm_short = (BITS == 2 || BITS == 4) && c.bs % V8::W == 0 && c.blob < V8::template ChunkBytes<BITS>();
  return c.gemm_short;
}

// Position of natural column k in the interleaved activation rows.
template <class V8, int BITS>
inline int64_t GemmPosition(const Call& c, int64_t k) {
  constexpr int64_t C = V8::template Codes<BITS>();
  const int64_t b = k / c.bs, q = k - b * c.bs;
  int64_t b0 = 0;
  int P = 1;
  GemmGroupOf(c.n_blocks, b, &b0, &P);
  int64_t qp = 0;  // position in the block's stream
  if (c.gemm_short) {
    qp = q / V8::W * V8::W + V8::template ShortPosition<BITS>(q % V8::W);
  } else {
    const int64_t ch = q / C;
    qp = ch * C + V8::template LanePosition<BITS>(q - ch * C);
  }
  const int64_t E = V8::W / P;
  const int64_t v = qp / V8::W, x = (qp % V8::W) / E, i = qp % E;
  return b0 * c.bs + (v * P + x) * V8::W + (b - b0) * E + i;
}

// Unpacks the P blocks of column n from block b0 on into dst (interleaved).
template <class V8, int BITS, int P>
inline void GemmUnpackGroup(const Call& c, int64_t n, int64_t b0, uint8_t* dst) {
  using I = typename V8::I;
  constexpr int S = V8::template Vectors<BITS>();
  constexpr int64_t CB = V8::template ChunkBytes<BITS>();
  const uint8_t* src = c.Blob(n, b0);
  if (c.gemm_short) {
    if constexpr (BITS == 2 || BITS == 4) {
      for (int64_t v = 0; v < c.bs / V8::W; ++v) {
        I in[P], out[P];
        GPTQ_UNROLL
        for (int d = 0; d < P; ++d) in[d] = V8::template UnpackShort<BITS>(src + d * c.blob + v * (V8::W * BITS / 8));
        V8::template Transpose<P>(in, out);
        GPTQ_UNROLL
        for (int x = 0; x < P; ++x) V8::StoreI(dst + (v * P + x) * V8::W, out[x]);
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < c.cpb; ++ch) {
    I out[S][P];
    if constexpr (BITS == 3) {
      // Unpack first (3-byte groups cross the elements), then transpose.
      I cv[P][S];
      GPTQ_UNROLL
      for (int d = 0; d < P; ++d) V8::template Unpack<BITS>(src + d * c.blob + ch * CB, cv[d]);
      GPTQ_UNROLL
      for (int s = 0; s < S; ++s) {
        I in[P];
        GPTQ_UNROLL
        for (int d = 0; d < P; ++d) in[d] = cv[d][s];
        V8::template Transpose<P>(in, out[s]);
      }
    } else {
      // 2/4/8 bits unpack every byte on its own, so the raw chunks can be
      // transposed once and unpacked after (S times fewer shuffles).
      I raw[P], t[P];
      GPTQ_UNROLL
      for (int d = 0; d < P; ++d) raw[d] = V8::LoadI(src + d * c.blob + ch * CB);
      V8::template Transpose<P>(raw, t);
      GPTQ_UNROLL
      for (int x = 0; x < P; ++x) {
        I u[S];
        V8::template UnpackBytes<BITS>(t[x], u);
        GPTQ_UNROLL
        for (int s = 0; s < S; ++s) out[s][x] = u[s];
      }
    }
    GPTQ_UNROLL
    for (int s = 0; s < S; ++s) {
      const int64_t v = ch * S + s;
      GPTQ_UNROLL
      for (int x = 0; x < P; ++x) V8::StoreI(dst + (v * P + x) * V8::W, out[s][x]);
    }
  }
}

// Unpacks every group of column n into dst ([Ka] bytes).
template <class V8, int BITS>
inline void GemmUnpackColumn(const Call& c, int64_t n, uint8_t* dst) {
  for (int64_t b0 = 0; b0 < c.n_blocks;) {
    const int P = GemmGroupAt(c.n_blocks, b0);
    uint8_t* out = dst + b0 * c.bs;
    switch (P) {
      case 8: GemmUnpackGroup<V8, BITS, 8>(c, n, b0, out); break;
      case 4: GemmUnpackGroup<V8, BITS, 4>(c, n, b0, out); break;
      case 2: GemmUnpackGroup<V8, BITS, 2>(c, n, b0, out); break;
      default: GemmUnpackGroup<V8, BITS, 1>(c, n, b0, out); break;
    }
    b0 += P;
  }
}

// Per-lane weight scales of column n for the group (b0, P).
template <class V8>
inline auto GemmWeightScales(const Call& c, int64_t n, int64_t b0, int P) {
  const int64_t idx = n * c.n_groups + b0;
  if (c.scales_f32 && idx + 8 <= c.N * c.n_groups) return V8::LaneScales(c.scales_f32 + idx, P);
  float tmp[8] = {};
  for (int i = 0; i < P; ++i) tmp[i] = c.Scale(idx + i);
  return V8::LaneScales(tmp, P);
}

// Rows r0 .. r0 + rv - 1 x columns n0 .. n0 + nv - 1 (rv <= kGemmRows, nv <=
// kGemmCols); pre: the tile's columns unpacked ([kGemmCols][Ka]); zs from ZeroScales.
template <class V8, int BITS>
inline void GemmTile(const Call& c, int64_t r0, int rv, int64_t n0, int nv, const uint8_t* pre, const float* zs) {
  using G = typename V8::Gemm;
  using F = typename G::F;
  using I = typename G::I;
  constexpr int R = kGemmRows, NB = kGemmCols;
  constexpr int64_t NV = V8::template NarrowVectors<BITS>() * G::kStep;  // bytes per narrow run
  const int8_t* act[R];
  const float* sa[R];
  const float* asq[R];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + (r < rv ? r : rv - 1);
    act[r] = c.act + row * c.Ka;
    sa[r] = c.sa + row * c.sa_stride;
    asq[r] = c.asq + row * c.n_q;
  }
  const uint8_t* col[NB];
  GPTQ_UNROLL
  for (int j = 0; j < NB; ++j) col[j] = pre + (j < nv ? j : nv - 1) * c.Ka;
  F facc[R][NB];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r)
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) facc[r][j] = G::Zero();
  for (int64_t b0 = 0; b0 < c.n_blocks;) {
    const int P = GemmGroupAt(c.n_blocks, b0);
    const int64_t base = b0 * c.bs, end = base + P * c.bs;
    for (int64_t run = base; run < end; run += NV) {
      I acc[R][NB];
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r)
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) acc[r][j] = I();
      const int64_t run_end = MinI(end, run + NV);
      for (int64_t off = run; off < run_end; off += G::kStep) {
        // 64-byte vectors: a group may end on an odd 32-byte step.
        const auto mask = G::Mask(run_end - off);
        I cv[NB];
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) cv[j] = G::Load(col[j] + off, mask);
        GPTQ_UNROLL
        for (int r = 0; r < R; ++r) {
          const I av = G::Load(act[r] + off, mask);
          GPTQ_UNROLL
          for (int j = 0; j < NB; ++j) acc[r][j] = V8::template Dot1<BITS>(acc[r][j], cv[j], av);
        }
      }
      F ws[NB];
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) ws[j] = G::FromLanes(GemmWeightScales<V8>(c, n0 + (j < nv ? j : nv - 1), b0, P));
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r) {
        const F sv = G::FromLanes(V8::LaneScales(sa[r] + b0, P));
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) {
          facc[r][j] = G::Fma(G::ToFloat(V8::template GemmWiden<BITS>(acc[r][j])), G::Mul(sv, ws[j]), facc[r][j]);
        }
      }
      // The zero points' share, sum over the group's blocks of zs * asq
      // (see ZeroScales): each block fills lanes / P lanes, hence the factor.
      if (run == base) {
        const F share = G::Set1(float(P) / float(G::kLanes));
        F zv[NB];
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) zv[j] = G::FromLanes(V8::LaneScales(zs + (j < nv ? j : nv - 1) * c.n_blocks + b0, P));
        GPTQ_UNROLL
        for (int r = 0; r < R; ++r) {
          const F av = G::Mul(G::FromLanes(V8::LaneScales(asq[r] + b0, P)), share);
          GPTQ_UNROLL
          for (int j = 0; j < NB; ++j) facc[r][j] = G::Fnma(zv[j], av, facc[r][j]);
        }
      }
    }
    b0 += P;
  }
  for (int r = 0; r < rv; ++r) {
    for (int j = 0; j < nv; ++j) {
      float y = G::Hsum(facc[r][j]);
      if (c.bias) y += c.bias[n0 + j];
      c.Yf[(r0 + r) * c.N + n0 + j] = y;
    }
  }
}

// A task owns columns [n0, n1) x rows [m0, m1) (the partition of
// BlockedTask): each tile of columns is unpacked once and swept over the rows.
template <class V8, int BITS>
void GemmTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  const int64_t group = int64_t(task) % c.col_groups, row_block = int64_t(task) / c.col_groups;
  const int64_t n0 = group * c.cols_per_task, n1 = MinI(c.N, n0 + c.cols_per_task);
  const int64_t m0 = row_block * c.rows_per_block, m1 = MinI(c.M, m0 + c.rows_per_block);
  uint8_t* pre = static_cast<uint8_t*>(detail::ThreadScratch(detail::kScratchCodes, size_t(kGemmCols * c.Ka)));
  float* zs = static_cast<float*>(
      detail::ThreadScratch(detail::kScratchGroups, size_t(kGemmCols * c.n_blocks + 8) * sizeof(float)));
  if (!pre || !zs) {
    c.failed_alloc = true;
    return;
  }
  for (int64_t n = n0; n < n1; n += kGemmCols) {
    const int nv = int(MinI(kGemmCols, n1 - n));
    for (int j = 0; j < nv; ++j) GemmUnpackColumn<V8, BITS>(c, n + j, pre + j * c.Ka);
    ZeroScales(c, n, nv, zs);
    for (int64_t r0 = m0; r0 < m1; r0 += kGemmRows) {
      GemmTile<V8, BITS>(c, r0, int(MinI(kGemmRows, m1 - r0)), n, nv, pre, zs);
    }
  }
}
