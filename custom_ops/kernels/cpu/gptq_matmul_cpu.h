// CPU kernel of onnx_gptq.GptqMatMul: Y = A @ W^T (+ bias), W dequantized from
// packed N-bit codes on the fly (docs/CUSTOM_OP.md has the layout).
//
// Math only: raw pointers in, a status code out, no onnxruntime types. The
// caller (custom_ops/ort/) checks shapes and types against the op's attributes
// and turns a status into an onnxruntime error naming the input; this kernel
// re-checks what it relies on and returns kInvalidArgument rather than read
// out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../gptq_status.h"

namespace onnx_gptq {
namespace cpu {

// The codes of ../gptq_status.h this kernel returns (the CUDA kernels share
// the vocabulary; a typed enum keeps a stray int from passing as a status).
enum class Status : int {
  kOk = ONNX_GPTQ_OK,
  kInvalidArgument = ONNX_GPTQ_ERR_INVALID_ARGUMENT,  // parameters disagree with each other (a caller bug)
  kBadGroupIndex = ONNX_GPTQ_ERR_G_IDX,               // a g_idx entry outside [0, n_groups)
  kOutOfMemory = ONNX_GPTQ_ERR_OUT_OF_MEMORY,
};

// Human-readable description of a status, for error messages.
inline const char* StatusString(Status status) { return onnx_gptq_status_string(static_cast<int>(status)); }

enum class DType : int { kFloat32 = 0, kFloat16 = 1 };

// Runs task(task_ctx, i) for every i in [0, n_tasks), possibly concurrently,
// and returns once all have finished. `threads` is how many run at once (a
// hint for how finely to split work).
struct ParallelRunner {
  void* ctx;
  void (*run)(void* ctx, size_t n_tasks, void (*task)(void* task_ctx, size_t i), void* task_ctx);
  int threads;
};

// The library's own persistent thread pool (hardware_concurrency threads,
// overridable with the environment variable ONNX_GPTQ_NUM_THREADS), used
// when the caller has no thread pool to offer.
const ParallelRunner& DefaultRunner();

struct GptqMatMulParams {
  int64_t M = 0;           // rows of A (product of its leading dimensions)
  int64_t K = 0;           // input features
  int64_t N = 0;           // output features
  int bits = 0;            // 2, 3, 4 or 8
  int64_t block_size = 0;  // input columns per packed block
  int64_t n_groups = 0;    // columns of scales / zero_points
  DType dtype = DType::kFloat32;  // type of A, scales, bias and Y
  // MatMulNBits' meaning: 4 quantizes A to int8 per block of K and runs int8
  // dot products (int8_impl.h); 0..3 compute in fp32 (the CPU has no fp16 or
  // bf16 path, as MatMulNBits on CPU).
  int accuracy_level = 0;

  const void* A = nullptr;               // T     [M, K]
  const uint8_t* B = nullptr;            // uint8 [N, ceil(K/block_size), ceil(block_size*bits/8)]
  const void* scales = nullptr;          // T     [N, n_groups]
  const uint8_t* zero_points = nullptr;  // uint8 [N, n_groups], or nullptr: 2**(bits-1)
  const int32_t* g_idx = nullptr;        // int32 [K], or nullptr: k / block_size
  const void* bias = nullptr;            // T     [N], or nullptr
  void* Y = nullptr;                     // T     [M, N]
};

// Computes Y. With `runner` nullptr the default thread pool is used.
Status GptqMatMul(const GptqMatMulParams& params, const ParallelRunner* runner);

// The instruction set the next call will use: "avx512", "avx2" or "scalar".
// The best one the CPU supports, unless the environment variable
// ONNX_GPTQ_CPU_ISA names a lower one (read on every call, so tests can
// exercise every path in one process).
const char* SelectedIsa();

// The instruction set accuracy_level 4 will use: "avx512vnni", "avxvnni",
// "avx2" or "scalar"; ONNX_GPTQ_CPU_ISA=avx2 or =scalar caps it as above.
const char* SelectedInt8Isa();

}  // namespace cpu
}  // namespace onnx_gptq
