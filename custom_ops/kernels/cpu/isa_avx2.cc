// AVX2 + FMA + F16C build of the kernel; compiled with -mavx2 -mfma -mf16c and
// called only when the CPU reports those (gptq_matmul_cpu.cc).
#define GPTQ_ISA_NS isa_avx2
#include "internal.h"
#include "simd_avx2.h"
#include "kernel_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunAvx2(const GptqMatMulParams& params, const ParallelRunner& runner) {
  return isa_avx2::Run<isa_avx2::Avx2V>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
