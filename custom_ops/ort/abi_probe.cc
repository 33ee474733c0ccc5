// The ABI probe: calls every OrtApi slot ort_abi.h names and records what it
// saw (see abi_probe.h). Never registered unless armed.
#include "abi_probe.h"

#include <atomic>
#include <climits>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "gptq_op.h"

#define ONNX_GPTQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace onnx_gptq {
namespace {

constexpr const char* kProbeDomain = "onnx_gptq.abi_probe";
constexpr const char* kProbeOp = "AbiProbe";

std::atomic<bool> g_armed{false};

// slot name -> what the probe saw ("ok", "FAIL: why", or a value).
struct Report {
  std::mutex mu;
  std::map<std::string, std::string> entries;
};

Report& TheReport() {
  static Report report;
  return report;
}

// Records `value` for `slot`; a failure is kept over anything recorded later.
void Record(const char* slot, const std::string& value) {
  Report& r = TheReport();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.entries.find(slot);
  if (it != r.entries.end() && it->second.rfind("FAIL", 0) == 0) return;
  r.entries[slot] = value;
}

void Check(const char* slot, bool ok, const std::string& why) { Record(slot, ok ? "ok" : "FAIL: " + why); }

// The message of `status` ("" for success), which it releases. Used only
// after ProbeStatus has checked GetErrorMessage and ReleaseStatus.
std::string Take(const OrtApi* api, OrtStatus* status) {
  if (!status) return "";
  const char* msg = api->GetErrorMessage(status);
  std::string s = msg && msg[0] ? msg : "(error without a message)";
  api->ReleaseStatus(status);
  return s;
}

// Records the value a getter produced, or the error it returned.
void RecordValue(const char* slot, const std::string& err, const std::string& value) {
  Record(slot, err.empty() ? value : "FAIL: " + err);
}

// Reads a string through one of onnxruntime's (buffer, size) getters.
void ReadName(const OrtApi* api, const char* slot, const OrtKernelInfo* info,
              OrtStatus* (*get)(const OrtApi*, const OrtKernelInfo*, char*, size_t*)) {
  size_t size = 0;
  std::string err = Take(api, get(api, info, nullptr, &size));
  std::string value(size, '\0');
  if (err.empty() && size > 0) err = Take(api, get(api, info, &value[0], &size));
  value.resize(std::strlen(value.c_str()));
  RecordValue(slot, err, value);
}

// ------------------------------------------------------------------ without a kernel

void ProbeStatus(const OrtApi* api) {
  OrtStatus* st = api->CreateStatus(ORT_NOT_IMPLEMENTED, "abi probe status");
  Check("CreateStatus", st != nullptr, "returned nullptr");
  if (!st) return;
  const OrtErrorCode code = api->GetErrorCode(st);
  Check("GetErrorCode", code == ORT_NOT_IMPLEMENTED, "read code " + std::to_string(code) + " for ORT_NOT_IMPLEMENTED");
  const char* msg = api->GetErrorMessage(st);
  Check("GetErrorMessage", msg && std::strcmp(msg, "abi probe status") == 0, msg ? msg : "nullptr");
  api->ReleaseStatus(st);
  Check("ReleaseStatus", true, "");
}

void ProbeTensorInfo(const OrtApi* api, bool api17) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  std::string err = Take(api, api->CreateTensorTypeAndShapeInfo(&info));
  Check("CreateTensorTypeAndShapeInfo", err.empty() && info, err);
  if (!info) return;
  err = Take(api, api->SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16));
  Check("SetTensorElementType", err.empty(), err);
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  err = Take(api, api->GetTensorElementType(info, &type));
  Check("GetTensorElementType", err.empty() && type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        err + " read type " + std::to_string(type) + " after setting float16");
  const std::vector<int64_t> dims = {2, 3, 5};
  err = Take(api, api->SetDimensions(info, dims.data(), dims.size()));
  Check("SetDimensions", err.empty(), err);
  size_t rank = 0;
  err = Take(api, api->GetDimensionsCount(info, &rank));
  Check("GetDimensionsCount", err.empty() && rank == 3, err + " rank " + std::to_string(rank) + " after [2, 3, 5]");
  std::vector<int64_t> back(3, 0);
  err = Take(api, api->GetDimensions(info, back.data(), back.size()));
  Check("GetDimensions", err.empty() && back == dims, err + " read " + ShapeString(back) + " after [2, 3, 5]");
  size_t count = 0;
  err = Take(api, api->GetTensorShapeElementCount(info, &count));
  Check("GetTensorShapeElementCount", err.empty() && count == 30, err + " count " + std::to_string(count));
  if (api17) {
    const char* names[3] = {"", "probe_seq", ""};
    err = Take(api, api->SetSymbolicDimensions(info, names, 3));
    Check("SetSymbolicDimensions", err.empty(), err);
  } else {
    Record("SetSymbolicDimensions", "unavailable (API < 17)");
  }
  const char* names_back[3] = {nullptr, nullptr, nullptr};
  err = Take(api, api->GetSymbolicDimensions(info, names_back, 3));
  const bool named = names_back[1] && std::strcmp(names_back[1], api17 ? "probe_seq" : "") == 0;
  Check("GetSymbolicDimensions", err.empty() && named, err + " read '" + (names_back[1] ? names_back[1] : "") + "'");
  api->ReleaseTensorTypeAndShapeInfo(info);
  Check("ReleaseTensorTypeAndShapeInfo", true, "");
}

void ProbeAllocator(const OrtApi* api, OrtAllocator* allocator) {
  void* p = nullptr;
  std::string err = Take(api, api->AllocatorAlloc(allocator, 256, &p));
  Check("AllocatorAlloc", err.empty() && p, err);
  if (!p) return;
  std::memset(p, 0x5a, 256);  // the memory must be writable
  err = Take(api, api->AllocatorFree(allocator, p));
  Check("AllocatorFree", err.empty(), err);
}

void ProbeMemory(const OrtApi* api) {
  OrtMemoryInfo* cpu = nullptr;
  std::string err = Take(api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu));
  Check("CreateCpuMemoryInfo", err.empty() && cpu, err);
  OrtMemoryInfo* named = nullptr;
  err = Take(api, api->CreateMemoryInfo("Cpu", OrtDeviceAllocator, 0, OrtMemTypeDefault, &named));
  Check("CreateMemoryInfo", err.empty() && named, err);
  OrtAllocator* allocator = nullptr;
  err = Take(api, api->GetAllocatorWithDefaultOptions(&allocator));
  Check("GetAllocatorWithDefaultOptions", err.empty() && allocator, err);
  if (allocator) {
    ProbeAllocator(api, allocator);
    const OrtMemoryInfo* info = nullptr;
    err = Take(api, api->AllocatorGetInfo(allocator, &info));
    Check("AllocatorGetInfo", err.empty() && info, err);
  }
  if (cpu) api->ReleaseMemoryInfo(cpu);
  if (named) api->ReleaseMemoryInfo(named);
  Check("ReleaseMemoryInfo", true, "");
}

// ------------------------------------------------------------------ the probe op

struct ProbeKernel {
  const OrtApi* api = nullptr;
  float f = 0;
  int64_t i = 0;
};

OrtStatusPtr CreateProbeKernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  ProbeKernel* k = new (std::nothrow) ProbeKernel;
  if (!k) return api->CreateStatus(ORT_FAIL, "AbiProbe: out of memory");
  k->api = api;
  std::string err = Take(api, api->KernelInfoGetAttribute_float(info, "f", &k->f));
  RecordValue("KernelInfoGetAttribute_float", err, std::to_string(k->f));
  err = Take(api, api->KernelInfoGetAttribute_int64(info, "i", &k->i));
  int64_t unused = 0;
  OrtStatus* missing = api->KernelInfoGetAttribute_int64(info, "no_such_attribute", &unused);
  RecordValue("KernelInfoGetAttribute_int64", err,
              std::to_string(k->i) + (missing ? "" : " (and no error for a missing attribute)"));
  Take(api, missing);
  ReadName(api, "KernelInfoGetAttribute_string", info, [](const OrtApi* a, const OrtKernelInfo* i, char* out, size_t* n) {
    return a->KernelInfoGetAttribute_string(i, "s", out, n);
  });
  size_t count = 0;
  err = Take(api, api->KernelInfo_GetInputCount(info, &count));
  RecordValue("KernelInfo_GetInputCount", err, std::to_string(count));
  err = Take(api, api->KernelInfo_GetOutputCount(info, &count));
  RecordValue("KernelInfo_GetOutputCount", err, std::to_string(count));
  ReadName(api, "KernelInfo_GetInputName", info, [](const OrtApi* a, const OrtKernelInfo* i, char* out, size_t* n) {
    return a->KernelInfo_GetInputName(i, 0, out, n);
  });
  ReadName(api, "KernelInfo_GetOutputName", info, [](const OrtApi* a, const OrtKernelInfo* i, char* out, size_t* n) {
    return a->KernelInfo_GetOutputName(i, 0, out, n);
  });
  ReadName(api, "KernelInfo_GetNodeName", info, [](const OrtApi* a, const OrtKernelInfo* i, char* out, size_t* n) {
    return a->KernelInfo_GetNodeName(i, out, n);
  });
  OrtTypeInfo* type_info = nullptr;
  err = Take(api, api->KernelInfo_GetInputTypeInfo(info, 0, &type_info));
  Check("KernelInfo_GetInputTypeInfo", err.empty() && type_info, err);
  if (type_info) api->ReleaseTypeInfo(type_info);
  type_info = nullptr;
  err = Take(api, api->KernelInfo_GetOutputTypeInfo(info, 0, &type_info));
  Check("KernelInfo_GetOutputTypeInfo", err.empty() && type_info, err);
  if (type_info) api->ReleaseTypeInfo(type_info);
  Check("ReleaseTypeInfo", true, "");
  const OrtLogger* logger = nullptr;
  err = Take(api, api->KernelInfo_GetLogger(info, &logger));
  Check("KernelInfo_GetLogger", err.empty() && logger, err);
  if (logger) {
    OrtLoggingLevel level = ORT_LOGGING_LEVEL_FATAL;
    err = Take(api, api->Logger_GetLoggingSeverityLevel(logger, &level));
    RecordValue("Logger_GetLoggingSeverityLevel", err, std::to_string(level));
  }
  *kernel = k;
  return nullptr;
}

void DestroyProbeKernel(void* kernel) { delete static_cast<ProbeKernel*>(kernel); }

struct AffineTask {
  const float* x;
  float* y;
  float f;
  float i;
};

void AffineElement(void* ctx, size_t index) {
  const AffineTask* t = static_cast<const AffineTask*>(ctx);
  t->y[index] = t->x[index] * t->f + t->i;
}

// Y = X * f + i, element by element on onnxruntime's thread pool.
OrtStatusPtr ComputeProbe(void* kernel, OrtKernelContext* ctx) {
  const ProbeKernel& k = *static_cast<const ProbeKernel*>(kernel);
  const OrtApi* api = k.api;
  size_t count = 0;
  std::string err = Take(api, api->KernelContext_GetInputCount(ctx, &count));
  RecordValue("KernelContext_GetInputCount", err, std::to_string(count));
  err = Take(api, api->KernelContext_GetOutputCount(ctx, &count));
  RecordValue("KernelContext_GetOutputCount", err, std::to_string(count));
  const OrtValue* x = nullptr;
  err = Take(api, api->KernelContext_GetInput(ctx, 0, &x));
  Check("KernelContext_GetInput", err.empty() && x, err);
  if (!x) return api->CreateStatus(ORT_FAIL, "AbiProbe: no input");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  err = Take(api, api->GetTensorTypeAndShape(x, &info));
  std::vector<int64_t> dims;
  size_t elements = 0;
  if (info) {
    size_t rank = 0;
    Take(api, api->GetDimensionsCount(info, &rank));
    dims.resize(rank);
    Take(api, api->GetDimensions(info, dims.data(), rank));
    Take(api, api->GetTensorShapeElementCount(info, &elements));
    api->ReleaseTensorTypeAndShapeInfo(info);
  }
  RecordValue("GetTensorTypeAndShape", err, ShapeString(dims));
  void* x_data = nullptr;
  err = Take(api, api->GetTensorMutableData(const_cast<OrtValue*>(x), &x_data));
  Check("GetTensorMutableData", err.empty() && x_data, err);
  const OrtMemoryInfo* x_memory = nullptr;
  err = Take(api, api->GetTensorMemoryInfo(x, &x_memory));
  Check("GetTensorMemoryInfo", err.empty() && x_memory, err);
  OrtValue* y = nullptr;
  err = Take(api, api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y));
  Check("KernelContext_GetOutput", err.empty() && y, err);
  void* y_data = nullptr;
  if (y) Take(api, api->GetTensorMutableData(y, &y_data));
  if (!x_data || !y_data) return api->CreateStatus(ORT_FAIL, "AbiProbe: no tensor data");
  AffineTask task{static_cast<const float*>(x_data), static_cast<float*>(y_data), k.f, static_cast<float>(k.i)};
  err = Take(api, api->KernelContext_ParallelFor(ctx, &AffineElement, elements, 0, &task));
  Check("KernelContext_ParallelFor", err.empty(), err);
  void* stream = &task;  // must be overwritten: the CPU provider has no stream
  err = Take(api, api->KernelContext_GetGPUComputeStream(ctx, &stream));
  RecordValue("KernelContext_GetGPUComputeStream", err, stream ? "a stream" : "null");
  const OrtLogger* logger = nullptr;
  err = Take(api, api->KernelContext_GetLogger(ctx, &logger));
  Check("KernelContext_GetLogger", err.empty() && logger, err);
  if (logger) {
    err = Take(api, api->Logger_LogMessage(logger, ORT_LOGGING_LEVEL_VERBOSE, "onnx_gptq ABI probe", __FILE__, __LINE__,
                                           __func__));
    Check("Logger_LogMessage", err.empty(), err);
  }
  return nullptr;
}

// Y: X's type and shape, the first dimension renamed "probe_rows".
OrtStatusPtr InferProbeShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  const OrtApi* api = static_cast<const GptqOpDef*>(op)->api;
  size_t count = 0;
  std::string err = Take(api, api->ShapeInferContext_GetInputCount(ctx, &count));
  RecordValue("ShapeInferContext_GetInputCount", err, std::to_string(count));
  OrtTensorTypeAndShapeInfo* x_info = nullptr;  // owned by ctx
  err = Take(api, api->ShapeInferContext_GetInputTypeShape(ctx, 0, &x_info));
  std::vector<int64_t> dims;
  std::vector<const char*> names;
  if (x_info) {
    size_t rank = 0;
    Take(api, api->GetDimensionsCount(x_info, &rank));
    dims.resize(rank);
    names.assign(rank, nullptr);
    Take(api, api->GetDimensions(x_info, dims.data(), rank));
    Take(api, api->GetSymbolicDimensions(x_info, names.data(), rank));
  }
  std::string seen = ShapeString(dims);
  for (const char* name : names) seen += std::string(" '") + (name ? name : "") + "'";
  RecordValue("ShapeInferContext_GetInputTypeShape", err, seen);
  const OrtOpAttr* attr = nullptr;
  err = Take(api, api->ShapeInferContext_GetAttribute(ctx, "i", &attr));
  Check("ShapeInferContext_GetAttribute", err.empty() && attr, err);
  if (attr) {
    int64_t value = 0;
    size_t written = 0;
    err = Take(api, api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &value, sizeof value, &written));
    RecordValue("ReadOpAttr", err, std::to_string(value) + " (" + std::to_string(written) + " bytes)");
  }
  if (dims.empty()) return nullptr;
  names[0] = "probe_rows";
  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  Take(api, api->CreateTensorTypeAndShapeInfo(&y_info));
  if (!y_info) return nullptr;
  Take(api, api->SetTensorElementType(y_info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  Take(api, api->SetDimensions(y_info, dims.data(), dims.size()));
  Take(api, api->SetSymbolicDimensions(y_info, names.data(), names.size()));
  err = Take(api, api->ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info));
  Check("ShapeInferContext_SetOutputTypeShape", err.empty(), err);
  api->ReleaseTensorTypeAndShapeInfo(y_info);
  return nullptr;
}

const char* ProbeName(const OrtCustomOp*) { return kProbeOp; }
const char* ProbeProvider(const OrtCustomOp*) { return nullptr; }
ONNXTensorElementDataType ProbeType(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ProbeCount(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ProbeRequired(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ProbeInputMemory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ProbeOne(const OrtCustomOp*) { return 1; }
int ProbeMaxVersion(const OrtCustomOp*) { return INT_MAX; }

GptqOpDef g_probe_op;  // a GptqOpDef only to carry `api` to the shape inference function
std::once_flag g_probe_once;

void InitProbeOp(const OrtApi* api, uint32_t op_version) {
  std::memset(static_cast<OrtCustomOp*>(&g_probe_op), 0, sizeof(OrtCustomOp));
  g_probe_op.version = op_version;
  g_probe_op.api = api;
  g_probe_op.GetName = &ProbeName;
  g_probe_op.GetExecutionProviderType = &ProbeProvider;
  g_probe_op.GetInputType = &ProbeType;
  g_probe_op.GetInputTypeCount = &ProbeCount;
  g_probe_op.GetOutputType = &ProbeType;
  g_probe_op.GetOutputTypeCount = &ProbeCount;
  g_probe_op.GetInputCharacteristic = &ProbeRequired;
  g_probe_op.GetOutputCharacteristic = &ProbeRequired;
  g_probe_op.GetInputMemoryType = &ProbeInputMemory;
  g_probe_op.GetVariadicInputMinArity = &ProbeOne;
  g_probe_op.GetVariadicInputHomogeneity = &ProbeOne;
  g_probe_op.GetVariadicOutputMinArity = &ProbeOne;
  g_probe_op.GetVariadicOutputHomogeneity = &ProbeOne;
  g_probe_op.CreateKernelV2 = &CreateProbeKernel;
  g_probe_op.KernelComputeV2 = &ComputeProbe;
  g_probe_op.KernelDestroy = &DestroyProbeKernel;
  if (op_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER) {
    g_probe_op.InferOutputShapeFn = &InferProbeShape;
    g_probe_op.GetStartVersion = &ProbeOne;
    g_probe_op.GetEndVersion = &ProbeMaxVersion;
  }
}

}  // namespace

bool AbiProbeArmed() { return g_armed.load(); }

OrtStatus* AddAbiProbeDomain(const OrtApiBase* api_base, const OrtApi* api, uint32_t op_version,
                             OrtSessionOptions* options, OrtCustomOpDomain** domain) {
  *domain = nullptr;
  const char* version = api_base->GetVersionString();
  Record("GetVersionString", version ? version : "(null)");
  Record("GetApi", "API " + std::to_string(op_version));
  ProbeStatus(api);
  ProbeTensorInfo(api, op_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER);
  ProbeMemory(api);
  OrtCustomOpDomain* scratch = nullptr;  // created and released at once
  if (Take(api, api->CreateCustomOpDomain("onnx_gptq.abi_probe.scratch", &scratch)).empty() && scratch) {
    api->ReleaseCustomOpDomain(scratch);
    Check("ReleaseCustomOpDomain", true, "");
  }
  std::call_once(g_probe_once, [&] { InitProbeOp(api, op_version); });
  std::string err = Take(api, api->CreateCustomOpDomain(kProbeDomain, domain));
  Check("CreateCustomOpDomain", err.empty() && *domain, err);
  if (!*domain) return nullptr;  // recorded; the session then fails to find the op
  err = Take(api, api->CustomOpDomain_Add(*domain, &g_probe_op));
  Check("CustomOpDomain_Add", err.empty(), err);
  err = Take(api, api->AddCustomOpDomain(options, *domain));
  Check("AddCustomOpDomain", err.empty(), err);
  return nullptr;
}

}  // namespace onnx_gptq

// Arms (1) or disarms (0) the probe for the sessions registered from now on,
// and clears the report.
ONNX_GPTQ_EXPORT void onnx_gptq_abi_probe_arm(int on) {
  onnx_gptq::Report& r = onnx_gptq::TheReport();
  std::lock_guard<std::mutex> lock(r.mu);
  r.entries.clear();
  onnx_gptq::g_armed.store(on != 0);
}

// Writes the report, one "slot\tobservation\n" line per slot, into `out` (at
// most `size` bytes, NUL-terminated) and returns its length; call with
// size 0 to learn how large a buffer to pass.
ONNX_GPTQ_EXPORT size_t onnx_gptq_abi_probe_report(char* out, size_t size) {
  onnx_gptq::Report& r = onnx_gptq::TheReport();
  std::lock_guard<std::mutex> lock(r.mu);
  std::string text;
  for (const auto& entry : r.entries) text += entry.first + "\t" + entry.second + "\n";
  if (out && size > 0) {
    const size_t n = text.size() < size - 1 ? text.size() : size - 1;
    std::memcpy(out, text.data(), n);
    out[n] = '\0';
  }
  return text.size();
}
