// onnxruntime glue of the CUDA GptqMatMul kernel (custom_ops/kernels/cuda).
//
// Checks every input's type and shape against the node's attributes and each
// other, names the offending input with expected and actual shapes when they
// disagree, then calls onnx_gptq_cuda_matmul on the session's CUDA stream
// (KernelContext_GetGPUComputeStream). No CUDA headers are needed here: the
// stream travels as void*.
#include "cuda_gptq_matmul.h"

#include <atomic>
#include <climits>
#include <cstdint>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include "gptq_cuda.h"

namespace {

constexpr const char* kOpName = "GptqMatMul";
constexpr const char* kCudaEp = "CUDAExecutionProvider";
enum Input : size_t { kA = 0, kB = 1, kScales = 2, kZeroPoints = 3, kGIdx = 4, kBias = 5, kNumInputs = 6 };
const char* const kInputNames[kNumInputs] = {"A", "B", "scales", "zero_points", "g_idx", "bias"};

const OrtApi* g_api = nullptr;

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    default: return "an unsupported element type";
  }
}

OrtStatus* fail(OrtErrorCode code, const std::string& msg) { return g_api->CreateStatus(code, msg.c_str()); }

#define ONNX_GPTQ_RETURN_IF_ERROR(expr)  \
  do {                                   \
    OrtStatus* _status = (expr);         \
    if (_status != nullptr) return _status; \
  } while (0)

struct TensorDesc {
  const OrtValue* value = nullptr;  // nullptr: optional input absent
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

OrtStatus* describe(const OrtKernelContext* ctx, size_t index, size_t count, TensorDesc* out) {
  *out = TensorDesc{};
  if (index >= count) return nullptr;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, index, &out->value));
  if (out->value == nullptr) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(out->value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &out->type);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    out->shape.resize(rank);
    st = g_api->GetDimensions(info, out->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

struct GptqMatMulCudaKernel {
  std::string node;
  int64_t K = 0, N = 0, bits = 0, block_size = 0;
  // g_idx tensors already range-checked (initializers keep their address).
  std::mutex checked_mutex;
  std::unordered_set<const void*> checked_g_idx;

  std::string where() const { return "GptqMatMul node '" + node + "' (CUDA)"; }

  OrtStatus* expect(const TensorDesc& t, Input which, ONNXTensorElementDataType type,
                    const std::vector<int64_t>& shape) const {
    if (t.type != type || t.shape != shape) {
      std::ostringstream os;
      os << where() << ": input '" << kInputNames[which] << "' must be " << type_name(type) << " "
         << shape_str(shape) << ", got " << type_name(t.type) << " " << shape_str(t.shape);
      return fail(ORT_INVALID_ARGUMENT, os.str());
    }
    return nullptr;
  }

  OrtStatus* compute(OrtKernelContext* ctx) {
    size_t count = 0;
    ONNX_GPTQ_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &count));
    TensorDesc in[kNumInputs];
    for (size_t i = 0; i < kNumInputs; ++i) ONNX_GPTQ_RETURN_IF_ERROR(describe(ctx, i, count, &in[i]));
    for (Input required : {kA, kB, kScales})
      if (in[required].value == nullptr)
        return fail(ORT_INVALID_ARGUMENT, where() + ": required input '" + kInputNames[required] + "' is missing");

    const TensorDesc& a = in[kA];
    int dtype;
    switch (a.type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: dtype = 0; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: dtype = 1; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: dtype = 2; break;
      default:
        return fail(ORT_INVALID_ARGUMENT, where() + ": input 'A' must be float32, float16 or bfloat16, got " +
                                              type_name(a.type));
    }
    if (a.shape.empty() || a.shape.back() != K) {
      std::vector<int64_t> expected = a.shape.empty() ? std::vector<int64_t>{K} : a.shape;
      expected.back() = K;
      return fail(ORT_INVALID_ARGUMENT, where() + ": input 'A' must have shape [..., " + std::to_string(K) +
                                            "] (K), got " + shape_str(a.shape) + "; expected e.g. " +
                                            shape_str(expected));
    }
    int64_t M = 1;
    for (size_t i = 0; i + 1 < a.shape.size(); ++i) M *= a.shape[i];

    const int64_t n_blocks = (K + block_size - 1) / block_size;
    const int64_t blob_size = (block_size * bits + 7) / 8;
    ONNX_GPTQ_RETURN_IF_ERROR(expect(in[kB], kB, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {N, n_blocks, blob_size}));
    const bool has_g_idx = in[kGIdx].value != nullptr;
    if (in[kScales].shape.size() != 2 || in[kScales].type != a.type ||
        (!has_g_idx && in[kScales].shape[1] != n_blocks) || in[kScales].shape[0] != N) {
      std::ostringstream os;
      os << where() << ": input 'scales' must be " << type_name(a.type) << " [" << N << ", "
         << (has_g_idx ? std::string("n_groups") : std::to_string(n_blocks)) << "], got "
         << type_name(in[kScales].type) << " " << shape_str(in[kScales].shape);
      return fail(ORT_INVALID_ARGUMENT, os.str());
    }
    const int64_t n_groups = in[kScales].shape[1];
    if (n_groups < 1 || n_groups > K)
      return fail(ORT_INVALID_ARGUMENT, where() + ": input 'scales' has " + std::to_string(n_groups) +
                                            " groups; need 1 .. K = " + std::to_string(K));
    if (in[kZeroPoints].value)
      ONNX_GPTQ_RETURN_IF_ERROR(expect(in[kZeroPoints], kZeroPoints, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {N, n_groups}));
    if (has_g_idx) ONNX_GPTQ_RETURN_IF_ERROR(expect(in[kGIdx], kGIdx, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {K}));
    if (in[kBias].value) ONNX_GPTQ_RETURN_IF_ERROR(expect(in[kBias], kBias, a.type, {N}));

    std::vector<int64_t> y_shape = a.shape;
    y_shape.back() = N;
    OrtValue* y = nullptr;
    ONNX_GPTQ_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, y_shape.data(), y_shape.size(), &y));
    if (M == 0 || N == 0) return nullptr;

    void* stream = nullptr;
    ONNX_GPTQ_RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
    void* ptr[kNumInputs] = {};
    for (size_t i = 0; i < kNumInputs; ++i)
      if (in[i].value) ONNX_GPTQ_RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(in[i].value), &ptr[i]));
    void* y_data = nullptr;
    ONNX_GPTQ_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &y_data));

    if (has_g_idx) ONNX_GPTQ_RETURN_IF_ERROR(check_g_idx(static_cast<const int32_t*>(ptr[kGIdx]), n_groups, stream));

    const int rc = onnx_gptq_cuda_matmul(ptr[kA], static_cast<const uint8_t*>(ptr[kB]), ptr[kScales],
                                         static_cast<const uint8_t*>(ptr[kZeroPoints]),
                                         static_cast<const int32_t*>(ptr[kGIdx]), ptr[kBias], y_data, M, K, N,
                                         static_cast<int>(bits), block_size, n_groups, dtype, stream);
    if (rc != ONNX_GPTQ_CUDA_OK) {
      std::ostringstream os;
      os << where() << ": " << onnx_gptq_cuda_error_string(rc) << " (A " << shape_str(a.shape) << ", B "
         << shape_str(in[kB].shape) << ", scales " << shape_str(in[kScales].shape) << ", M=" << M << " K=" << K
         << " N=" << N << " bits=" << bits << " block_size=" << block_size << ")";
      if (rc == ONNX_GPTQ_CUDA_ERR_LAUNCH) os << ": " << onnx_gptq_cuda_last_launch_error();
      return fail(rc == ONNX_GPTQ_CUDA_ERR_LAUNCH ? ORT_EP_FAIL : ORT_INVALID_ARGUMENT, os.str());
    }
    return nullptr;
  }

  // Range-checks g_idx once per tensor address (a synchronising device->host copy).
  OrtStatus* check_g_idx(const int32_t* g_idx, int64_t n_groups, void* stream) {
    {
      std::lock_guard<std::mutex> lock(checked_mutex);
      if (checked_g_idx.count(g_idx)) return nullptr;
    }
    int64_t bad = -1;
    const int rc = onnx_gptq_cuda_check_g_idx(g_idx, K, n_groups, &bad, stream);
    if (rc == ONNX_GPTQ_CUDA_ERR_G_IDX)
      return fail(ORT_INVALID_ARGUMENT, where() + ": input 'g_idx' entry " + std::to_string(bad) +
                                            " is outside [0, " + std::to_string(n_groups) + ") (n_groups of 'scales')");
    if (rc != ONNX_GPTQ_CUDA_OK)
      return fail(ORT_EP_FAIL, where() + ": checking 'g_idx' failed: " + onnx_gptq_cuda_error_string(rc) + " " +
                                   onnx_gptq_cuda_last_launch_error());
    std::lock_guard<std::mutex> lock(checked_mutex);
    checked_g_idx.insert(g_idx);
    return nullptr;
  }
};

OrtStatus* read_int_attr(const OrtKernelInfo* info, const char* name, const std::string& node, int64_t* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (st == nullptr) return nullptr;
  const std::string msg = std::string("GptqMatMul node '") + node + "' (CUDA): missing int attribute '" + name +
                          "': " + g_api->GetErrorMessage(st);
  g_api->ReleaseStatus(st);
  return fail(ORT_INVALID_ARGUMENT, msg);
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  std::string node;
  size_t size = 0;
  if (g_api->KernelInfo_GetNodeName(info, nullptr, &size) == nullptr && size > 0) {
    std::vector<char> buf(size);
    if (g_api->KernelInfo_GetNodeName(info, buf.data(), &size) == nullptr) node.assign(buf.data());
  }
  auto* k = new (std::nothrow) GptqMatMulCudaKernel();
  if (k == nullptr) return fail(ORT_FAIL, "GptqMatMul (CUDA): out of host memory");
  k->node = node;
  OrtStatus* st = read_int_attr(info, "K", node, &k->K);
  if (st == nullptr) st = read_int_attr(info, "N", node, &k->N);
  if (st == nullptr) st = read_int_attr(info, "bits", node, &k->bits);
  if (st == nullptr) st = read_int_attr(info, "block_size", node, &k->block_size);
  if (st == nullptr) {
    std::ostringstream os;
    if (k->bits != 2 && k->bits != 3 && k->bits != 4 && k->bits != 8)
      os << "attribute bits=" << k->bits << " is not one of 2, 3, 4, 8";
    else if (k->K < 1 || k->K >= (int64_t{1} << 31))
      os << "attribute K=" << k->K << " must be in [1, 2**31)";
    else if (k->N < 0 || k->N >= (int64_t{1} << 31))
      os << "attribute N=" << k->N << " must be in [0, 2**31)";
    else if (k->block_size < 1 || k->block_size >= (int64_t{1} << 31))
      os << "attribute block_size=" << k->block_size << " must be in [1, 2**31)";
    if (!os.str().empty()) st = fail(ORT_INVALID_ARGUMENT, k->where() + ": " + os.str());
  }
  if (st != nullptr) {
    delete k;
    return st;
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* kernel_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    return static_cast<GptqMatMulCudaKernel*>(kernel)->compute(ctx);
  } catch (const std::exception& e) {  // std::bad_alloc from shape strings; never let it cross the C ABI
    return fail(ORT_FAIL, std::string("GptqMatMul (CUDA): ") + e.what());
  }
}

void kernel_destroy(void* kernel) { delete static_cast<GptqMatMulCudaKernel*>(kernel); }

// Y: A's shape with the last dimension replaced by attribute N, A's element type.
OrtStatus* infer_output_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  // The context owns a_info (onnxruntime keeps it in a unique_ptr): never release it.
  OrtTensorTypeAndShapeInfo* a_info = nullptr;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(ctx, kA, &a_info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(a_info, &type);
  if (st == nullptr) st = g_api->GetDimensionsCount(a_info, &rank);
  std::vector<int64_t> dims(rank);
  std::vector<const char*> symbols(rank, nullptr);
  if (st == nullptr && rank > 0) st = g_api->GetDimensions(a_info, dims.data(), rank);
  if (st == nullptr && rank > 0) st = g_api->GetSymbolicDimensions(a_info, symbols.data(), rank);
  if (st != nullptr) return st;
  std::vector<std::string> symbol_store(rank);
  for (size_t i = 0; i < rank; ++i) symbol_store[i] = symbols[i] ? symbols[i] : "";
  if (rank == 0) return fail(ORT_INVALID_GRAPH, "GptqMatMul: input 'A' must have rank >= 1, got a scalar");

  const OrtOpAttr* attr = nullptr;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->ShapeInferContext_GetAttribute(ctx, "N", &attr));
  int64_t n = 0;
  size_t read = 0;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &read));
  dims.back() = n;
  symbol_store.back().clear();
  std::vector<const char*> out_symbols(rank);
  for (size_t i = 0; i < rank; ++i) out_symbols[i] = symbol_store[i].c_str();

  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  ONNX_GPTQ_RETURN_IF_ERROR(g_api->CreateTensorTypeAndShapeInfo(&y_info));
  st = g_api->SetTensorElementType(y_info, type);
  if (st == nullptr) st = g_api->SetDimensions(y_info, dims.data(), rank);
  if (st == nullptr) st = g_api->SetSymbolicDimensions(y_info, out_symbols.data(), rank);
  if (st == nullptr) st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info);
  g_api->ReleaseTensorTypeAndShapeInfo(y_info);
  return st;
}

const char* get_name(const OrtCustomOp*) { return kOpName; }
const char* get_ep(const OrtCustomOp*) { return kCudaEp; }
size_t input_count(const OrtCustomOp*) { return kNumInputs; }
size_t output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType input_type(const OrtCustomOp*, size_t index) {
  switch (index) {
    case kB:
    case kZeroPoints: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case kGIdx: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // T: float32 / float16 / bfloat16, checked at run time
  }
}
ONNXTensorElementDataType output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp*, size_t index) {
  return index <= kScales ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
OrtCustomOpInputOutputCharacteristic output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }  // all on the GPU
int variadic_arity(const OrtCustomOp*) { return 1; }
int variadic_homogeneity(const OrtCustomOp*) { return 1; }
int start_version(const OrtCustomOp*) { return 1; }
int end_version(const OrtCustomOp*) { return INT_MAX; }

OrtCustomOp make_op(uint32_t api_version) {
  OrtCustomOp op{};
  const bool shape_infer = api_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER;
  op.version = shape_infer ? ONNX_GPTQ_ORT_API_SHAPE_INFER : ONNX_GPTQ_ORT_API_MIN;
  op.CreateKernel = nullptr;  // V2 entry points below
  op.GetName = get_name;
  op.GetExecutionProviderType = get_ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = nullptr;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = variadic_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneity;
  op.GetVariadicOutputMinArity = variadic_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneity;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = kernel_compute;
  op.InferOutputShapeFn = shape_infer ? infer_output_shape : nullptr;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

}  // namespace

extern "C" OrtStatus* onnx_gptq_register_cuda_ops(const OrtApi* api, uint32_t api_version, OrtCustomOpDomain* domain) {
  if (api == nullptr) return nullptr;  // nothing to report through; register.cc never passes null
  if (domain == nullptr) return api->CreateStatus(ORT_INVALID_ARGUMENT, "onnx_gptq_register_cuda_ops: null domain");
  g_api = api;
  // One static op per API flavour; onnxruntime keeps pointers to it for the process lifetime.
  static OrtCustomOp op_shape_infer = make_op(ONNX_GPTQ_ORT_API_SHAPE_INFER);
  static OrtCustomOp op_min = make_op(ONNX_GPTQ_ORT_API_MIN);
  const OrtCustomOp* op = api_version >= ONNX_GPTQ_ORT_API_SHAPE_INFER ? &op_shape_infer : &op_min;
  return api->CustomOpDomain_Add(domain, op);
}
