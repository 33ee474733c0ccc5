// Portable build of the kernel (no ISA flags): the fallback and the reference.
#define GPTQ_ISA_NS isa_scalar
#include "internal.h"
#include "simd_scalar.h"
#include "kernel_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunScalar(const GptqMatMulParams& params, const ParallelRunner& runner) {
  return isa_scalar::Run<isa_scalar::ScalarV>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
