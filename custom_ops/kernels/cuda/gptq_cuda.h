/* C entry points of the CUDA kernels of onnx_gptq.GptqMatMul (docs/CUSTOM_OP.md).
 *
 * Math only: raw device pointers, sizes and a cudaStream_t (passed as void*),
 * status codes back. No onnxruntime or torch types. Every function validates
 * its sizes before launching anything and launches asynchronously on `stream`.
 */
#ifndef ONNX_GPTQ_CUDA_H_
#define ONNX_GPTQ_CUDA_H_

#include <stdint.h>

#include "../gptq_status.h"

#if defined(_WIN32)
#define ONNX_GPTQ_CUDA_EXPORT __declspec(dllexport)
#else
#define ONNX_GPTQ_CUDA_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Every function returns a code of ../gptq_status.h (ONNX_GPTQ_OK, ONNX_GPTQ_ERR_*),
 * the vocabulary the CPU kernel shares; onnx_gptq_status_string() describes one. */

/* Y[M, N] = A[M, K] @ dequant(B)^T (+ bias), accumulated in float32.
 *
 * A: T [M, K]; B: uint8 [N, n_blocks, blob_size] (n_blocks = ceil(K / block_size),
 * blob_size = ceil(block_size * bits / 8)); scales: T [N, n_groups];
 * zero_points: uint8 [N, n_groups] or NULL (symmetric: 2**(bits-1));
 * g_idx: int32 [K] or NULL (then group of column k is k / block_size and
 * n_groups must equal n_blocks); bias: T [N] or NULL; Y: T [M, N].
 * dtype: 0 float32, 1 float16, 2 bfloat16. stream: a cudaStream_t (NULL = legacy default).
 *
 * g_idx entries are not range-checked here (that needs a device->host copy);
 * an out-of-range entry yields NaN in the affected outputs, never an
 * out-of-bounds read. Call onnx_gptq_cuda_check_g_idx once per g_idx tensor
 * to get ONNX_GPTQ_ERR_G_IDX instead.
 */
ONNX_GPTQ_CUDA_EXPORT int onnx_gptq_cuda_matmul(const void* A, const uint8_t* B, const void* scales,
                                                const uint8_t* zero_points, const int32_t* g_idx,
                                                const void* bias, void* Y, int64_t M, int64_t K,
                                                int64_t N, int bits, int64_t block_size,
                                                int64_t n_groups, int dtype, void* stream);

/* Checks that every g_idx[k], k < K, lies in [0, n_groups). Synchronizes `stream`.
 * Returns ONNX_GPTQ_OK, ONNX_GPTQ_ERR_G_IDX (first bad column in *bad_column
 * when non-NULL) or another error code. */
ONNX_GPTQ_CUDA_EXPORT int onnx_gptq_cuda_check_g_idx(const int32_t* g_idx, int64_t K, int64_t n_groups,
                                                     int64_t* bad_column, void* stream);

/* The CUDA runtime's message for the last ONNX_GPTQ_ERR_LAUNCH in this thread
 * (empty string when none). */
ONNX_GPTQ_CUDA_EXPORT const char* onnx_gptq_cuda_last_launch_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ONNX_GPTQ_CUDA_H_ */
