// The CPU execution provider's GptqMatMul ops (float32 and float16).
#pragma once

#include <cstdint>

#include "ort_abi.h"

namespace onnx_gptq {

// Adds the CPU ops to `domain`. Returns nullptr or an error status.
OrtStatus* RegisterCpuOps(OrtCustomOpDomain* domain, const OrtApi* api, uint32_t op_version, bool shape_inference);

}  // namespace onnx_gptq
