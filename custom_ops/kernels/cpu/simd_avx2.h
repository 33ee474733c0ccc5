// AVX2 + FMA + F16C vector of 8 floats. Include after defining GPTQ_ISA_NS, in a
// unit compiled with at least -mavx2 -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "half.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

// The 24 bytes of a 3-bit chunk, 3-byte group j (codes 8j..8j+7) in dword j
// with its top byte zero: the first step of both 3-bit unpacks (Avx2V,
// X86I8). Reads exactly 24 bytes (16 + 8); dwords 3..5 go to the upper
// 128-bit lane, then each group to its own dword.
inline __m256i Load3BitGroups(const uint8_t* src) {
  __m256i v = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))),
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 16)), 1);
  v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0));
  const __m256i shuf = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,  //
                                        0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return _mm256_shuffle_epi8(v, shuf);
}

struct Avx2V {
  static constexpr int W = 8;
  using F = __m256;

  static F Zero() { return _mm256_setzero_ps(); }
  static F Set1(float x) { return _mm256_set1_ps(x); }
  static F Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // The first n (1..8) lanes; the others read as zero / are not written.
  static __m256i FirstLanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static F LoadFirst(const float* p, int n) { return _mm256_maskload_ps(p, FirstLanes(n)); }
  static void StoreFirst(float* p, F v, int n) { _mm256_maskstore_ps(p, FirstLanes(n), v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static float Hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Transposes the 8 x 8 matrix whose rows are r[0..8), in place.
  static void Transpose(F* r) {
    F a[8], b[8];
    for (int i = 0; i < 4; ++i) {  // pairs of rows, interleaved within 128-bit lanes
      a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // b[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j
      const __m256d a0 = _mm256_castps_pd(a[4 * i]), a1 = _mm256_castps_pd(a[4 * i + 1]);
      const __m256d a2 = _mm256_castps_pd(a[4 * i + 2]), a3 = _mm256_castps_pd(a[4 * i + 3]);
      b[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a0, a2));
      b[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a0, a2));
      b[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(a1, a3));
      b[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(a1, a3));
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = _mm256_permute2f128_ps(b[j], b[4 + j], 0x20);
      r[4 + j] = _mm256_permute2f128_ps(b[j], b[4 + j], 0x31);
    }
  }
  static F Gather(const float* base, const int32_t* idx) {
    return _mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  }

  // See ScalarV::Unpack. 4/2/8 bits: 8 bytes, lane j = byte j. 3 bits: 24
  // bytes, lane j = the 3-byte group j holding codes 8j..8j+7.
  template <int BITS>
  static void Unpack(const uint8_t* src, F* out) {
    if constexpr (BITS == 3) {
      const __m256i v = Load3BitGroups(src);
      const __m256i m7 = _mm256_set1_epi32(7);
      for (int s = 0; s < 8; ++s) out[s] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3 * s), m7));
    } else {
      const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
      if constexpr (BITS == 8) {
        out[0] = _mm256_cvtepi32_ps(x);
      } else {
        constexpr int kS = 8 / BITS;
        const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
        for (int s = 0; s < kS; ++s) {
          out[s] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, BITS * s), mask));
        }
      }
    }
  }

  static void HalfToFloat(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    }
    for (; i < n; ++i) dst[i] = HalfToFloatScalar(src[i]);
  }
  static void FloatToHalf(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; ++i) dst[i] = FloatToHalfScalar(src[i]);
  }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
