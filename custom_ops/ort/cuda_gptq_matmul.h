// onnxruntime CUDA execution provider kernel of onnx_gptq.GptqMatMul.
//
// register.cc calls onnx_gptq_register_cuda_ops() when the library is built
// with ONNX_GPTQ_WITH_CUDA (custom_ops/cuda.cmake defines it).
#pragma once

#include "ort_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// Adds the CUDAExecutionProvider GptqMatMul ops (float32, float16, bfloat16)
// to `domain` (the "onnx_gptq" domain the CPU ops live in). `api` is the table
// the library obtained, `api_version` the OrtCustomOp::version the CPU ops use
// (>= ONNX_GPTQ_ORT_API_MIN) and `shape_inference` (0/1) whether they declare
// shape inference: the CUDA ops are described by the same InitGptqOpDef.
// The op objects are static: they outlive every session, as onnxruntime requires.
// Returns nullptr on success, else a status the caller returns to onnxruntime.
OrtStatus* onnx_gptq_register_cuda_ops(const OrtApi* api, uint32_t api_version, OrtCustomOpDomain* domain,
                                       int shape_inference);

#ifdef __cplusplus
}
#endif
