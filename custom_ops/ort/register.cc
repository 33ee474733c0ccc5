// Entry point onnxruntime calls when a session registers this library
// (SessionOptions.register_custom_ops_library): creates the "onnx_gptq"
// domain with the CPU ops, and the CUDA ops when built with them (see the hook
// described in gptq_op.h).
#include <mutex>
#include <string>
#include <vector>

#include "../kernels/cpu/gptq_matmul_cpu.h"
#include "abi_probe.h"
#include "cpu_op.h"
#include "gptq_op.h"
#include "ort_abi.h"
#ifdef ONNX_GPTQ_WITH_CUDA
#include "cuda_gptq_matmul.h"
#endif

#define ONNX_GPTQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace onnx_gptq {
namespace {

// Domains must outlive every session using them; they are kept here and
// released when the library is unloaded at process exit.
struct DomainRegistry {
  std::mutex mu;
  const OrtApi* api = nullptr;
  std::vector<OrtCustomOpDomain*> domains;
  ~DomainRegistry() {
    for (OrtCustomOpDomain* d : domains) api->ReleaseCustomOpDomain(d);
  }
};

DomainRegistry& Registry() {
  static DomainRegistry registry;
  return registry;
}

}  // namespace
}  // namespace onnx_gptq

ONNX_GPTQ_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnx_gptq;
  // Ask for the newest API we can use; onnxruntime 1.16 only has API 16.
  uint32_t op_version = ONNX_GPTQ_ORT_API_SHAPE_INFER;
  const OrtApi* api = api_base->GetApi(op_version);
  if (!api) {
    op_version = ONNX_GPTQ_ORT_API_MIN;
    api = api_base->GetApi(op_version);
  }
  if (!api) {
    // CreateStatus is slot 0 of every API version.
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string msg = std::string("onnx_gptq custom ops need onnxruntime >= 1.16 (C API 16); this is ") +
                            api_base->GetVersionString();
    return oldest ? oldest->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  // The CPU float32 op is registered first, so its shape inference function
  // is the one onnxruntime uses for every provider's GptqMatMul.
  const bool shape_inference = ShapeInferenceSafe(api_base->GetVersionString());
  OrtStatus* st = RegisterCpuOps(domain, api, op_version, shape_inference);
#ifdef ONNX_GPTQ_WITH_CUDA
  if (!st) st = onnx_gptq_register_cuda_ops(api, op_version, domain, shape_inference ? 1 : 0);
#endif
  if (!st) st = api->AddCustomOpDomain(options, domain);
  if (st) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  OrtCustomOpDomain* probe_domain = nullptr;  // only in tests/test_ort_abi.py (see abi_probe.h)
  if (AbiProbeArmed()) st = AddAbiProbeDomain(api_base, api, op_version, options, &probe_domain);
  DomainRegistry& reg = Registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  reg.api = api;
  reg.domains.push_back(domain);
  if (probe_domain) reg.domains.push_back(probe_domain);
  return st;
}

// 1 when the library was built with the CUDA kernels (for onnx_gptq.custom_ops).
ONNX_GPTQ_EXPORT int onnx_gptq_has_cuda_kernels(void) {
#ifdef ONNX_GPTQ_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// The instruction set the CPU kernel uses now: "avx512", "avx2" or "scalar".
ONNX_GPTQ_EXPORT const char* onnx_gptq_cpu_isa(void) { return onnx_gptq::cpu::SelectedIsa(); }
ONNX_GPTQ_EXPORT const char* onnx_gptq_cpu_int8_isa(void) { return onnx_gptq::cpu::SelectedInt8Isa(); }
