// AVX2 build of the int8 path (accuracy_level 4); compiled with -mavx2 -mfma -mf16c and called
// only when the CPU reports those (gptq_matmul_cpu.cc).
#define GPTQ_ISA_NS isa_int8_avx2
#include "internal.h"
#include "simd_avx2.h"
#include "int8_simd_x86.h"
#include "int8_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunInt8Avx2(const GptqMatMulParams& params, const ParallelRunner& runner) {
  return isa_int8_avx2::int8::Run<isa_int8_avx2::X86I8>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
