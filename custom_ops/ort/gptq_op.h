// What every execution provider's GptqMatMul op shares: attribute reading,
// input checks with error messages naming the input, the OrtCustomOp
// callbacks that describe the op's signature, and output shape inference.
//
// The CUDA hook
// -------------
// register.cc adds the CPU ops to the "onnx_gptq" domain first and then, only
// when the library is compiled with ONNX_GPTQ_WITH_CUDA (custom_ops/cuda.cmake
// defines it), calls
//
//   OrtStatus* onnx_gptq_register_cuda_ops(const OrtApi* api, uint32_t api_version, OrtCustomOpDomain* domain,
//                                          int shape_inference);
//
// declared in cuda_gptq_matmul.h and implemented in the CUDA glue. It adds the
// CUDAExecutionProvider ops with api->CustomOpDomain_Add and returns nullptr
// or a status. `api_version` is the OrtCustomOp::version the CPU ops use:
// ONNX_GPTQ_ORT_API_SHAPE_INFER (17) when the runtime has shape inference,
// else ONNX_GPTQ_ORT_API_MIN (16). onnxruntime builds one schema per op name
// from the first op registered (the CPU float32 one: its signature, optional
// inputs 3-5 and InferOutputShapeFn apply to every provider), so every
// provider's op is described by InitGptqOpDef below with the same arguments
// but its type T and provider name, and checks its inputs with
// PrepareGptqCall: describe -> check -> launch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../kernels/gptq_status.h"
#include "ort_abi.h"

namespace onnx_gptq {

constexpr const char* kDomain = "onnx_gptq";
constexpr const char* kOpType = "GptqMatMul";

enum GptqInput : size_t {
  kInputA = 0,
  kInputB = 1,
  kInputScales = 2,
  kInputZeroPoints = 3,
  kInputGIdx = 4,
  kInputBias = 5,
  kNumInputs = 6,
};

// Formal name of input `index` ("A", "B", "scales", ...).
const char* GptqInputName(size_t index);

// An OrtCustomOp with what its callbacks need to know.
struct GptqOpDef : OrtCustomOp {
  const OrtApi* api = nullptr;
  ONNXTensorElementDataType act_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // T of A, scales, bias, Y
  const char* provider = nullptr;  // nullptr: CPU
};

// Fills the signature callbacks of `op` (name, inputs, outputs, optional
// inputs, versions, and output shape inference when `shape_inference` and
// op_version >= 17). The kernel callbacks (CreateKernelV2, KernelComputeV2,
// KernelDestroy) are the caller's.
void InitGptqOpDef(GptqOpDef* op, uint32_t op_version, const OrtApi* api, ONNXTensorElementDataType act_type,
                   const char* provider, bool shape_inference);

// Whether onnxruntime `version` ("1.24.1") can run a custom op's shape
// inference function on a node with an absent optional input followed by a
// present one (e.g. bias given, g_idx not): before 1.24 it dereferences the
// missing input's type and crashes while loading the model (verified with
// 1.17.3 and 1.23.2; 1.24.1 and 1.32 work).
bool ShapeInferenceSafe(const char* version);

// The node attributes, checked.
struct GptqAttrs {
  int64_t K = 0, N = 0, bits = 0, block_size = 0;
  // Optional, MatMulNBits' meaning, 0..4: 4 = int8 activations on CPU; the
  // CUDA op ignores it (fp16 math). Default 0.
  int64_t accuracy_level = 0;
  int64_t n_blocks = 0, blob_size = 0;  // derived
};

// Identifies a node in error messages: "GptqMatMul node 'name'" plus the
// names of the tensors wired to its inputs.
struct GptqNodeInfo {
  std::string name;
  std::vector<std::string> input_names;  // may be shorter than kNumInputs
  std::string Describe() const;
  std::string DescribeInput(size_t index) const;  // "input 'scales' (#2, tensor 'w.scales')"
};

// Reads the node's name and input names (best effort; empty when unknown).
GptqNodeInfo ReadNodeInfo(const OrtApi* api, const OrtKernelInfo* info);

// Reads and checks K, N, bits, block_size and accuracy_level. Returns nullptr or an error status.
OrtStatus* ReadGptqAttrs(const OrtApi* api, const OrtKernelInfo* info, const GptqNodeInfo& node, GptqAttrs* out);

// Type and shape of one input at run time.
struct TensorDesc {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
};

// Reads the type and shape of input `index` (absent optional inputs give
// present = false). `value` receives the OrtValue (nullptr when absent).
OrtStatus* DescribeInput(const OrtApi* api, OrtKernelContext* ctx, size_t index, TensorDesc* desc,
                         const OrtValue** value);

// What the checks derived from the inputs.
struct GptqShapes {
  int64_t M = 0;         // product of A's leading dimensions
  int64_t n_groups = 0;  // scales.shape[1]
  ONNXTensorElementDataType act_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> y_dims;  // [..., N]
};

// Checks types and shapes of all inputs against the attributes and each other
// (no tensor data is read). Returns "" when they agree, else a message naming
// the node, the input, and the expected and actual shapes or types.
std::string CheckGptqInputs(const GptqAttrs& attrs, const TensorDesc (&inputs)[kNumInputs],
                            const GptqNodeInfo& node, GptqShapes* shapes);

// Checks that every g_idx entry lies in [0, n_groups). Returns "" or a message.
std::string CheckGroupIndexValues(const int32_t* g_idx, int64_t K, int64_t n_groups, const GptqNodeInfo& node);

// The message for g_idx entry `column` outside [0, n_groups); `value` may be
// nullptr when only the column is known (the CUDA check runs on the device).
std::string GroupIndexError(const GptqNodeInfo& node, int64_t column, const int32_t* value, int64_t n_groups);

// One GptqMatMul call, described and checked, ready to launch: what every
// provider's Compute does before it hands raw pointers to its kernel.
struct GptqCall {
  TensorDesc inputs[kNumInputs];
  GptqShapes shapes;
  void* data[kNumInputs] = {};  // nullptr for absent optional inputs; the provider's memory
  void* y = nullptr;            // the output, allocated with shapes.y_dims
};

// Describes every input (DescribeInput), checks them (CheckGptqInputs) and
// that A has the kernel's type `act_type`, then fetches the data pointers and
// allocates Y. g_idx values are not read (where they live is the provider's
// business). Returns nullptr or a status naming the node and the input.
OrtStatus* PrepareGptqCall(const OrtApi* api, OrtKernelContext* ctx, const GptqAttrs& attrs, const GptqNodeInfo& node,
                           ONNXTensorElementDataType act_type, GptqCall* call);

// Turns a kernel's status code (../kernels/gptq_status.h) into an onnxruntime
// error naming the node, the kernel (`kernel`, e.g. "CPU kernel") and `detail`
// (may be empty): ORT_EP_FAIL for a CUDA runtime error, ORT_FAIL when out of
// memory, else ORT_INVALID_ARGUMENT. Returns nullptr for ONNX_GPTQ_OK.
OrtStatus* KernelStatusError(const OrtApi* api, int status, const GptqNodeInfo& node, const char* kernel,
                             const std::string& detail);

// "[2, 3, 64]" / "float16" for messages.
std::string ShapeString(const std::vector<int64_t>& dims);
const char* TypeString(ONNXTensorElementDataType type);

}  // namespace onnx_gptq
