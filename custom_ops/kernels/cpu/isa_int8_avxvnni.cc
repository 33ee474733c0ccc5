// AVX-VNNI build of the int8 path (accuracy_level 4); compiled with -mavxvnni -mavx2 -mfma -mf16c and called
// only when the CPU reports those (gptq_matmul_cpu.cc).
#define GPTQ_ISA_NS isa_int8_avxvnni
#include "internal.h"
#include "simd_avx2.h"
#include "int8_simd_x86.h"
#include "int8_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunInt8AvxVnni(const GptqMatMulParams& params, const ParallelRunner& runner) {
  return isa_int8_avxvnni::int8::Run<isa_int8_avxvnni::X86I8>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
