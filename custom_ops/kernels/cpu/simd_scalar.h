// Portable "vector" of one float: the fallback for CPUs without AVX2, and the
// reference the SIMD paths must agree with. Include after defining GPTQ_ISA_NS.
#pragma once

#include <cstdint>

#include "half.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

struct ScalarV {
  static constexpr int W = 1;  // lanes
  using F = float;

  static F Zero() { return 0.0f; }
  static F Set1(float x) { return x; }
  static F Load(const float* p) { return *p; }
  static void Store(float* p, F v) { *p = v; }
  static F LoadFirst(const float* p, int) { return *p; }  // n is always 1
  static void StoreFirst(float* p, F v, int) { *p = v; }
  static F Fma(F a, F b, F c) { return a * b + c; }
  static F Sub(F a, F b) { return a - b; }
  static F Mul(F a, F b) { return a * b; }
  static F Add(F a, F b) { return a + b; }
  static float Hsum(F v) { return v; }
  static void Transpose(F*) {}  // a 1 x 1 matrix
  static F Gather(const float* base, const int32_t* idx) { return base[idx[0]]; }

  // Unpacks one chunk of W*S codes (see kernel_impl.h) into S vectors:
  // lane j of vector s is code j*S + s of the chunk.
  template <int BITS>
  static void Unpack(const uint8_t* src, F* out) {
    if constexpr (BITS == 3) {
      const uint32_t v = uint32_t(src[0]) | (uint32_t(src[1]) << 8) | (uint32_t(src[2]) << 16);
      for (int s = 0; s < 8; ++s) out[s] = float((v >> (3 * s)) & 7u);
    } else {
      constexpr int kS = 8 / BITS;
      constexpr uint32_t kMask = (1u << BITS) - 1u;
      for (int s = 0; s < kS; ++s) out[s] = float((uint32_t(src[0]) >> (BITS * s)) & kMask);
    }
  }

  static void HalfToFloat(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloatScalar(src[i]);
  }
  static void FloatToHalf(const float* src, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = FloatToHalfScalar(src[i]);
  }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
