// Shared GptqMatMul glue: signature callbacks, attribute and input checks,
// shape inference. See gptq_op.h.
#include "gptq_op.h"

#include <climits>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace onnx_gptq {
namespace {

const GptqOpDef* Def(const OrtCustomOp* op) { return static_cast<const GptqOpDef*>(op); }

const char* GetName(const OrtCustomOp*) { return kOpType; }
const char* GetExecutionProviderType(const OrtCustomOp* op) { return Def(op)->provider; }

// A carries the op's T; every other input is declared "any type" so that a
// wrong type reaches the kernel, whose check names the input. (With a fixed
// type onnxruntime would reject the node with "no kernel matches" instead.)
ONNXTensorElementDataType GetInputType(const OrtCustomOp* op, size_t index) {
  return index == kInputA ? Def(op)->act_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t GetInputTypeCount(const OrtCustomOp*) { return kNumInputs; }
ONNXTensorElementDataType GetOutputType(const OrtCustomOp* op, size_t) { return Def(op)->act_type; }
size_t GetOutputTypeCount(const OrtCustomOp*) { return 1; }

OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(const OrtCustomOp*, size_t index) {
  return index >= kInputZeroPoints ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType GetInputMemoryType(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int GetVariadicMinArity(const OrtCustomOp*) { return 1; }
int GetVariadicHomogeneity(const OrtCustomOp*) { return 1; }
int GetStartVersion(const OrtCustomOp*) { return 1; }
int GetEndVersion(const OrtCustomOp*) { return INT_MAX; }

// Drops a status we cannot report (onnxruntime ignores what a shape inference
// function returns, so errors there are left to the kernel's checks).
bool Ok(const OrtApi* api, OrtStatus* status) {
  if (!status) return true;
  api->ReleaseStatus(status);
  return false;
}

// Y: T, shape [..., N] from A [..., K]. Leaves the shape unset when A's rank
// is unknown or a leading dimension has neither a value nor a name.
OrtStatusPtr InferOutputShape(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  const OrtApi* api = Def(op)->api;
  OrtTensorTypeAndShapeInfo* a_info = nullptr;  // owned by ctx
  if (!Ok(api, api->ShapeInferContext_GetInputTypeShape(ctx, kInputA, &a_info)) || !a_info) return nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  if (!Ok(api, api->GetTensorElementType(a_info, &type)) || !Ok(api, api->GetDimensionsCount(a_info, &rank)) ||
      rank == 0) {
    return nullptr;
  }
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank, nullptr);
  if (!Ok(api, api->GetDimensions(a_info, dims.data(), rank)) ||
      !Ok(api, api->GetSymbolicDimensions(a_info, names.data(), rank))) {
    return nullptr;
  }
  for (size_t i = 0; i + 1 < rank; ++i) {
    if (dims[i] < 0 && (!names[i] || !names[i][0])) return nullptr;
  }
  const OrtOpAttr* attr = nullptr;
  int64_t n = 0;
  size_t written = 0;
  if (!Ok(api, api->ShapeInferContext_GetAttribute(ctx, "N", &attr)) || !attr ||
      !Ok(api, api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof n, &written)) || n < 1) {
    return nullptr;
  }
  dims[rank - 1] = n;
  names[rank - 1] = "";
  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  if (!Ok(api, api->CreateTensorTypeAndShapeInfo(&y_info))) return nullptr;
  if (Ok(api, api->SetTensorElementType(y_info, type)) && Ok(api, api->SetDimensions(y_info, dims.data(), rank)) &&
      Ok(api, api->SetSymbolicDimensions(y_info, names.data(), rank))) {
    Ok(api, api->ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info));
  }
  api->ReleaseTensorTypeAndShapeInfo(y_info);
  return nullptr;
}

bool MulFits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// Reads a variable-length string from one of onnxruntime's (buffer, size) getters.
template <class Getter>
std::string ReadString(const OrtApi* api, Getter get) {
  size_t size = 0;
  if (!Ok(api, get(nullptr, &size)) || size == 0) return "";
  std::string s(size, '\0');
  if (!Ok(api, get(&s[0], &size))) return "";
  s.resize(std::strlen(s.c_str()));
  return s;
}

}  // namespace

const char* GptqInputName(size_t index) {
  static const char* const kNames[kNumInputs] = {"A", "B", "scales", "zero_points", "g_idx", "bias"};
  return index < kNumInputs ? kNames[index] : "?";
}

bool ShapeInferenceSafe(const char* version) {
  int major = 0, minor = 0;
  if (!version || std::sscanf(version, "%d.%d", &major, &minor) != 2) return false;
  return major > 1 || (major == 1 && minor >= 24);
}

void InitGptqOpDef(GptqOpDef* op, uint32_t op_version, const OrtApi* api, ONNXTensorElementDataType act_type,
                   const char* provider, bool shape_inference) {
  std::memset(static_cast<OrtCustomOp*>(op), 0, sizeof(OrtCustomOp));
  op->version = op_version;
  op->api = api;
  op->act_type = act_type;
  op->provider = provider;
  op->GetName = &GetName;
  op->GetExecutionProviderType = &GetExecutionProviderType;
  op->GetInputType = &GetInputType;
  op->GetInputTypeCount = &GetInputTypeCount;
  op->GetOutputType = &GetOutputType;
  op->GetOutputTypeCount = &GetOutputTypeCount;
  op->GetInputCharacteristic = &GetInputCharacteristic;
  op->GetOutputCharacteristic = &GetOutputCharacteristic;
  op->GetInputMemoryType = &GetInputMemoryType;
  op->GetVariadicInputMinArity = &GetVariadicMinArity;
  op->GetVariadicInputHomogeneity = &GetVariadicHomogeneity;
  op->GetVariadicOutputMinArity = &GetVariadicMinArity;
  op->GetVariadicOutputHomogeneity = &GetVariadicHomogeneity;
  if (op_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER) {
    op->InferOutputShapeFn = shape_inference ? &InferOutputShape : nullptr;
    op->GetStartVersion = &GetStartVersion;
    op->GetEndVersion = &GetEndVersion;
  }
}

std::string GptqNodeInfo::Describe() const {
  return std::string(kOpType) + " node '" + name + "'";
}

std::string GptqNodeInfo::DescribeInput(size_t index) const {
  std::string s = std::string("input '") + GptqInputName(index) + "' (#" + std::to_string(index);
  if (index < input_names.size() && !input_names[index].empty()) s += ", tensor '" + input_names[index] + "'";
  return s + ")";
}

GptqNodeInfo ReadNodeInfo(const OrtApi* api, const OrtKernelInfo* info) {
  GptqNodeInfo node;
  node.name = ReadString(api, [&](char* out, size_t* size) { return api->KernelInfo_GetNodeName(info, out, size); });
  size_t count = 0;
  if (Ok(api, api->KernelInfo_GetInputCount(info, &count))) {
    for (size_t i = 0; i < count && i < kNumInputs; ++i) {
      node.input_names.push_back(ReadString(
          api, [&](char* out, size_t* size) { return api->KernelInfo_GetInputName(info, i, out, size); }));
    }
  }
  return node;
}

OrtStatus* ReadGptqAttrs(const OrtApi* api, const OrtKernelInfo* info, const GptqNodeInfo& node, GptqAttrs* out) {
  struct Attr {
    const char* name;
    int64_t* value;
  } attrs[] = {{"K", &out->K}, {"N", &out->N}, {"bits", &out->bits}, {"block_size", &out->block_size}};
  for (const Attr& a : attrs) {
    if (!Ok(api, api->KernelInfoGetAttribute_int64(info, a.name, a.value))) {
      const std::string msg = node.Describe() + ": missing int attribute '" + a.name + "'";
      return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
    }
  }
  // Optional: absent means 0, as in MatMulNBits.
  if (!Ok(api, api->KernelInfoGetAttribute_int64(info, "accuracy_level", &out->accuracy_level))) {
    out->accuracy_level = 0;
  }
  std::string err;
  if (out->accuracy_level < 0 || out->accuracy_level > 4) {
    err = "attribute accuracy_level=" + std::to_string(out->accuracy_level) +
          " must be 0..4 (0/1: fp32, 2/3: fp32 on CPU, 4: int8 activations)";
  }
  if (out->K < 1) err = "attribute K=" + std::to_string(out->K) + " must be >= 1";
  if (out->N < 1) err = "attribute N=" + std::to_string(out->N) + " must be >= 1";
  if (out->bits != 2 && out->bits != 3 && out->bits != 4 && out->bits != 8) {
    err = "attribute bits=" + std::to_string(out->bits) + " must be 2, 3, 4 or 8";
  }
  if (out->block_size < 1) err = "attribute block_size=" + std::to_string(out->block_size) + " must be >= 1";
  // Keep every derived size far from overflow (the kernel indexes K with int32).
  if (err.empty() && (out->K > (int64_t(1) << 30) || out->N > (int64_t(1) << 40) ||
                      out->block_size > (int64_t(1) << 30))) {
    err = "attributes K=" + std::to_string(out->K) + ", N=" + std::to_string(out->N) +
          ", block_size=" + std::to_string(out->block_size) + " are too large";
  }
  if (!err.empty()) {
    const std::string msg = node.Describe() + ": " + err;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
  }
  out->n_blocks = (out->K + out->block_size - 1) / out->block_size;
  out->blob_size = (out->block_size * out->bits + 7) / 8;
  return nullptr;
}

OrtStatus* DescribeInput(const OrtApi* api, OrtKernelContext* ctx, size_t index, TensorDesc* desc,
                         const OrtValue** value) {
  *desc = TensorDesc();
  *value = nullptr;
  size_t count = 0;
  if (OrtStatus* st = api->KernelContext_GetInputCount(ctx, &count)) return st;
  if (index >= count) return nullptr;
  if (OrtStatus* st = api->KernelContext_GetInput(ctx, index, value)) return st;
  if (!*value) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api->GetTensorTypeAndShape(*value, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = api->GetTensorElementType(info, &desc->type);
  if (!st) st = api->GetDimensionsCount(info, &rank);
  if (!st) {
    desc->dims.resize(rank);
    st = api->GetDimensions(info, desc->dims.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  desc->present = true;
  return nullptr;
}

std::string ShapeString(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

const char* TypeString(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "an unsupported type";
  }
}

std::string CheckGptqInputs(const GptqAttrs& attrs, const TensorDesc (&in)[kNumInputs], const GptqNodeInfo& node,
                            GptqShapes* shapes) {
  const auto where = [&](size_t i) { return node.Describe() + ": " + node.DescribeInput(i) + ": "; };
  const auto shape_error = [&](size_t i, const std::string& expected) {
    return where(i) + "expected shape " + expected + ", got " + ShapeString(in[i].dims);
  };
  const auto type_error = [&](size_t i, ONNXTensorElementDataType expected, const char* why) {
    return where(i) + "expected type " + TypeString(expected) + why + ", got " + TypeString(in[i].type);
  };
  const std::string N = std::to_string(attrs.N), K = std::to_string(attrs.K);

  // A: [..., K]
  if (!in[kInputA].present) return where(kInputA) + "is required";
  const TensorDesc& a = in[kInputA];
  const ONNXTensorElementDataType T = a.type;
  if (a.dims.empty() || a.dims.back() != attrs.K) {
    return shape_error(kInputA, "[..., " + K + "] (last dimension = attribute K)");
  }
  int64_t M = 1;
  for (size_t i = 0; i + 1 < a.dims.size(); ++i) {
    if (a.dims[i] < 0 || !MulFits(M, a.dims[i], &M)) return shape_error(kInputA, "non-negative dimensions");
  }
  int64_t elems = 0;
  if (!MulFits(M, attrs.N, &elems) || !MulFits(M, attrs.K, &elems)) {
    return where(kInputA) + "shape " + ShapeString(a.dims) + " is too large";
  }

  // B: uint8 [N, n_blocks, blob_size]
  if (!in[kInputB].present) return where(kInputB) + "is required";
  if (in[kInputB].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    return type_error(kInputB, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "");
  }
  const std::vector<int64_t> b_expected = {attrs.N, attrs.n_blocks, attrs.blob_size};
  if (in[kInputB].dims != b_expected) {
    return shape_error(kInputB, ShapeString(b_expected) + " (N, ceil(K/block_size), ceil(block_size*bits/8))");
  }

  // scales: T [N, n_groups]; n_groups = n_blocks without g_idx
  const bool has_gidx = in[kInputGIdx].present;
  if (!in[kInputScales].present) return where(kInputScales) + "is required";
  const TensorDesc& sc = in[kInputScales];
  if (sc.type != T) return type_error(kInputScales, T, " (the type of A)");
  if (has_gidx) {
    if (sc.dims.size() != 2 || sc.dims[0] != attrs.N || sc.dims[1] < 1) {
      return shape_error(kInputScales, "[" + N + ", n_groups >= 1]");
    }
  } else if (sc.dims != std::vector<int64_t>{attrs.N, attrs.n_blocks}) {
    return shape_error(kInputScales,
                       "[" + N + ", " + std::to_string(attrs.n_blocks) + "] (N, ceil(K/block_size); no g_idx)");
  }
  const int64_t n_groups = sc.dims[1];
  int64_t sc_elems = 0;
  if (!MulFits(attrs.N, n_groups, &sc_elems)) return where(kInputScales) + "shape is too large";

  // zero_points: uint8 [N, n_groups]
  if (in[kInputZeroPoints].present) {
    if (in[kInputZeroPoints].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      return type_error(kInputZeroPoints, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "");
    }
    if (in[kInputZeroPoints].dims != std::vector<int64_t>{attrs.N, n_groups}) {
      return shape_error(kInputZeroPoints, "[" + N + ", " + std::to_string(n_groups) + "] (the shape of scales)");
    }
  }
  // g_idx: int32 [K]
  if (has_gidx) {
    if (in[kInputGIdx].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
      return type_error(kInputGIdx, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "");
    }
    if (in[kInputGIdx].dims != std::vector<int64_t>{attrs.K}) return shape_error(kInputGIdx, "[" + K + "] (K)");
  }
  // bias: T [N]
  if (in[kInputBias].present) {
    if (in[kInputBias].type != T) return type_error(kInputBias, T, " (the type of A)");
    if (in[kInputBias].dims != std::vector<int64_t>{attrs.N}) return shape_error(kInputBias, "[" + N + "] (N)");
  }

  shapes->M = M;
  shapes->n_groups = n_groups;
  shapes->act_type = T;
  shapes->y_dims = a.dims;
  shapes->y_dims.back() = attrs.N;
  return "";
}

std::string GroupIndexError(const GptqNodeInfo& node, int64_t column, const int32_t* value, int64_t n_groups) {
  std::string s = node.Describe() + ": " + node.DescribeInput(kInputGIdx) + ": entry " + std::to_string(column);
  if (value) s += " is " + std::to_string(*value) + ",";
  return s + " expected a group in [0, " + std::to_string(n_groups) + ") (n_groups = scales.shape[1])";
}

std::string CheckGroupIndexValues(const int32_t* g_idx, int64_t K, int64_t n_groups, const GptqNodeInfo& node) {
  for (int64_t k = 0; k < K; ++k) {
    if (g_idx[k] < 0 || g_idx[k] >= n_groups) return GroupIndexError(node, k, &g_idx[k], n_groups);
  }
  return "";
}

OrtStatus* PrepareGptqCall(const OrtApi* api, OrtKernelContext* ctx, const GptqAttrs& attrs, const GptqNodeInfo& node,
                           ONNXTensorElementDataType act_type, GptqCall* call) {
  const OrtValue* values[kNumInputs] = {};
  for (size_t i = 0; i < kNumInputs; ++i) {
    if (OrtStatus* st = DescribeInput(api, ctx, i, &call->inputs[i], &values[i])) return st;
  }
  const std::string err = CheckGptqInputs(attrs, call->inputs, node, &call->shapes);
  if (!err.empty()) return api->CreateStatus(ORT_INVALID_ARGUMENT, err.c_str());
  if (call->shapes.act_type != act_type) {  // onnxruntime picks the kernel by A's type; keep the check anyway
    const std::string msg = node.Describe() + ": input 'A' has type " + TypeString(call->shapes.act_type) +
                            ", this kernel takes " + TypeString(act_type);
    return api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
  }
  for (size_t i = 0; i < kNumInputs; ++i) {
    call->data[i] = nullptr;
    if (!values[i]) continue;
    if (OrtStatus* st = api->GetTensorMutableData(const_cast<OrtValue*>(values[i]), &call->data[i])) return st;
  }
  const std::vector<int64_t>& y_dims = call->shapes.y_dims;
  OrtValue* y = nullptr;
  if (OrtStatus* st = api->KernelContext_GetOutput(ctx, 0, y_dims.data(), y_dims.size(), &y)) return st;
  return api->GetTensorMutableData(y, &call->y);
}

OrtStatus* KernelStatusError(const OrtApi* api, int status, const GptqNodeInfo& node, const char* kernel,
                             const std::string& detail) {
  if (status == ONNX_GPTQ_OK) return nullptr;
  const OrtErrorCode code = status == ONNX_GPTQ_ERR_LAUNCH          ? ORT_EP_FAIL
                            : status == ONNX_GPTQ_ERR_OUT_OF_MEMORY ? ORT_FAIL
                                                                    : ORT_INVALID_ARGUMENT;
  std::string msg = node.Describe() + ": " + kernel + " failed: " + onnx_gptq_status_string(status);
  if (!detail.empty()) msg += " (" + detail + ")";
  return api->CreateStatus(code, msg.c_str());
}

}  // namespace onnx_gptq
