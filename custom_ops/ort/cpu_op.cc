// GptqMatMul on onnxruntime's CPU execution provider: checks the inputs,
// then hands raw pointers to the kernel in custom_ops/kernels/cpu/.
#include "cpu_op.h"

#include <mutex>
#include <new>
#include <string>
#include <thread>

#include "../kernels/cpu/gptq_matmul_cpu.h"
#include "gptq_op.h"

namespace onnx_gptq {
namespace {

struct CpuKernel {
  const OrtApi* api = nullptr;
  uint32_t op_version = 0;
  ONNXTensorElementDataType act_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  GptqAttrs attrs;
  GptqNodeInfo node;
};

OrtStatusPtr CreateKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  const GptqOpDef* def = static_cast<const GptqOpDef*>(op);
  CpuKernel* k = new (std::nothrow) CpuKernel;
  if (!k) return api->CreateStatus(ORT_FAIL, "GptqMatMul: out of memory creating the CPU kernel");
  k->api = api;
  k->op_version = def->version;
  k->act_type = def->act_type;
  k->node = ReadNodeInfo(api, info);
  if (OrtStatus* st = ReadGptqAttrs(api, info, k->node, &k->attrs)) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

void DestroyKernel(void* kernel) { delete static_cast<CpuKernel*>(kernel); }

// Registered for the floating-point types the CPU kernel does not take, so a
// node of such a type fails when the session is created with a message
// naming the types it does take, instead of onnxruntime's "could not find an
// implementation" or "type ... is invalid".
OrtStatusPtr CreateUnsupportedTypeKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                         void** kernel) {
  *kernel = nullptr;
  const GptqOpDef* def = static_cast<const GptqOpDef*>(op);
  const GptqNodeInfo node = ReadNodeInfo(api, info);
  std::string msg = node.Describe() + ": " + node.DescribeInput(kInputA) + " is " + TypeString(def->act_type) +
                    "; the CPU kernel takes float32 or float16";
  if (def->act_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    msg += " (bfloat16 runs on the CUDA kernel only: CUDAExecutionProvider with onnxruntime-gpu)";
  }
  return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
}

// Never called: kernel creation fails first.
OrtStatusPtr ComputeUnsupportedType(void*, OrtKernelContext*) { return nullptr; }
void DestroyUnsupportedTypeKernel(void*) {}

// Runs the kernel's tasks on the session's intra-op thread pool.
struct OrtRunnerCtx {
  const OrtApi* api;
  const OrtKernelContext* ctx;
};

void OrtParallelRun(void* ctx, size_t n_tasks, void (*task)(void*, size_t), void* task_ctx) {
  const OrtRunnerCtx* r = static_cast<const OrtRunnerCtx*>(ctx);
  if (OrtStatus* st = r->api->KernelContext_ParallelFor(r->ctx, task, n_tasks, 0, task_ctx)) {
    // Only fails without a context; every task is idempotent, so run them all here.
    r->api->ReleaseStatus(st);
    for (size_t i = 0; i < n_tasks; ++i) task(task_ctx, i);
  }
}

// Cached: glibc answers hardware_concurrency() by reading /sys on every call.
int HardwareThreads() {
  static const int threads = [] {
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : int(hw);
  }();
  return threads;
}

OrtStatus* Error(const OrtApi* api, const std::string& msg) { return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

OrtStatusPtr Compute(void* kernel, OrtKernelContext* ctx) {
  const CpuKernel& k = *static_cast<const CpuKernel*>(kernel);
  const OrtApi* api = k.api;
  try {
    GptqCall call;
    if (OrtStatus* st = PrepareGptqCall(api, ctx, k.attrs, k.node, k.act_type, &call)) return st;
    const GptqShapes& shapes = call.shapes;
    void* const* data = call.data;
    void* y_data = call.y;
    const int32_t* g_idx = static_cast<const int32_t*>(data[kInputGIdx]);
    if (g_idx) {  // host memory on the CPU provider: checked here, once per call
      const std::string err = CheckGroupIndexValues(g_idx, k.attrs.K, shapes.n_groups, k.node);
      if (!err.empty()) return Error(api, err);
    }

    cpu::GptqMatMulParams p;
    p.M = shapes.M;
    p.K = k.attrs.K;
    p.N = k.attrs.N;
    p.bits = int(k.attrs.bits);
    p.block_size = k.attrs.block_size;
    p.n_groups = shapes.n_groups;
    p.accuracy_level = int(k.attrs.accuracy_level);
    p.dtype = k.act_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cpu::DType::kFloat16 : cpu::DType::kFloat32;
    p.A = data[kInputA];
    p.B = static_cast<const uint8_t*>(data[kInputB]);
    p.scales = data[kInputScales];
    p.zero_points = static_cast<const uint8_t*>(data[kInputZeroPoints]);
    p.g_idx = g_idx;
    p.bias = data[kInputBias];
    p.Y = y_data;

    // onnxruntime >= 1.17 lends its intra-op pool; older ones get ours.
    OrtRunnerCtx runner_ctx{api, ctx};
    const cpu::ParallelRunner ort_runner{&runner_ctx, &OrtParallelRun, HardwareThreads()};
    const bool use_ort_pool = k.op_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER;
    const cpu::Status status = cpu::GptqMatMul(p, use_ort_pool ? &ort_runner : nullptr);
    return KernelStatusError(api, static_cast<int>(status), k.node, "CPU kernel", "");
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, (k.node.Describe() + ": out of memory").c_str());
  }
}

GptqOpDef g_cpu_f32;
GptqOpDef g_cpu_f16;
GptqOpDef g_cpu_bf16_unsupported;
GptqOpDef g_cpu_f64_unsupported;
std::once_flag g_init_once;

}  // namespace

OrtStatus* RegisterCpuOps(OrtCustomOpDomain* domain, const OrtApi* api, uint32_t op_version, bool shape_inference) {
  std::call_once(g_init_once, [&] {
    for (GptqOpDef* op : {&g_cpu_f32, &g_cpu_f16}) {
      const ONNXTensorElementDataType t =
          op == &g_cpu_f32 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      InitGptqOpDef(op, op_version, api, t, nullptr, shape_inference);
      op->CreateKernelV2 = &CreateKernel;
      op->KernelComputeV2 = &Compute;
      op->KernelDestroy = &DestroyKernel;
    }
    for (GptqOpDef* op : {&g_cpu_bf16_unsupported, &g_cpu_f64_unsupported}) {
      const ONNXTensorElementDataType t = op == &g_cpu_bf16_unsupported ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16
                                                                         : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
      InitGptqOpDef(op, op_version, api, t, nullptr, shape_inference);
      op->CreateKernelV2 = &CreateUnsupportedTypeKernel;
      op->KernelComputeV2 = &ComputeUnsupportedType;
      op->KernelDestroy = &DestroyUnsupportedTypeKernel;
    }
  });
  // float32 first: its signature becomes the op's schema (see gptq_op.h).
  for (GptqOpDef* op : {&g_cpu_f32, &g_cpu_f16, &g_cpu_bf16_unsupported, &g_cpu_f64_unsupported}) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  return nullptr;
}

}  // namespace onnx_gptq
