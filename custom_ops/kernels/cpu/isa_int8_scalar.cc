// Portable build of the int8 path (accuracy_level 4): the fallback and the reference.
#define GPTQ_ISA_NS isa_int8_scalar
#include "internal.h"
#include "simd_scalar.h"
#include "int8_scalar.h"
#include "int8_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunInt8Scalar(const GptqMatMulParams& params, const ParallelRunner& runner) {
  return isa_int8_scalar::int8::Run<isa_int8_scalar::ScalarI8>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
