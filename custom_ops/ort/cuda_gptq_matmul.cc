// GptqMatMul on onnxruntime's CUDA execution provider.
//
// Everything but the launch is gptq_op's, as for the CPU op: the op's
// signature and shape inference (InitGptqOpDef), attribute reading
// (ReadGptqAttrs), and describing and checking the inputs (PrepareGptqCall),
// so both providers accept the same nodes and word their errors alike. What
// is CUDA's own: g_idx is range-checked on the device (once per tensor
// address), and onnx_gptq_cuda_matmul runs on the session's stream
// (KernelContext_GetGPUComputeStream). No CUDA headers are needed here: the
// stream travels as void*.
#include "cuda_gptq_matmul.h"

#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <unordered_set>

#include "gptq_cuda.h"
#include "gptq_op.h"

namespace onnx_gptq {
namespace {

constexpr const char* kCudaProvider = "CUDAExecutionProvider";

struct CudaKernel {
  const OrtApi* api = nullptr;
  ONNXTensorElementDataType act_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  GptqAttrs attrs;
  GptqNodeInfo node;
  // g_idx tensors already range-checked (initializers keep their address).
  std::mutex checked_mutex;
  std::unordered_set<const void*> checked_g_idx;
};

// The dtype code of onnx_gptq_cuda_matmul for the op's T.
int CudaDType(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    default: return 0;  // float32: the only other type an op is registered for
  }
}

OrtStatusPtr CreateKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  CudaKernel* k = new (std::nothrow) CudaKernel;
  if (!k) return api->CreateStatus(ORT_FAIL, "GptqMatMul: out of memory creating the CUDA kernel");
  k->api = api;
  k->act_type = static_cast<const GptqOpDef*>(op)->act_type;
  k->node = ReadNodeInfo(api, info);
  if (OrtStatus* st = ReadGptqAttrs(api, info, k->node, &k->attrs)) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

void DestroyKernel(void* kernel) { delete static_cast<CudaKernel*>(kernel); }

// Range-checks g_idx once per tensor address (a synchronising device->host copy).
OrtStatus* CheckGroupIndexOnDevice(CudaKernel& k, const int32_t* g_idx, int64_t n_groups, void* stream) {
  {
    std::lock_guard<std::mutex> lock(k.checked_mutex);
    if (k.checked_g_idx.count(g_idx)) return nullptr;
  }
  int64_t bad = -1;
  const int rc = onnx_gptq_cuda_check_g_idx(g_idx, k.attrs.K, n_groups, &bad, stream);
  if (rc == ONNX_GPTQ_ERR_G_IDX) {
    return k.api->CreateStatus(ORT_INVALID_ARGUMENT, GroupIndexError(k.node, bad, nullptr, n_groups).c_str());
  }
  if (rc != ONNX_GPTQ_OK) {
    return KernelStatusError(k.api, rc, k.node, "CUDA g_idx check", onnx_gptq_cuda_last_launch_error());
  }
  std::lock_guard<std::mutex> lock(k.checked_mutex);
  k.checked_g_idx.insert(g_idx);
  return nullptr;
}

OrtStatusPtr Compute(void* kernel, OrtKernelContext* ctx) {
  CudaKernel& k = *static_cast<CudaKernel*>(kernel);
  const OrtApi* api = k.api;
  try {
    GptqCall call;
    if (OrtStatus* st = PrepareGptqCall(api, ctx, k.attrs, k.node, k.act_type, &call)) return st;
    if (call.shapes.M == 0) return nullptr;  // empty output: nothing to launch
    void* stream = nullptr;
    if (OrtStatus* st = api->KernelContext_GetGPUComputeStream(ctx, &stream)) return st;
    const int32_t* g_idx = static_cast<const int32_t*>(call.data[kInputGIdx]);
    if (g_idx) {
      if (OrtStatus* st = CheckGroupIndexOnDevice(k, g_idx, call.shapes.n_groups, stream)) return st;
    }
    const GptqAttrs& a = k.attrs;
    const int rc = onnx_gptq_cuda_matmul(
        call.data[kInputA], static_cast<const uint8_t*>(call.data[kInputB]), call.data[kInputScales],
        static_cast<const uint8_t*>(call.data[kInputZeroPoints]), g_idx, call.data[kInputBias], call.y, call.shapes.M,
        a.K, a.N, static_cast<int>(a.bits), a.block_size, call.shapes.n_groups, CudaDType(k.act_type), stream);
    if (rc == ONNX_GPTQ_OK) return nullptr;
    std::string detail = "A " + ShapeString(call.inputs[kInputA].dims) + ", B " +
                         ShapeString(call.inputs[kInputB].dims) + ", scales " +
                         ShapeString(call.inputs[kInputScales].dims) + ", M=" + std::to_string(call.shapes.M) +
                         " K=" + std::to_string(a.K) + " N=" + std::to_string(a.N) + " bits=" + std::to_string(a.bits) +
                         " block_size=" + std::to_string(a.block_size);
    if (rc == ONNX_GPTQ_ERR_LAUNCH) detail += std::string("; ") + onnx_gptq_cuda_last_launch_error();
    return KernelStatusError(api, rc, k.node, "CUDA kernel", detail);
  } catch (const std::exception& e) {  // std::bad_alloc from shape strings; never let it cross the C ABI
    return api->CreateStatus(ORT_FAIL, (k.node.Describe() + ": " + e.what()).c_str());
  }
}

// One op per T the CUDA kernels take. Static: onnxruntime keeps pointers to
// them for the process lifetime.
GptqOpDef g_cuda_ops[3];
constexpr ONNXTensorElementDataType kCudaTypes[3] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                     ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                                     ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};
std::once_flag g_init_once;

}  // namespace
}  // namespace onnx_gptq

extern "C" OrtStatus* onnx_gptq_register_cuda_ops(const OrtApi* api, uint32_t api_version, OrtCustomOpDomain* domain,
                                                  int shape_inference) {
  using namespace onnx_gptq;
  if (api == nullptr) return nullptr;  // nothing to report through; register.cc never passes null
  if (domain == nullptr) return api->CreateStatus(ORT_INVALID_ARGUMENT, "onnx_gptq_register_cuda_ops: null domain");
  std::call_once(g_init_once, [&] {
    for (size_t i = 0; i < 3; ++i) {
      InitGptqOpDef(&g_cuda_ops[i], api_version, api, kCudaTypes[i], kCudaProvider, shape_inference != 0);
      g_cuda_ops[i].CreateKernelV2 = &CreateKernel;
      g_cuda_ops[i].KernelComputeV2 = &Compute;
      g_cuda_ops[i].KernelDestroy = &DestroyKernel;
    }
  });
  for (const GptqOpDef& op : g_cuda_ops) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op)) return st;
  }
  return nullptr;
}
