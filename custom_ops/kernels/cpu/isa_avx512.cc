// AVX-512 (F, BW, VL) build of the kernel; compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx2 -mfma -mf16c and called only when the CPU reports those
// (gptq_matmul_cpu.cc). Blocks shorter than one 16-lane chunk would leave
// only the scalar tail path, so those run on 8-lane vectors instead.
#define GPTQ_ISA_NS isa_avx512
#include "internal.h"
#include "simd_avx2.h"
#include "simd_avx512.h"
#include "kernel_impl.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

Status RunAvx512(const GptqMatMulParams& params, const ParallelRunner& runner) {
  using namespace isa_avx512;
  if (ChunkCodes(params.bits, Avx512V::W) > params.block_size) return Run<Avx2V>(params, runner);
  return Run<Avx512V>(params, runner);
}

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
