// The GEMV path of accuracy_level 4 (int8_impl.h includes this inside its
// namespace, after Call and int8_gemm.h): few rows of A, no g_idx, blocks of
// whole chunks (bpc == 1), any bit width. Only for SIMD traits.
//
// Like the per-block direct path (Tile in int8_impl.h), codes come straight
// from B and every block's int32 dot product is scaled on its own, but with
// the GEMM path's vectors (V8::Gemm: 64 bytes with AVX512-VNNI, else 32): a
// "wide chunk" is one vector of codes' worth of B (3 bits: 48 bytes, or 24),
// whose bytes unpack on their own into S = 8 / BITS vectors of codes, byte L
// of vector s holding code L * S + s of the wide chunk (3 bits: two vectors,
// byte i of dword j of vector s holding code 8j + 4s + i, G::Unpack3). A block
// is ceil(blob / wide chunk) wide chunks, the last one possibly half of one
// (a chunk of Tile's layout, masked); the activations of every
// row are stored in that order once per call (GemvPositions), each block at a
// stride of `gemv_unit` codes. Per (row, column, block) the int32 lanes are
// converted and scaled by one FMA, the zero points entering the integer dot
// product (GemvTile).

// Geometry of a wide chunk for BITS: bytes of B in one chunk of Tile's
// layout (24 at 3 bits, else 32), bytes of B per wide chunk (3 bits: 48 with
// 64-byte vectors, 24 with 32-byte ones), vectors of codes it unpacks to, and
// its codes.
template <class V8, int BITS>
struct GemvGeometry {
  static constexpr int64_t kChunkBytes = BITS == 3 ? 24 : 32;
  static constexpr int64_t kWideBytes = BITS == 3 ? V8::Gemm::kStep * 3 / 4 : V8::Gemm::kStep;
  static constexpr int S = BITS == 3 ? 2 : 8 / BITS;
  static constexpr int64_t kCodes = V8::Gemm::kStep * S;
};

// Columns per register tile for R rows: 32 vector registers on AVX-512 hold
// R x NB int32 and fp32 accumulators plus NB loaded vectors, 16 on AVX2.
// One row takes 8 columns on AVX-512 (warm kernel, m = 1, against 4: 576x1536
// 4-bit 27.2 -> 26.5 us, 2048x2048 3-bit 181 -> 170 us).
template <class V8, int R>
constexpr int GemvCols() {
  return V8::Gemm::kStep == 64 ? (R == 1 ? 8 : R == 2 ? 4 : (R == 3 ? 3 : 2)) : (R == 1 ? 4 : (R == 2 ? 2 : 1));
}

// Whether the GEMV path serves this call (after PlanUnits); sets gemv,
// gemv_unit and Ka.
template <class V8, int BITS>
inline bool UseGemv(Call& c) {
  using Geo = GemvGeometry<V8, BITS>;
  if (c.qstart || c.n_units == 0 || c.bpc != 1) return false;
  const int64_t wide = CeilDiv(c.cpb * Geo::kChunkBytes, Geo::kWideBytes);
  // Without VNNI a block's dot product accumulates in int16 pairs.
  if (wide * Geo::S > V8::template NarrowVectors<BITS>()) return false;
  c.gemv = true;
  c.gemv_unit = wide * Geo::kCodes;
  c.Ka = MaxI(c.K, (c.n_blocks - 1) * c.gemv_unit + CeilDiv(c.last_cpb * Geo::kChunkBytes, Geo::kWideBytes) * Geo::kCodes);
  return true;
}

// kp[k] = position of natural column k in the GEMV activation rows.
template <class V8, int BITS>
inline void GemvPositions(const Call& c, int32_t* kp) {
  using Geo = GemvGeometry<V8, BITS>;
  constexpr int64_t WB = V8::Gemm::kStep, CW = Geo::kCodes;
  for (int64_t b = 0; b < c.n_blocks; ++b) {
    const int64_t k0 = b * c.bs, len = MinI(c.bs, c.K - k0), base = b * c.gemv_unit;
    for (int64_t q = 0; q < len; ++q) {
      const int64_t w = q / CW, r = q - w * CW;
      // 3 bits: code 8j + 4s + i at byte 4j + i of vector s (Unpack3); else
      // code L * S + s at byte L of vector s.
      const int64_t in_chunk = BITS == 3 ? (r % 8 / 4) * WB + r / 8 * 4 + r % 4 : (r % Geo::S) * WB + r / Geo::S;
      kp[k0 + q] = int32_t(base + w * CW + in_chunk);
    }
  }
}

// Rows r0 .. r0 + R - 1 x columns n0 .. n0 + NB - 1; sc: the columns' fp32
// scales (column j at sc + j * sc_stride). The zero points are exact integer
// terms of each block's dot product: sum_k q_k (c_k - z) = sum_k q_k c_k - z qsum.
template <class V8, int BITS, int R, int NB>
inline void GemvTile(const Call& c, int64_t r0, int64_t n0, const float* sc, int64_t sc_stride) {
  using G = typename V8::Gemm;
  using I = typename G::I;
  using F = typename G::F;
  using Geo = GemvGeometry<V8, BITS>;
  constexpr int S = Geo::S;
  constexpr int64_t WB = G::kStep, CW = Geo::kCodes, WBB = Geo::kWideBytes;
  constexpr int32_t kOffset = V8::template CodeOffset<BITS>();
  const int8_t* act[R];
  const float* sa[R];
  const int32_t* qs[R];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    act[r] = c.act + (r0 + r) * c.Ka;
    sa[r] = c.sa + (r0 + r) * c.sa_stride;
    qs[r] = c.qsum + (r0 + r) * c.n_q;
  }
  const uint8_t* col[NB];
  const uint8_t* zp[NB];
  GPTQ_UNROLL
  for (int j = 0; j < NB; ++j) {
    col[j] = c.Blob(n0 + j, 0);
    zp[j] = c.zp ? c.zp + (n0 + j) * c.n_groups : nullptr;
  }
  const int32_t z_default = int32_t(c.zp_default) - kOffset;
  // The tile after next: its rows follow these in B (see Tile).
  const int64_t ahead = 2 * NB * c.n_blocks * c.blob;
  F facc[R][NB];
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r)
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) facc[r][j] = G::Zero();
  for (int64_t b = 0; b < c.n_blocks; ++b) {
    const int64_t bytes = (b + 1 == c.n_blocks ? c.last_cpb : c.cpb) * Geo::kChunkBytes;
    const int64_t boff = b * c.blob;
    I acc[R][NB];
    GPTQ_UNROLL
    for (int r = 0; r < R; ++r)
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) acc[r][j] = I();
    for (int64_t off = 0, apos = b * c.gemv_unit; off < bytes; off += WBB, apos += CW) {
      // A last half chunk (64-byte vectors): the first 32 bytes of every vector.
      const bool half = bytes - off < WBB;
      const auto mask = G::Mask(half ? WB / 2 : WB);
      I raw[NB][BITS == 3 ? 2 : 1];
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) {
        if constexpr (BITS == 3) {
          G::Unpack3(col[j] + boff + off, half, raw[j]);
        } else {
          raw[j][0] = G::Load(col[j] + boff + off, mask);
        }
        G::Prefetch(col[j] + boff + off + ahead);
      }
      GPTQ_UNROLL
      for (int s = 0; s < S; ++s) {
        I av[R];
        GPTQ_UNROLL
        for (int r = 0; r < R; ++r) av[r] = G::Load(act[r] + apos + s * WB, mask);
        GPTQ_UNROLL
        for (int j = 0; j < NB; ++j) {
          I u;
          if constexpr (BITS == 3) {
            u = raw[j][s];
          } else {
            u = V8::template GemvCodes<BITS>(raw[j][0], s);
          }
          GPTQ_UNROLL
          for (int r = 0; r < R; ++r) acc[r][j] = V8::template Dot1<BITS>(acc[r][j], u, av[r]);
        }
      }
    }
    F sv[R];
    GPTQ_UNROLL
    for (int r = 0; r < R; ++r) sv[r] = G::Set1(sa[r][b]);
    GPTQ_UNROLL
    for (int j = 0; j < NB; ++j) {
      const F w = G::Set1(sc[j * sc_stride + b]);
      const int32_t z = zp[j] ? int32_t(zp[j][b]) - kOffset : z_default;
      GPTQ_UNROLL
      for (int r = 0; r < R; ++r) {
        const I dot = G::AddLane0(V8::template GemmWiden<BITS>(acc[r][j]), -z * qs[r][b]);
        facc[r][j] = G::Fma(G::ToFloat(dot), G::Mul(sv[r], w), facc[r][j]);
      }
    }
  }
  GPTQ_UNROLL
  for (int r = 0; r < R; ++r) {
    float* y = c.Yf + (r0 + r) * c.N + n0;
    if constexpr (NB % 4 == 0) {
      GPTQ_UNROLL
      for (int j = 0; j < NB; j += 4) {
        G::StoreSums4(y + j, facc[r][j], facc[r][j + 1], facc[r][j + 2], facc[r][j + 3], c.bias ? c.bias + n0 + j : nullptr);
      }
    } else {
      GPTQ_UNROLL
      for (int j = 0; j < NB; ++j) y[j] = G::Hsum(facc[r][j]) + (c.bias ? c.bias[n0 + j] : 0.0f);
    }
  }
}

// One tile: its scales in fp32, then GemvTile.
template <class V8, int BITS, int R, int NB>
inline void GemvStep(const Call& c, int64_t r0, int64_t n, float* sc16) {
  if (c.scales_f32) {
    GemvTile<V8, BITS, R, NB>(c, r0, n, c.scales_f32 + n * c.n_groups, c.n_groups);
  } else {
    for (int j = 0; j < NB; ++j) V8::HalfToFloat(c.scales_f16 + (n + j) * c.n_groups, sc16 + j * c.n_blocks, c.n_blocks);
    GemvTile<V8, BITS, R, NB>(c, r0, n, sc16, c.n_blocks);
  }
}

template <class V8, int BITS, int R>
inline void GemvColumns(const Call& c, int64_t r0, int64_t n0, int64_t n1, float* sc16) {
  constexpr int NB = GemvCols<V8, R>();
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) GemvStep<V8, BITS, R, NB>(c, r0, n, sc16);
  for (; n < n1; ++n) GemvStep<V8, BITS, R, 1>(c, r0, n, sc16);
}

// A task owns columns [n0, n1) and every row, four at a time.
template <class V8, int BITS>
void GemvTask(void* ctx, size_t task) {
  Call& c = *static_cast<Call*>(ctx);
  {
    // fp16 scales of a tile, converted (fp32 ones are read in place).
    float* sc16 = nullptr;
    if (c.scales_f16) {
      constexpr int kMaxCols = GemvCols<V8, 1>();  // the widest tile
      sc16 = static_cast<float*>(
          detail::ThreadScratch(detail::kScratchGroups, size_t(kMaxCols * c.n_blocks) * sizeof(float)));
      if (!sc16) {
        c.failed_alloc = true;
        return;
      }
    }
    const int64_t n0 = int64_t(task) * c.cols_per_task, n1 = MinI(c.N, n0 + c.cols_per_task);
    for (int64_t r0 = 0; r0 < c.M; r0 += 4) {
      switch (MinI(4, c.M - r0)) {
        case 1: GemvColumns<V8, BITS, 1>(c, r0, n0, n1, sc16); break;
        case 2: GemvColumns<V8, BITS, 2>(c, r0, n0, n1, sc16); break;
        case 3: GemvColumns<V8, BITS, 3>(c, r0, n0, n1, sc16); break;
        default: GemvColumns<V8, BITS, 4>(c, r0, n0, n1, sc16); break;
      }
    }
  }
}
