// Int8 traits for int8_impl.h on x86, 32 byte lanes per vector. One header for
// three builds, told apart by the unit's compile flags:
//   -mavx512vnni -mavx512vl  vpdpbusd on ymm registers (AVX512-VNNI)
//   -mavxvnni                vpdpbusd, VEX encoding (AVX-VNNI)
//   neither (-mavx2)         vpmaddubsw + vpmaddwd (AVX2)
// Include after defining GPTQ_ISA_NS and including simd_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "int8_quantize.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

// Vectors of the GEMM path's inner loop (int8_gemm.h), which reads the
// interleaved 32-byte layout either one 32-byte step at a time (Y) or two at
// once (Z, AVX-512: lane d of a 64-byte vector belongs to the block of lane
// d % 8 of a 32-byte one, so the per-lane scales repeat in both halves).
// The 64 codes of a 3-bit chunk (24 bytes) in two vectors: byte i of dword j
// of out[s] holds code 8j + 4s + i.
inline void Unpack3Y(const uint8_t* src, __m256i* out) {
  const __m256i v = Load3BitGroups(src);
  // Codes i = 0..3 of a dword sit at bits 3i; move each to byte i.
  for (int s = 0; s < 2; ++s) {
    const __m256i t = _mm256_srli_epi32(v, 12 * s);
    __m256i x = _mm256_and_si256(t, _mm256_set1_epi32(0x7));
    x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 5), _mm256_set1_epi32(0x700)));
    x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 10), _mm256_set1_epi32(0x70000)));
    x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(t, 15), _mm256_set1_epi32(0x7000000)));
    out[s] = x;
  }
}

// y[0..3] = {sum of a's lanes, b's, c's, d's} (+ bias[0..3] unless nullptr).
inline void StoreSums4Y(float* y, __m256 a, __m256 b, __m256 c, __m256 d, const float* bias) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias));
  _mm_storeu_ps(y, v);
}

struct X86GemmY {
  static constexpr int kStep = 32;
  using I = __m256i;
  using F = __m256;
  static int Mask(int64_t) { return 0; }
  static I Load(const void* p, int) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static F Zero() { return _mm256_setzero_ps(); }
  static F ToFloat(I v) { return _mm256_cvtepi32_ps(v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static constexpr int kLanes = 8;
  static F Set1(float x) { return _mm256_set1_ps(x); }
  static F Fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F FromLanes(__m256 v) { return v; }
  static float Hsum(F v) { return Avx2V::Hsum(v); }
  // Vector s of a loaded chunk of 2/4/8-bit codes, each byte unpacked on its
  // own: byte L holds code L * (8 / BITS) + s (int8_gemv.h).
  template <int BITS>
  static I UnpackByte(I v, int s) {
    if constexpr (BITS == 8) {
      return v;
    } else {
      return _mm256_and_si256(_mm256_srli_epi16(v, BITS * s), _mm256_set1_epi8(char((1 << BITS) - 1)));
    }
  }
  static void Prefetch(const void* p) { __builtin_prefetch(p); }
  static I FlipTopBit(I v) { return _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))); }
  // A 3-bit GEMV chunk (24 bytes here; `half` is never set) in two vectors.
  static void Unpack3(const uint8_t* src, bool, I* out) { Unpack3Y(src, out); }
  // v plus x in int32 lane 0.
  static I AddLane0(I v, int32_t x) { return _mm256_add_epi32(v, _mm256_zextsi128_si256(_mm_cvtsi32_si128(x))); }
  // y[0..3] = the lane sums of a, b, c, d (+ bias[0..3] unless nullptr).
  static void StoreSums4(float* y, F a, F b, F c, F d, const float* bias) { StoreSums4Y(y, a, b, c, d, bias); }
};

#if defined(__AVX512F__)
struct X86GemmZ {
  static constexpr int kStep = 64;
  using I = __m512i;
  using F = __m512;
  // All 64 bytes, or the first 32 where only those are left (the rest zero).
  static __mmask64 Mask(int64_t left) { return left >= 64 ? ~__mmask64(0) : __mmask64(0xffffffffu); }
  static I Load(const void* p, __mmask64 m) { return _mm512_maskz_loadu_epi8(m, p); }
  static F Zero() { return _mm512_setzero_ps(); }
  static F ToFloat(I v) { return _mm512_cvtepi32_ps(v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static constexpr int kLanes = 16;
  static F Set1(float x) { return _mm512_set1_ps(x); }
  static F Fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F FromLanes(__m256 v) {
    const __m512 w = _mm512_castps256_ps512(v);
    return _mm512_shuffle_f32x4(w, w, 0x44);  // 128-bit lanes 0, 1, 0, 1
  }
  static float Hsum(F v) { return _mm512_reduce_add_ps(v); }
  template <int BITS>
  static I UnpackByte(I v, int s) {
    if constexpr (BITS == 8) {
      return v;
    } else {
      return _mm512_and_si512(_mm512_srli_epi16(v, BITS * s), _mm512_set1_epi8(char((1 << BITS) - 1)));
    }
  }
  static void Prefetch(const void* p) { __builtin_prefetch(p); }
  static I FlipTopBit(I v) { return _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80))); }
  // The 128 codes of 48 bytes of 3-bit codes (the first 64 of 24 bytes where
  // `half`) in two vectors, byte i of dword j of out[s] holding code 8j + 4s + i.
  static void Unpack3(const uint8_t* src, bool half, I* out) {
    const __m512i raw = _mm512_maskz_loadu_epi8(half ? __mmask64(0xffffffu) : __mmask64(0xffffffffffffull), src);
    // Four 3-byte groups (12 bytes) per 128-bit lane, then each group to its own dword.
    __m512i v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0), raw);
    v = _mm512_shuffle_epi8(v, _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1)));
    for (int s = 0; s < 2; ++s) {
      const __m512i t = s ? _mm512_srli_epi32(v, 12) : v;
      // x | (t << sh) & mask, one ternary-logic op each (0xf8: A | (B & C)).
      __m512i x = _mm512_and_si512(t, _mm512_set1_epi32(0x7));
      x = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(t, 5), _mm512_set1_epi32(0x700), 0xf8);
      x = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(t, 10), _mm512_set1_epi32(0x70000), 0xf8);
      x = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(t, 15), _mm512_set1_epi32(0x7000000), 0xf8);
      out[s] = x;
    }
  }
  static I AddLane0(I v, int32_t x) { return _mm512_add_epi32(v, _mm512_zextsi128_si512(_mm_cvtsi32_si128(x))); }
  static void StoreSums4(float* y, F a, F b, F c, F d, const float* bias) {
    const auto fold = [](__m512 v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    };
    StoreSums4Y(y, fold(a), fold(b), fold(c), fold(d), bias);
  }
};
#endif

struct X86I8 {
  static constexpr bool kSimd = true;
  static constexpr int W = 32;  // byte lanes
  using I = __m256i;
  using FV = Avx2V;
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  static constexpr bool kVnni = true;
#else
  static constexpr bool kVnni = false;
#endif

  // Vectors per chunk, codes per chunk, bytes of B per chunk.
  template <int BITS>
  static constexpr int Vectors() {
    return BITS == 3 ? 2 : 8 / BITS;
  }
  template <int BITS>
  static constexpr int64_t Codes() {
    return int64_t(Vectors<BITS>()) * W;
  }
  template <int BITS>
  static constexpr int64_t ChunkBytes() {
    return BITS == 3 ? 24 : 32;
  }
  // Without VNNI, 8-bit codes enter the dot product as c - 128 (signed), so
  // that vpmaddubsw's pairwise int16 sums cannot saturate.
  template <int BITS>
  static constexpr int CodeOffset() {
    return (BITS == 8 && !kVnni) ? 128 : 0;
  }

  // Where code q of a chunk lands: vector s, lane L -> position s * 32 + L.
  // 2/4/8 bits: lane L of vector s holds code L * S + s (nibbles, 2-bit
  // fields of byte L). 3 bits: lane L = 4j + i of vector s holds code
  // 8j + 4s + i (3-byte group j holds codes 8j..8j+7).
  template <int BITS>
  static int64_t LanePosition(int64_t q) {
    if constexpr (BITS == 3) {
      const int64_t g = q / 8, r = q % 8;
      return (r / 4) * W + g * 4 + r % 4;
    } else {
      constexpr int S = Vectors<BITS>();
      return (q % S) * W + q / S;
    }
  }

  static I IZero() { return _mm256_setzero_si256(); }
  static I LoadI(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void StoreI(void* p, I v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static __m256 ToFloat(I v) { return _mm256_cvtepi32_ps(v); }
  static __m256 MulF(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }

  template <int BITS>
  static void Unpack(const uint8_t* src, I* out) {
    if constexpr (BITS == 3) {
      Unpack3Y(src, out);
    } else {
      UnpackBytes<BITS>(LoadI(src), out);
    }
  }
  // 32 codes from W * BITS / 8 bytes (2 and 4 bits; the GEMM path's short
  // blocks): code q lands at ShortPosition(q) (4 bits: nibbles low then high,
  // 16 bytes each; 2 bits: 2-bit field s of the 8 bytes at 8 s).
  template <int BITS>
  static int64_t ShortPosition(int64_t q) {
    constexpr int S = 8 / BITS;
    return (q % S) * (W / S) + q / S;
  }
  template <int BITS>
  static I UnpackShort(const uint8_t* src) {
    const __m128i mask = _mm_set1_epi8(char((1 << BITS) - 1));
    if constexpr (BITS == 4) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), mask), _mm_and_si128(x, mask));
    } else {
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(x, mask), _mm_and_si128(_mm_srli_epi16(x, 2), mask));
      const __m128i hi =
          _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(x, 4), mask), _mm_and_si128(_mm_srli_epi16(x, 6), mask));
      return _mm256_set_m128i(hi, lo);
    }
  }
  // Unpack of 2/4/8 bits from a loaded chunk: each byte unpacks on its own.
  template <int BITS>
  static void UnpackBytes(__m256i v, I* out) {
    if constexpr (BITS == 8) {
      out[0] = CodeOffset<8>() ? _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))) : v;
    } else {
      constexpr int S = Vectors<BITS>();
      const __m256i mask = _mm256_set1_epi8(char((1 << BITS) - 1));
      for (int s = 0; s < S; ++s) out[s] = _mm256_and_si256(_mm256_srli_epi16(v, BITS * s), mask);
    }
  }

  // The dot product of one chunk, in two steps: DotNarrow adds the chunk's
  // codes x activations to a narrow accumulator (AVX2, 2/3/4 bits: int16
  // pairs; otherwise int32 lanes of four bytes), which may take up to
  // NarrowChunks() chunks before Widen must add it to the int32 lanes.
  template <int BITS>
  static constexpr int64_t NarrowChunks() {
    // AVX2: one chunk adds at most S x 2 x max code x 127 to an int16 lane.
    return (kVnni || BITS == 8) ? (int64_t(1) << 40)
                                : 32767 / (int64_t(Vectors<BITS>()) * 2 * ((1 << BITS) - 1) * 127);
  }
  template <int BITS>
  static I DotNarrow(I acc, const I* cv, const I* av) {
    constexpr int S = Vectors<BITS>();
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    for (int s = 0; s < S; ++s) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(cv[s]), "v"(av[s]));  // see Dot1
    return acc;
#elif defined(__AVXVNNI__)
    for (int s = 0; s < S; ++s) __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(cv[s]), "x"(av[s]));
    return acc;
#else
    if constexpr (BITS == 8) {
      // |c - 128| <= 128 fits unsigned bytes and |q| <= 127: pairs stay below 2^15.
      const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(cv[0]), _mm256_sign_epi8(av[0], cv[0]));
      return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    } else {
      for (int s = 0; s < S; ++s) acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(cv[s], av[s]));
      return acc;
    }
#endif
  }
  template <int BITS>
  static I Widen(I acc, I narrow) {
    if constexpr (kVnni || BITS == 8) {
      return _mm256_add_epi32(acc, narrow);
    } else {
      return _mm256_add_epi32(acc, _mm256_madd_epi16(narrow, _mm256_set1_epi16(1)));
    }
  }

  // The GEMM path's vectors: 64 bytes with AVX512-VNNI, else 32.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  using Gemm = X86GemmZ;
#else
  using Gemm = X86GemmY;
#endif
  // One vector of the GEMM path (int8_gemm.h): acc += codes x activations,
  // int32 lanes on VNNI and for 8 bits, int16 pairs otherwise (at most
  // NarrowVectors() of them before GemmWiden).
  template <int BITS>
  static Gemm::I Dot1(Gemm::I acc, Gemm::I cv, Gemm::I av) {
    // VNNI: written as asm because GCC 12 copies the accumulator of the
    // intrinsics in and out of another register around every dot product
    // of the GEMM tile's loop (24 extra moves per 12 vpdpbusd, measured).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(cv), "v"(av));
    return acc;
#elif defined(__AVXVNNI__)
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(cv), "x"(av));
    return acc;
#else
    if constexpr (BITS == 8) {
      const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(cv), _mm256_sign_epi8(av, cv));
      return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    } else {
      return _mm256_add_epi16(acc, _mm256_maddubs_epi16(cv, av));
    }
#endif
  }
  // Vector s of a GEMV chunk (int8_gemv.h): Gemm::UnpackByte, plus the
  // 8-bit code offset of the AVX2 build (whose Gemm vectors are 32 bytes).
  template <int BITS>
  static Gemm::I GemvCodes(Gemm::I raw, int s) {
    if constexpr (CodeOffset<BITS>() != 0) {
      return Gemm::FlipTopBit(raw);
    } else {
      return Gemm::template UnpackByte<BITS>(raw, s);
    }
  }
  template <int BITS>
  static constexpr int64_t NarrowVectors() {
    return (kVnni || BITS == 8) ? (int64_t(1) << 40) : 32767 / (2 * ((1 << BITS) - 1) * 127);
  }
  // The int32 lanes of a Dot1 accumulator.
  template <int BITS>
  static Gemm::I GemmWiden(Gemm::I acc) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
    return acc;
#else
    return BITS == 8 ? acc : _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
#endif
  }

  // Transpose of P vectors seen as P x P elements of 32 / P bytes:
  // element d of out[x] = element x of in[d]. P = 1, 2, 4 or 8.
  template <int P>
  static void Transpose(const I* in, I* out) {
    if constexpr (P == 1) {
      out[0] = in[0];
    } else if constexpr (P == 2) {
      out[0] = _mm256_permute2x128_si256(in[0], in[1], 0x20);
      out[1] = _mm256_permute2x128_si256(in[0], in[1], 0x31);
    } else if constexpr (P == 4) {
      const __m256i t0 = _mm256_unpacklo_epi64(in[0], in[1]), t1 = _mm256_unpackhi_epi64(in[0], in[1]);
      const __m256i t2 = _mm256_unpacklo_epi64(in[2], in[3]), t3 = _mm256_unpackhi_epi64(in[2], in[3]);
      out[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
      out[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
      out[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
      out[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
    } else {
      __m256i a[8], b[8];
      for (int i = 0; i < 4; ++i) {
        a[2 * i] = _mm256_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i) {
        for (int h = 0; h < 2; ++h) {
          b[4 * i + 2 * h] = _mm256_unpacklo_epi64(a[4 * i + h], a[4 * i + 2 + h]);
          b[4 * i + 2 * h + 1] = _mm256_unpackhi_epi64(a[4 * i + h], a[4 * i + 2 + h]);
        }
      }
      for (int x = 0; x < 4; ++x) {
        out[x] = _mm256_permute2x128_si256(b[x], b[4 + x], 0x20);
        out[x + 4] = _mm256_permute2x128_si256(b[x], b[4 + x], 0x31);
      }
    }
  }

  // 8 lane scales from p[0 .. bpc): lane d gets p[d * bpc / 8]. Reads 8 floats.
  static __m256 LaneScales(const float* p, int bpc) {
    if (bpc == 1) return _mm256_broadcast_ss(p);
    const __m256i idx2 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i idx4 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256i idx8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), bpc == 2 ? idx2 : (bpc == 4 ? idx4 : idx8));
  }

  static float DotF(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = Avx2V::Hsum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  }

  // Sum of the 8 int32 lanes.
  static int32_t HsumI32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }

  // Exact sum of codes[i] * act[i].
  static int32_t DotBytes(const uint8_t* codes, const int8_t* act, int64_t n) {
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(act + i)));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(c, a));
    }
    int32_t total = HsumI32(acc);
    for (; i < n; ++i) total += int32_t(codes[i]) * int32_t(act[i]);
    return total;
  }

  // q = round(a * 127 / max|a|) (to nearest even, as the scalar build), their
  // sum, and the scale max|a| / 127 (0 for an all-zero block).
  static float QuantizeBlock(const float* a, int64_t n, int8_t* q, int32_t* qsum) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(a + i), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = AbsMaxFrom(a, i, n, _mm_cvtss_f32(m4));
    if (!(amax > 0.0f)) return QuantizeZeroBlock(n, q, qsum);
    const float inv = 127.0f / amax;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i vsum = _mm256_setzero_si256();
    i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i x = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(a + i), vinv));
      vsum = _mm256_add_epi32(vsum, x);
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(p16, p16));
    }
    *qsum = QuantizeFrom(a, i, n, inv, q, HsumI32(vsum));
    return amax / 127.0f;
  }

  static void HalfToFloat(const uint16_t* src, float* dst, int64_t n) { Avx2V::HalfToFloat(src, dst, n); }
  static void FloatToHalf(const float* src, uint16_t* dst, int64_t n) { Avx2V::FloatToHalf(src, dst, n); }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
