/* C entry points of the CUDA kernels of onnx_gptq.GptqMatMul (docs/CUSTOM_OP.md).
 *
 * Math only: raw device pointers, sizes and a cudaStream_t (passed as void*),
 * status codes back. No onnxruntime or torch types. Every function validates
 * its sizes before launching anything and launches asynchronously on `stream`.
 */
#ifndef ONNX_GPTQ_CUDA_H_
#define ONNX_GPTQ_CUDA_H_

#include <stdint.h>

#if defined(_WIN32)
#define ONNX_GPTQ_CUDA_EXPORT __declspec(dllexport)
#else
#define ONNX_GPTQ_CUDA_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. 0 is success; the rest name what was wrong. */
enum OnnxGptqCudaStatus {
  ONNX_GPTQ_CUDA_OK = 0,
  ONNX_GPTQ_CUDA_ERR_NULL_POINTER = 1,    /* a required pointer (A, B, scales, Y) is null */
  ONNX_GPTQ_CUDA_ERR_BITS = 2,            /* bits not in {2, 3, 4, 8} */
  ONNX_GPTQ_CUDA_ERR_BLOCK_SIZE = 3,      /* block_size < 1 */
  ONNX_GPTQ_CUDA_ERR_SHAPE = 4,           /* M < 0, K < 1, N < 0, or sizes overflow */
  ONNX_GPTQ_CUDA_ERR_N_GROUPS = 5,        /* n_groups < 1, or != n_blocks without g_idx */
  ONNX_GPTQ_CUDA_ERR_DTYPE = 6,           /* dtype not 0 (fp32), 1 (fp16) or 2 (bf16) */
  ONNX_GPTQ_CUDA_ERR_G_IDX = 7,           /* a g_idx entry outside [0, n_groups) */
  ONNX_GPTQ_CUDA_ERR_LAUNCH = 8,          /* the CUDA runtime reported an error */
};

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
 * to get ONNX_GPTQ_CUDA_ERR_G_IDX instead.
 */
ONNX_GPTQ_CUDA_EXPORT int onnx_gptq_cuda_matmul(const void* A, const uint8_t* B, const void* scales,
                                                const uint8_t* zero_points, const int32_t* g_idx,
                                                const void* bias, void* Y, int64_t M, int64_t K,
                                                int64_t N, int bits, int64_t block_size,
                                                int64_t n_groups, int dtype, void* stream);

/* Checks that every g_idx[k], k < K, lies in [0, n_groups). Synchronizes `stream`.
 * Returns ONNX_GPTQ_CUDA_OK, ONNX_GPTQ_CUDA_ERR_G_IDX (first bad column in *bad_column
 * when non-NULL) or another error code. */
ONNX_GPTQ_CUDA_EXPORT int onnx_gptq_cuda_check_g_idx(const int32_t* g_idx, int64_t K, int64_t n_groups,
                                                     int64_t* bad_column, void* stream);

/* A static, human-readable description of a status code. */
ONNX_GPTQ_CUDA_EXPORT const char* onnx_gptq_cuda_error_string(int status);

/* The CUDA runtime's message for the last ONNX_GPTQ_CUDA_ERR_LAUNCH in this thread
 * (empty string when none). */
ONNX_GPTQ_CUDA_EXPORT const char* onnx_gptq_cuda_last_launch_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ONNX_GPTQ_CUDA_H_ */
