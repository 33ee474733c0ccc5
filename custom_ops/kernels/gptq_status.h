/* Status codes of the GptqMatMul kernels, CPU and CUDA: one vocabulary.
 *
 * Plain C so that the CUDA entry points (gptq_cuda.h), the CPU kernel
 * (cpu/gptq_matmul_cpu.h) and the onnxruntime glue (ort/gptq_op.h) all include
 * it. ONNX_GPTQ_STATUS_LIST is the only place a code is defined: the enum
 * below, onnx_gptq_status_name/onnx_gptq_status_string and Python's view
 * (onnx_gptq.runtime.custom_ops.status_codes(), which asks the library) are
 * all generated from it, so no number is ever copied by hand.
 *
 * Codes are contiguous from 0, and a code is never renumbered: append new ones.
 */
#ifndef ONNX_GPTQ_STATUS_H_
#define ONNX_GPTQ_STATUS_H_

#if defined(_WIN32)
#define ONNX_GPTQ_STATUS_EXPORT __declspec(dllexport)
#else
#define ONNX_GPTQ_STATUS_EXPORT __attribute__((visibility("default")))
#endif

/* X(NAME, value, description) */
#define ONNX_GPTQ_STATUS_LIST(X)                                                                      \
  X(OK, 0, "success")                                                                                \
  X(ERR_NULL_POINTER, 1, "a required pointer (A, B, scales, Y or g_idx) is null")                    \
  X(ERR_BITS, 2, "bits must be 2, 3, 4 or 8")                                                        \
  X(ERR_BLOCK_SIZE, 3, "block_size must be >= 1 (and < 2**31)")                                      \
  X(ERR_SHAPE, 4, "bad sizes: need K >= 1, M >= 0, N >= 0, K and N < 2**31, M <= 4194240")           \
  X(ERR_N_GROUPS, 5, "n_groups must be in [1, K], and equal ceil(K / block_size) when g_idx is absent") \
  X(ERR_DTYPE, 6, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)")                        \
  X(ERR_G_IDX, 7, "a g_idx entry lies outside [0, n_groups)")                                        \
  X(ERR_LAUNCH, 8, "the CUDA runtime reported an error (see onnx_gptq_cuda_last_launch_error)")      \
  X(ERR_INVALID_ARGUMENT, 9, "the kernel's parameters disagree with each other")                    \
  X(ERR_OUT_OF_MEMORY, 10, "out of memory")

#ifdef __cplusplus
extern "C" {
#endif

typedef enum OnnxGptqStatus {
#define ONNX_GPTQ_STATUS_ENUMERATOR(NAME, VALUE, TEXT) ONNX_GPTQ_##NAME = VALUE,
  ONNX_GPTQ_STATUS_LIST(ONNX_GPTQ_STATUS_ENUMERATOR)
#undef ONNX_GPTQ_STATUS_ENUMERATOR
} OnnxGptqStatus;

/* "ERR_BITS" for ONNX_GPTQ_ERR_BITS; NULL for a number that is not a code
 * (so a caller can list every code by counting up from 0). */
ONNX_GPTQ_STATUS_EXPORT const char* onnx_gptq_status_name(int status);

/* A static, human-readable description ("unknown onnx_gptq status" for a
 * number that is not a code). */
ONNX_GPTQ_STATUS_EXPORT const char* onnx_gptq_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* ONNX_GPTQ_STATUS_H_ */
