// Scalar steps of QuantizeBlock shared by the int8 traits: int8_scalar.h
// quantizes whole blocks with them, int8_simd_x86.h the tails its vectors
// leave, so that the two agree bit for bit. Include after defining GPTQ_ISA_NS.
#pragma once

#include <cstdint>

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

// max(amax, |a_i|) over i in [from, n).
inline float AbsMaxFrom(const float* a, int64_t from, int64_t n, float amax) {
  for (int64_t i = from; i < n; ++i) amax = __builtin_fabsf(a[i]) > amax ? __builtin_fabsf(a[i]) : amax;
  return amax;
}

// q_i = round(a_i * inv), to nearest even, over i in [from, n); returns
// `total` plus the sum of those q_i.
inline int32_t QuantizeFrom(const float* a, int64_t from, int64_t n, float inv, int8_t* q, int32_t total) {
  for (int64_t i = from; i < n; ++i) {
    const int32_t x = int32_t(__builtin_nearbyintf(a[i] * inv));
    q[i] = int8_t(x);
    total += x;
  }
  return total;
}

// An all-zero block of n values: codes and their sum 0; returns its scale, 0.
inline float QuantizeZeroBlock(int64_t n, int8_t* q, int32_t* qsum) {
  for (int64_t i = 0; i < n; ++i) q[i] = 0;
  *qsum = 0;
  return 0.0f;
}

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
