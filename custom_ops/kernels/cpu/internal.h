// Shared between the ISA-neutral translation unit (gptq_matmul_cpu.cc) and the
// per-ISA ones (isa_*.cc). The per-ISA units are compiled with -mavx2 /
// -mavx512f...; they must not instantiate standard-library templates (a copy
// built with AVX-512 could be the one the linker keeps for everyone), so
// anything that needs the standard library lives behind these functions,
// which are compiled without ISA flags.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gptq_matmul_cpu.h"

namespace onnx_gptq {
namespace cpu {
namespace detail {

// 64-byte aligned memory; nullptr when out of memory.
void* AlignedAlloc(size_t bytes);
void AlignedFree(void* p);

// A per-thread buffer of at least `bytes` bytes that stays valid until the
// same thread asks for the same slot again; nullptr when out of memory.
// Slots let one task hold several buffers at once.
enum ScratchSlot : int { kScratchRow = 0, kScratchDequant = 1, kScratchGroups = 2, kNumScratchSlots = 3 };
// The int8 path's scratch slots (unpacked codes of a column tile).
constexpr ScratchSlot kScratchCodes = kScratchDequant;
void* ThreadScratch(ScratchSlot slot, size_t bytes);

// Entry points of the per-ISA translation units. `params` has been checked.
Status RunScalar(const GptqMatMulParams& params, const ParallelRunner& runner);
Status RunAvx2(const GptqMatMulParams& params, const ParallelRunner& runner);
Status RunAvx512(const GptqMatMulParams& params, const ParallelRunner& runner);
// accuracy_level 4 (int8_impl.h), one per instruction set.
Status RunInt8Scalar(const GptqMatMulParams& params, const ParallelRunner& runner);
Status RunInt8Avx2(const GptqMatMulParams& params, const ParallelRunner& runner);
Status RunInt8AvxVnni(const GptqMatMulParams& params, const ParallelRunner& runner);
Status RunInt8Avx512Vnni(const GptqMatMulParams& params, const ParallelRunner& runner);

}  // namespace detail
}  // namespace cpu
}  // namespace onnx_gptq
