// ISA-neutral part of the CPU kernel: parameter checks, instruction-set
// dispatch, the default thread pool and per-thread scratch memory.
#include "gptq_matmul_cpu.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "internal.h"

namespace onnx_gptq {
namespace cpu {

namespace detail {

void* AlignedAlloc(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  return std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
}

void AlignedFree(void* p) { std::free(p); }

namespace {

struct Scratch {
  void* ptr[kNumScratchSlots] = {};
  size_t size[kNumScratchSlots] = {};
  ~Scratch() {
    for (void* p : ptr) AlignedFree(p);
  }
};

}  // namespace

void* ThreadScratch(ScratchSlot slot, size_t bytes) {
  thread_local Scratch scratch;
  if (scratch.size[slot] < bytes) {
    AlignedFree(scratch.ptr[slot]);
    scratch.ptr[slot] = AlignedAlloc(bytes);
    scratch.size[slot] = scratch.ptr[slot] ? bytes : 0;
  }
  return scratch.ptr[slot];
}

}  // namespace detail

namespace {

// A persistent pool: workers sleep on a condition variable between calls; the
// calling thread takes tasks too. One call at a time: a call that finds the
// pool busy (another session, or a nested call) runs its tasks inline.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return int(workers_.size()) + 1; }

  void Run(size_t n_tasks, void (*task)(void*, size_t), void* task_ctx) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n_tasks <= 1) {
      for (size_t i = 0; i < n_tasks; ++i) task(task_ctx, i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = task;
      task_ctx_ = task_ctx;
      n_tasks_ = n_tasks;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    size_t mine = Work(task, task_ctx, n_tasks);
    std::unique_lock<std::mutex> lock(mu_);
    done_ += mine;
    finished_.wait(lock, [&] { return done_ == n_tasks_ && active_ == 0; });
  }

 private:
  size_t Work(void (*task)(void*, size_t), void* task_ctx, size_t n_tasks) {
    size_t count = 0;
    for (size_t i = next_.fetch_add(1); i < n_tasks; i = next_.fetch_add(1)) {
      task(task_ctx, i);
      ++count;
    }
    return count;
  }

  void WorkerLoop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      auto* task = task_;
      void* task_ctx = task_ctx_;
      const size_t n_tasks = n_tasks_;
      ++active_;
      lock.unlock();
      const size_t mine = Work(task, task_ctx, n_tasks);
      lock.lock();
      done_ += mine;
      --active_;
      if (done_ == n_tasks_ && active_ == 0) finished_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one Run at a time
  std::mutex mu_;
  std::condition_variable wake_, finished_;
  uint64_t generation_ = 0;
  void (*task_)(void*, size_t) = nullptr;
  void* task_ctx_ = nullptr;
  size_t n_tasks_ = 0;
  std::atomic<size_t> next_{0};
  size_t done_ = 0;
  int active_ = 0;
  bool stop_ = false;
};

int DefaultThreadCount() {
  if (const char* env = std::getenv("ONNX_GPTQ_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

void PoolRun(void* ctx, size_t n_tasks, void (*task)(void*, size_t), void* task_ctx) {
  static_cast<ThreadPool*>(ctx)->Run(n_tasks, task, task_ctx);
}

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa BestIsa() {
#if defined(ONNX_GPTQ_HAVE_X86_ISA)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kScalar;
}

Isa CurrentIsa() {
  static const Isa best = BestIsa();
  Isa isa = best;
  if (const char* env = std::getenv("ONNX_GPTQ_CPU_ISA")) {
    if (std::strcmp(env, "scalar") == 0) isa = Isa::kScalar;
    if (std::strcmp(env, "avx2") == 0 && best != Isa::kScalar) isa = Isa::kAvx2;
  }
  return isa;
}

// Instruction sets of the int8 path (accuracy_level 4), best first.
enum class Int8Isa { kScalar, kAvx2, kAvxVnni, kAvx512Vnni };

Int8Isa BestInt8Isa() {
#if defined(ONNX_GPTQ_HAVE_X86_ISA)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f")) {
    return Int8Isa::kAvx512Vnni;
  }
  if (avx2 && __builtin_cpu_supports("avxvnni")) return Int8Isa::kAvxVnni;
  if (avx2) return Int8Isa::kAvx2;
#endif
  return Int8Isa::kScalar;
}

// ONNX_GPTQ_CPU_ISA=avx2 / =scalar cap the int8 path as they cap the fp32 one;
// =avxvnni caps it at AVX-VNNI (the fp32 path then runs its best build), so
// that an AVX512-VNNI machine can test both VNNI builds.
Int8Isa CurrentInt8Isa() {
  static const Int8Isa best = BestInt8Isa();
  Int8Isa isa = best;
  if (const char* env = std::getenv("ONNX_GPTQ_CPU_ISA")) {
    if (std::strcmp(env, "scalar") == 0) isa = Int8Isa::kScalar;
    if (std::strcmp(env, "avx2") == 0 && best != Int8Isa::kScalar) isa = Int8Isa::kAvx2;
#if defined(ONNX_GPTQ_HAVE_X86_ISA)
    if (std::strcmp(env, "avxvnni") == 0 && best == Int8Isa::kAvx512Vnni && __builtin_cpu_supports("avxvnni")) {
      isa = Int8Isa::kAvxVnni;
    }
#endif
  }
  return isa;
}

bool MulFits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out) && *out >= 0; }

}  // namespace

const ParallelRunner& DefaultRunner() {
  // Leaked on purpose: worker threads must not be joined during static
  // destruction, when the process may be exiting from inside onnxruntime.
  static ThreadPool* pool = new ThreadPool(DefaultThreadCount());
  static const ParallelRunner runner{pool, &PoolRun, pool->threads()};
  return runner;
}

const char* SelectedIsa() {
  switch (CurrentIsa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: break;
  }
  return "scalar";
}

const char* SelectedInt8Isa() {
  switch (CurrentInt8Isa()) {
    case Int8Isa::kAvx512Vnni: return "avx512vnni";
    case Int8Isa::kAvxVnni: return "avxvnni";
    case Int8Isa::kAvx2: return "avx2";
    case Int8Isa::kScalar: break;
  }
  return "scalar";
}

Status GptqMatMul(const GptqMatMulParams& p, const ParallelRunner* runner) {
  // The glue has checked all of this against the tensors; re-check what the
  // kernel's memory accesses rely on.
  if (p.bits != 2 && p.bits != 3 && p.bits != 4 && p.bits != 8) return Status::kInvalidArgument;
  if (p.accuracy_level < 0 || p.accuracy_level > 4) return Status::kInvalidArgument;
  if (p.M < 0 || p.K < 1 || p.N < 1 || p.block_size < 1 || p.n_groups < 1) return Status::kInvalidArgument;
  if (p.K > INT32_MAX / 2 || p.block_size > INT32_MAX / 2) return Status::kInvalidArgument;
  const int64_t n_blocks = (p.K + p.block_size - 1) / p.block_size;
  if (!p.g_idx && p.n_groups != n_blocks) return Status::kInvalidArgument;
  int64_t sz = 0;
  if (!MulFits(p.M, p.K, &sz) || !MulFits(p.M, p.N, &sz) || !MulFits(n_blocks, p.block_size, &sz) ||
      !MulFits(p.N, p.n_groups, &sz) || !MulFits(p.N, n_blocks * ((p.block_size * p.bits + 7) / 8), &sz)) {
    return Status::kInvalidArgument;
  }
  if (p.M == 0) return Status::kOk;  // empty output: nothing to read or write
  if (!p.A || !p.B || !p.scales || !p.Y) return Status::kInvalidArgument;
  const ParallelRunner& r = runner ? *runner : DefaultRunner();
  if (p.accuracy_level == 4) {
#if defined(ONNX_GPTQ_HAVE_X86_ISA)
    switch (CurrentInt8Isa()) {
      case Int8Isa::kAvx512Vnni: return detail::RunInt8Avx512Vnni(p, r);
      case Int8Isa::kAvxVnni: return detail::RunInt8AvxVnni(p, r);
      case Int8Isa::kAvx2: return detail::RunInt8Avx2(p, r);
      case Int8Isa::kScalar: break;
    }
#endif
    return detail::RunInt8Scalar(p, r);
  }
#if defined(ONNX_GPTQ_HAVE_X86_ISA)
  switch (CurrentIsa()) {
    case Isa::kAvx512: return detail::RunAvx512(p, r);
    case Isa::kAvx2: return detail::RunAvx2(p, r);
    case Isa::kScalar: break;
  }
#endif
  return detail::RunScalar(p, r);
}

}  // namespace cpu
}  // namespace onnx_gptq
