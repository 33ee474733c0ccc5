// The CPU execution provider's GptqMatMul ops: float32 and float16, plus bfloat16
// and float64 ops whose kernel creation fails with a message naming those two.
#pragma once

#include <cstdint>

#include "ort_abi.h"

namespace onnx_gptq {

// Adds the CPU ops to `domain`. Returns nullptr or an error status.
OrtStatus* RegisterCpuOps(OrtCustomOpDomain* domain, const OrtApi* api, uint32_t op_version, bool shape_inference);

}  // namespace onnx_gptq
