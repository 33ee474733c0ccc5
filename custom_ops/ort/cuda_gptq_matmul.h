// onnxruntime CUDA execution provider kernel of onnx_gptq.GptqMatMul.
//
// register.cc calls onnx_gptq_register_cuda_ops() when the library is built
// with ONNX_GPTQ_WITH_CUDA (custom_ops/cuda.cmake defines it).
#pragma once

#include "ort_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// Adds the CUDAExecutionProvider GptqMatMul op to `domain` (the "onnx_gptq"
// domain the CPU op lives in). `api` is the table the library obtained and
// `api_version` the version it asked GetApi for (>= ONNX_GPTQ_ORT_API_MIN);
// shape inference is declared only when api_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER.
// The op objects are static: they outlive every session, as onnxruntime requires.
// Returns nullptr on success, else a status the caller returns to onnxruntime.
OrtStatus* onnx_gptq_register_cuda_ops(const OrtApi* api, uint32_t api_version, OrtCustomOpDomain* domain);

#ifdef __cplusplus
}
#endif
