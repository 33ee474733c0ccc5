// Portable int8 traits for int8_impl.h: no SIMD units, so every block takes
// the natural-order path; the fallback and the reference the x86 builds must
// agree with bit for bit in their integer parts. Include after defining
// GPTQ_ISA_NS and including simd_scalar.h.
#pragma once

#include <cstdint>

#include "int8_quantize.h"

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

struct ScalarI8 {
  static constexpr bool kSimd = false;
  static constexpr int W = 1;
  using I = int32_t;
  using FV = ScalarV;

  template <int BITS>
  static constexpr int Vectors() {
    return 1;
  }
  template <int BITS>
  static constexpr int64_t Codes() {
    return 1;
  }
  template <int BITS>
  static constexpr int64_t ChunkBytes() {
    return 1;
  }
  template <int BITS>
  static constexpr int CodeOffset() {
    return 0;
  }
  template <int BITS>
  static int64_t LanePosition(int64_t q) {
    return q;
  }

  static I IZero() { return 0; }
  static I LoadI(const void* p) { return *static_cast<const int8_t*>(p); }
  static void StoreI(void* p, I v) { *static_cast<int8_t*>(p) = int8_t(v); }
  static float ToFloat(I v) { return float(v); }
  static float MulF(float a, float b) { return a * b; }
  template <int BITS>
  static void Unpack(const uint8_t* src, I* out) {
    out[0] = src[0];
  }
  template <int BITS>
  static constexpr int64_t NarrowChunks() {
    return 1;
  }
  template <int BITS>
  static I DotNarrow(I acc, const I* cv, const I* av) {
    return acc + cv[0] * av[0];
  }
  template <int BITS>
  static I Widen(I acc, I narrow) {
    return acc + narrow;
  }
  static float LaneScales(const float* p, int) { return p[0]; }

  static float DotF(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  static int32_t DotBytes(const uint8_t* codes, const int8_t* act, int64_t n) {
    int32_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += int32_t(codes[i]) * int32_t(act[i]);
    return s;
  }
  static float QuantizeBlock(const float* a, int64_t n, int8_t* q, int32_t* qsum) {
    const float amax = AbsMaxFrom(a, 0, n, 0.0f);
    if (!(amax > 0.0f)) return QuantizeZeroBlock(n, q, qsum);
    *qsum = QuantizeFrom(a, 0, n, 127.0f / amax, q, 0);
    return amax / 127.0f;
  }
  static void HalfToFloat(const uint16_t* src, float* dst, int64_t n) { ScalarV::HalfToFloat(src, dst, n); }
  static void FloatToHalf(const float* src, uint16_t* dst, int64_t n) { ScalarV::FloatToHalf(src, dst, n); }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
