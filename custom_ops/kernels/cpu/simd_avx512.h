// AVX-512 (F + BW + VL) vector of 16 floats. Include after defining
// GPTQ_ISA_NS, in a unit compiled with -mavx512f -mavx512bw -mavx512vl -mavx2
// -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "half.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

struct Avx512V {
  static constexpr int W = 16;
  using F = __m512;

  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float x) { return _mm512_set1_ps(x); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // The first n (1..16) lanes; the others read as zero / are not written.
  static F LoadFirst(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p); }
  static void StoreFirst(float* p, F v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static float Hsum(F v) { return _mm512_reduce_add_ps(v); }

  // Transposes the 16 x 16 matrix whose rows are r[0..16), in place.
  static void Transpose(F* r) {
    F a[16], b[16];
    for (int i = 0; i < 8; ++i) {  // pairs of rows, interleaved within 128-bit lanes
      a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // b[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j
      const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]);
      const __m512d a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
      b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
      b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
      b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
      b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int j = 0; j < 4; ++j) {  // gather lane L of b[j], b[4+j], b[8+j], b[12+j] into column 4L + j
      const F d0 = _mm512_shuffle_f32x4(b[j], b[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
      const F d1 = _mm512_shuffle_f32x4(b[j], b[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
      const F e0 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(2, 0, 2, 0));
      const F e1 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(3, 1, 3, 1));
      r[j] = _mm512_shuffle_f32x4(d0, e0, _MM_SHUFFLE(2, 0, 2, 0));
      r[8 + j] = _mm512_shuffle_f32x4(d0, e0, _MM_SHUFFLE(3, 1, 3, 1));
      r[4 + j] = _mm512_shuffle_f32x4(d1, e1, _MM_SHUFFLE(2, 0, 2, 0));
      r[12 + j] = _mm512_shuffle_f32x4(d1, e1, _MM_SHUFFLE(3, 1, 3, 1));
    }
  }
  static F Gather(const float* base, const int32_t* idx) {
    return _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4);
  }

  // See ScalarV::Unpack. 4/2/8 bits: 16 bytes, lane j = byte j. 3 bits: 48
  // bytes, lane j = the 3-byte group j holding codes 8j..8j+7.
  template <int BITS>
  static void Unpack(const uint8_t* src, F* out) {
    if constexpr (BITS == 3) {
      // Exactly 48 bytes (32 + 16; a masked byte load is much slower), dwords
      // 3q..3q+2 to 128-bit lane q, then each 3-byte group to its own dword.
      __m512i v = _mm512_inserti32x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))),
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32)), 2);
      v = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0), v);
      const __m512i shuf = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
      v = _mm512_shuffle_epi8(v, shuf);
      const __m512i m7 = _mm512_set1_epi32(7);
      for (int s = 0; s < 8; ++s) out[s] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 3 * s), m7));
    } else {
      const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      if constexpr (BITS == 8) {
        out[0] = _mm512_cvtepi32_ps(x);
      } else {
        constexpr int kS = 8 / BITS;
        const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
        for (int s = 0; s < kS; ++s) {
          out[s] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, BITS * s), mask));
        }
      }
    }
  }

  static void HalfToFloat(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    }
    for (; i < n; ++i) dst[i] = HalfToFloatScalar(src[i]);
  }
  static void FloatToHalf(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; ++i) dst[i] = FloatToHalfScalar(src[i]);
  }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
