// Minimal declarations of the part of onnxruntime's C ABI that onnx_gptq's
// custom-op library uses.
//
// Why not onnxruntime's own header: the Python wheel ships no headers, and the
// library must build anywhere `pip install .` runs. The ABI is stable by
// design: `OrtApi` is a table of function pointers that only ever grows at the
// end, and `OrtCustomOp` is a struct whose newer fields onnxruntime reads only
// when the op's `version` field says they exist.
//
// These declarations were written from the layout of onnxruntime's public
// header include/onnxruntime/core/session/onnxruntime_c_api.h (API versions
// 16..30). Every slot of `OrtApi` up to the last one named here is accounted
// for: slots we never call are `OrtAbiUnusedSlot` placeholders, and the
// static_asserts at the bottom pin the index of every named slot, so a
// miscounted gap fails the build instead of calling the wrong function.
// Those asserts only check the comments' arithmetic; that the slots hold what
// their names say is checked against the installed onnxruntime by abi_probe.cc
// (tests/test_ort_abi.py), which calls every named slot and judges the result.
// A slot is named here only if the library or that probe calls it.
//
// Versions: the library asks for ONNX_GPTQ_ORT_API_MIN (onnxruntime 1.16) and
// uses the shape-inference hooks only when the runtime also answers
// ONNX_GPTQ_ORT_API_SHAPE_INFER (onnxruntime >= 1.17). Functions marked
// "API >= N" below must not be called on an older runtime.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#define ORT_ABI_NOEXCEPT noexcept
#else
#define ORT_ABI_NOEXCEPT
#endif

// The oldest runtime the library loads in (onnxruntime 1.16 = API 16).
#define ONNX_GPTQ_ORT_API_MIN 16
// The API version that added OrtCustomOp::InferOutputShapeFn and the
// ShapeInferContext_* functions (onnxruntime 1.17).
#define ONNX_GPTQ_ORT_API_SHAPE_INFER 17

// ------------------------------------------------------------------ enums

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING = 8,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE = 11,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 = 12,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 = 13,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX64 = 14,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX128 = 15,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_NO_SUCHFILE = 3,
  ORT_NO_MODEL = 4,
  ORT_ENGINE_ERROR = 5,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_INVALID_PROTOBUF = 7,
  ORT_MODEL_LOADED = 8,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_INVALID_GRAPH = 10,
  ORT_EP_FAIL = 11,
} OrtErrorCode;

typedef enum OrtLoggingLevel {
  ORT_LOGGING_LEVEL_VERBOSE = 0,
  ORT_LOGGING_LEVEL_INFO = 1,
  ORT_LOGGING_LEVEL_WARNING = 2,
  ORT_LOGGING_LEVEL_ERROR = 3,
  ORT_LOGGING_LEVEL_FATAL = 4,
} OrtLoggingLevel;

typedef enum OrtOpAttrType {
  ORT_OP_ATTR_UNDEFINED = 0,
  ORT_OP_ATTR_INT = 1,
  ORT_OP_ATTR_INTS = 2,
  ORT_OP_ATTR_FLOAT = 3,
  ORT_OP_ATTR_FLOATS = 4,
  ORT_OP_ATTR_STRING = 5,
  ORT_OP_ATTR_STRINGS = 6,
} OrtOpAttrType;

typedef enum OrtAllocatorType {
  OrtInvalidAllocator = -1,
  OrtDeviceAllocator = 0,
  OrtArenaAllocator = 1,
} OrtAllocatorType;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,   // CPU memory used by a non-CPU execution provider
  OrtMemTypeCPUOutput = -1,  // CPU memory produced by a non-CPU execution provider
  OrtMemTypeCPU = OrtMemTypeCPUOutput,
  OrtMemTypeDefault = 0,     // the execution provider's own memory
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

// ------------------------------------------------------------------ opaque handles

typedef struct OrtEnv OrtEnv;
typedef struct OrtStatus OrtStatus;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtSession OrtSession;
typedef struct OrtValue OrtValue;
typedef struct OrtRunOptions OrtRunOptions;
typedef struct OrtTypeInfo OrtTypeInfo;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtOpAttr OrtOpAttr;
typedef struct OrtLogger OrtLogger;
typedef struct OrtShapeInferContext OrtShapeInferContext;
typedef OrtStatus* OrtStatusPtr;  // nullptr means success

// The first four fields of onnxruntime's allocator (later versions append more;
// we only ever receive allocators from onnxruntime, never build one).
typedef struct OrtAllocator {
  uint32_t version;
  void* (*Alloc)(struct OrtAllocator* this_, size_t size);
  void (*Free)(struct OrtAllocator* this_, void* p);
  const OrtMemoryInfo* (*Info)(const struct OrtAllocator* this_);
} OrtAllocator;

// A slot of OrtApi that this library never calls.
typedef void (*OrtAbiUnusedSlot)(void);

// ------------------------------------------------------------------ OrtApiBase

typedef struct OrtApi OrtApi;

typedef struct OrtApiBase {
  // nullptr when the runtime is older than `version`.
  const OrtApi* (*GetApi)(uint32_t version)ORT_ABI_NOEXCEPT;
  const char* (*GetVersionString)(void)ORT_ABI_NOEXCEPT;
} OrtApiBase;

// ------------------------------------------------------------------ OrtApi
// Slot indices in the comments; ranges of unused slots say which ones they hold.

#define ORT_ABI_FN(NAME, ...) OrtStatusPtr (*NAME)(__VA_ARGS__)ORT_ABI_NOEXCEPT

struct OrtApi {
  /*   0 */ OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg)ORT_ABI_NOEXCEPT;
  /*   1 */ OrtErrorCode (*GetErrorCode)(const OrtStatus* status)ORT_ABI_NOEXCEPT;
  /*   2 */ const char* (*GetErrorMessage)(const OrtStatus* status)ORT_ABI_NOEXCEPT;
  /*   3..25: CreateEnv .. SetInterOpNumThreads */
  OrtAbiUnusedSlot unused_3_25[23];
  /*  26 */ ORT_ABI_FN(CreateCustomOpDomain, const char* domain, OrtCustomOpDomain** out);
  /*  27 */ ORT_ABI_FN(CustomOpDomain_Add, OrtCustomOpDomain* custom_op_domain, const struct OrtCustomOp* op);
  /*  28 */ ORT_ABI_FN(AddCustomOpDomain, OrtSessionOptions* options, OrtCustomOpDomain* custom_op_domain);
  /*  29..50: RegisterCustomOpsLibrary .. IsTensor */
  OrtAbiUnusedSlot unused_29_50[22];
  /*  51 */ ORT_ABI_FN(GetTensorMutableData, OrtValue* value, void** out);
  /*  52..56: FillStringTensor .. GetOnnxTypeFromTypeInfo */
  OrtAbiUnusedSlot unused_52_56[5];
  /*  57 */ ORT_ABI_FN(CreateTensorTypeAndShapeInfo, OrtTensorTypeAndShapeInfo** out);
  /*  58 */ ORT_ABI_FN(SetTensorElementType, OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType type);
  /*  59 */ ORT_ABI_FN(SetDimensions, OrtTensorTypeAndShapeInfo* info, const int64_t* dim_values, size_t dim_count);
  /*  60 */ ORT_ABI_FN(GetTensorElementType, const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out);
  /*  61 */ ORT_ABI_FN(GetDimensionsCount, const OrtTensorTypeAndShapeInfo* info, size_t* out);
  /*  62 */ ORT_ABI_FN(GetDimensions, const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values, size_t dim_values_length);
  /*  63 */ ORT_ABI_FN(GetSymbolicDimensions, const OrtTensorTypeAndShapeInfo* info, const char* dim_params[],
                      size_t dim_params_length);
  /*  64 */ ORT_ABI_FN(GetTensorShapeElementCount, const OrtTensorTypeAndShapeInfo* info, size_t* out);
  /*  65 */ ORT_ABI_FN(GetTensorTypeAndShape, const OrtValue* value, OrtTensorTypeAndShapeInfo** out);
  /*  66..67: GetTypeInfo, GetValueType */
  OrtAbiUnusedSlot unused_66_67[2];
  /*  68 */ ORT_ABI_FN(CreateMemoryInfo, const char* name, OrtAllocatorType type, int id, OrtMemType mem_type,
                      OrtMemoryInfo** out);
  /*  69 */ ORT_ABI_FN(CreateCpuMemoryInfo, OrtAllocatorType type, OrtMemType mem_type, OrtMemoryInfo** out);
  /*  70..74: CompareMemoryInfo .. MemoryInfoGetType */
  OrtAbiUnusedSlot unused_70_74[5];
  /*  75 */ ORT_ABI_FN(AllocatorAlloc, OrtAllocator* allocator, size_t size, void** out);
  /*  76 */ ORT_ABI_FN(AllocatorFree, OrtAllocator* allocator, void* p);
  /*  77 */ ORT_ABI_FN(AllocatorGetInfo, const OrtAllocator* allocator, const OrtMemoryInfo** out);
  /*  78 */ ORT_ABI_FN(GetAllocatorWithDefaultOptions, OrtAllocator** out);
  /*  79..84: AddFreeDimensionOverride .. GetOpaqueValue */
  OrtAbiUnusedSlot unused_79_84[6];
  /*  85 */ ORT_ABI_FN(KernelInfoGetAttribute_float, const OrtKernelInfo* info, const char* name, float* out);
  /*  86 */ ORT_ABI_FN(KernelInfoGetAttribute_int64, const OrtKernelInfo* info, const char* name, int64_t* out);
  /*  87 */ ORT_ABI_FN(KernelInfoGetAttribute_string, const OrtKernelInfo* info, const char* name, char* out,
                      size_t* size);
  /*  88 */ ORT_ABI_FN(KernelContext_GetInputCount, const OrtKernelContext* context, size_t* out);
  /*  89 */ ORT_ABI_FN(KernelContext_GetOutputCount, const OrtKernelContext* context, size_t* out);
  /*  90 */ ORT_ABI_FN(KernelContext_GetInput, const OrtKernelContext* context, size_t index, const OrtValue** out);
  /*  91 */ ORT_ABI_FN(KernelContext_GetOutput, OrtKernelContext* context, size_t index, const int64_t* dim_values,
                      size_t dim_count, OrtValue** out);
  /*  92: ReleaseEnv */
  OrtAbiUnusedSlot unused_92[1];
  /*  93 */ void (*ReleaseStatus)(OrtStatus* input)ORT_ABI_NOEXCEPT;
  /*  94 */ void (*ReleaseMemoryInfo)(OrtMemoryInfo* input)ORT_ABI_NOEXCEPT;
  /*  95..97: ReleaseSession, ReleaseValue, ReleaseRunOptions */
  OrtAbiUnusedSlot unused_95_97[3];
  /*  98 */ void (*ReleaseTypeInfo)(OrtTypeInfo* input)ORT_ABI_NOEXCEPT;
  /*  99 */ void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* input)ORT_ABI_NOEXCEPT;
  /* 100: ReleaseSessionOptions */
  OrtAbiUnusedSlot unused_100[1];
  /* 101 */ void (*ReleaseCustomOpDomain)(OrtCustomOpDomain* input)ORT_ABI_NOEXCEPT;
  /* 102..192: GetDenotationFromTypeInfo .. HasValue */
  OrtAbiUnusedSlot unused_102_192[91];
  /* 193 */ ORT_ABI_FN(KernelContext_GetGPUComputeStream, const OrtKernelContext* context, void** out);
  /* 194 */ ORT_ABI_FN(GetTensorMemoryInfo, const OrtValue* value, const OrtMemoryInfo** mem_info);
  /* 195..229: GetExecutionProviderApi .. RegisterCustomOpsUsingFunction */
  OrtAbiUnusedSlot unused_195_229[35];
  /* 230 */ ORT_ABI_FN(KernelInfo_GetInputCount, const OrtKernelInfo* info, size_t* out);
  /* 231 */ ORT_ABI_FN(KernelInfo_GetOutputCount, const OrtKernelInfo* info, size_t* out);
  /* 232 */ ORT_ABI_FN(KernelInfo_GetInputName, const OrtKernelInfo* info, size_t index, char* out, size_t* size);
  /* 233 */ ORT_ABI_FN(KernelInfo_GetOutputName, const OrtKernelInfo* info, size_t index, char* out, size_t* size);
  /* 234 */ ORT_ABI_FN(KernelInfo_GetInputTypeInfo, const OrtKernelInfo* info, size_t index, OrtTypeInfo** type_info);
  /* 235 */ ORT_ABI_FN(KernelInfo_GetOutputTypeInfo, const OrtKernelInfo* info, size_t index,
                      OrtTypeInfo** type_info);
  /* 236..243: KernelInfoGetAttribute_tensor .. ReleaseDnnlProviderOptions */
  OrtAbiUnusedSlot unused_236_243[8];
  /* 244 */ ORT_ABI_FN(KernelInfo_GetNodeName, const OrtKernelInfo* info, char* out, size_t* size);
  /* 245 */ ORT_ABI_FN(KernelInfo_GetLogger, const OrtKernelInfo* info, const OrtLogger** logger);
  /* 246 */ ORT_ABI_FN(KernelContext_GetLogger, const OrtKernelContext* context, const OrtLogger** logger);
  /* 247 */ ORT_ABI_FN(Logger_LogMessage, const OrtLogger* logger, OrtLoggingLevel log_severity_level,
                      const char* message, const char* file_path, int line_number, const char* func_name);
  /* 248 */ ORT_ABI_FN(Logger_GetLoggingSeverityLevel, const OrtLogger* logger, OrtLoggingLevel* out);
  /* 249..266: KernelInfoGetConstantInput_tensor .. SetUserLoggingFunction */
  OrtAbiUnusedSlot unused_249_266[18];
  // ---- API >= 17 from here on.
  /* 267 */ ORT_ABI_FN(ShapeInferContext_GetInputCount, const OrtShapeInferContext* context, size_t* out);
  /* 268 */ ORT_ABI_FN(ShapeInferContext_GetInputTypeShape, const OrtShapeInferContext* context, size_t index,
                      OrtTensorTypeAndShapeInfo** info);
  /* 269 */ ORT_ABI_FN(ShapeInferContext_GetAttribute, const OrtShapeInferContext* context, const char* attr_name,
                      const OrtOpAttr** attr);
  /* 270 */ ORT_ABI_FN(ShapeInferContext_SetOutputTypeShape, const OrtShapeInferContext* context, size_t index,
                      const OrtTensorTypeAndShapeInfo* info);
  /* 271 */ ORT_ABI_FN(SetSymbolicDimensions, OrtTensorTypeAndShapeInfo* info, const char* dim_params[],
                      size_t dim_params_length);
  /* 272 */ ORT_ABI_FN(ReadOpAttr, const OrtOpAttr* op_attr, OrtOpAttrType type, void* data, size_t len, size_t* out);
  /* 273: SetDeterministicCompute */
  OrtAbiUnusedSlot unused_273[1];
  /* 274 */ ORT_ABI_FN(KernelContext_ParallelFor, const OrtKernelContext* context, void (*fn)(void*, size_t),
                      size_t total, size_t num_batch, void* usr_data);
  // Later slots exist in newer runtimes; this library never reads them.
};

#undef ORT_ABI_FN

// ------------------------------------------------------------------ OrtCustomOp
// onnxruntime reads a field only when `version` is at least the API version
// that introduced it (noted on the right). Set `version` to the API version
// whose fields are filled in.

typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);  // unused if V2
  const char* (*GetName)(const struct OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);  // nullptr -> CPU
  ONNXTensorElementDataType (*GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);  // unused if V2
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);  // >= 8
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);  // >= 13
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);                  // >= 14
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
  OrtStatusPtr (*CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                 void** kernel);                              // >= 16
  OrtStatusPtr (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);  // >= 16
  OrtStatusPtr (*InferOutputShapeFn)(const struct OrtCustomOp* op, OrtShapeInferContext* ctx);  // >= 17
  int (*GetStartVersion)(const struct OrtCustomOp* op);                                          // >= 17
  int (*GetEndVersion)(const struct OrtCustomOp* op);                                            // >= 17
  size_t (*GetMayInplace)(int** input_index, int** output_index);                                // >= 18
  void (*ReleaseMayInplace)(int* input_index, int* output_index);                                // >= 18
  size_t (*GetAliasMap)(int** input_index, int** output_index);                                  // later
  void (*ReleaseAliasMap)(int* input_index, int* output_index);                                  // later
} OrtCustomOp;

// The entry point onnxruntime looks up in a library given to
// SessionOptions.register_custom_ops_library.
typedef OrtStatus* (*RegisterCustomOpsFn)(OrtSessionOptions* options, const OrtApiBase* api);

#ifdef __cplusplus
}  // extern "C"

// Pin every named slot to the index its comment gives (tests/test_ort_abi.py reads the comments).
#define ORT_ABI_SLOT(NAME, INDEX) \
  static_assert(offsetof(OrtApi, NAME) == (INDEX) * sizeof(void*), "OrtApi slot " #NAME " is not at index " #INDEX)
ORT_ABI_SLOT(CreateStatus, 0);
ORT_ABI_SLOT(GetErrorCode, 1);
ORT_ABI_SLOT(GetErrorMessage, 2);
ORT_ABI_SLOT(CreateCustomOpDomain, 26);
ORT_ABI_SLOT(CustomOpDomain_Add, 27);
ORT_ABI_SLOT(AddCustomOpDomain, 28);
ORT_ABI_SLOT(GetTensorMutableData, 51);
ORT_ABI_SLOT(CreateTensorTypeAndShapeInfo, 57);
ORT_ABI_SLOT(SetTensorElementType, 58);
ORT_ABI_SLOT(SetDimensions, 59);
ORT_ABI_SLOT(GetTensorElementType, 60);
ORT_ABI_SLOT(GetDimensionsCount, 61);
ORT_ABI_SLOT(GetDimensions, 62);
ORT_ABI_SLOT(GetSymbolicDimensions, 63);
ORT_ABI_SLOT(GetTensorShapeElementCount, 64);
ORT_ABI_SLOT(GetTensorTypeAndShape, 65);
ORT_ABI_SLOT(CreateMemoryInfo, 68);
ORT_ABI_SLOT(CreateCpuMemoryInfo, 69);
ORT_ABI_SLOT(AllocatorAlloc, 75);
ORT_ABI_SLOT(AllocatorFree, 76);
ORT_ABI_SLOT(AllocatorGetInfo, 77);
ORT_ABI_SLOT(GetAllocatorWithDefaultOptions, 78);
ORT_ABI_SLOT(KernelInfoGetAttribute_float, 85);
ORT_ABI_SLOT(KernelInfoGetAttribute_int64, 86);
ORT_ABI_SLOT(KernelInfoGetAttribute_string, 87);
ORT_ABI_SLOT(KernelContext_GetInputCount, 88);
ORT_ABI_SLOT(KernelContext_GetOutputCount, 89);
ORT_ABI_SLOT(KernelContext_GetInput, 90);
ORT_ABI_SLOT(KernelContext_GetOutput, 91);
ORT_ABI_SLOT(ReleaseStatus, 93);
ORT_ABI_SLOT(ReleaseMemoryInfo, 94);
ORT_ABI_SLOT(ReleaseTypeInfo, 98);
ORT_ABI_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
ORT_ABI_SLOT(ReleaseCustomOpDomain, 101);
ORT_ABI_SLOT(KernelContext_GetGPUComputeStream, 193);
ORT_ABI_SLOT(GetTensorMemoryInfo, 194);
ORT_ABI_SLOT(KernelInfo_GetInputCount, 230);
ORT_ABI_SLOT(KernelInfo_GetOutputCount, 231);
ORT_ABI_SLOT(KernelInfo_GetInputName, 232);
ORT_ABI_SLOT(KernelInfo_GetOutputName, 233);
ORT_ABI_SLOT(KernelInfo_GetInputTypeInfo, 234);
ORT_ABI_SLOT(KernelInfo_GetOutputTypeInfo, 235);
ORT_ABI_SLOT(KernelInfo_GetNodeName, 244);
ORT_ABI_SLOT(KernelInfo_GetLogger, 245);
ORT_ABI_SLOT(KernelContext_GetLogger, 246);
ORT_ABI_SLOT(Logger_LogMessage, 247);
ORT_ABI_SLOT(Logger_GetLoggingSeverityLevel, 248);
ORT_ABI_SLOT(ShapeInferContext_GetInputCount, 267);
ORT_ABI_SLOT(ShapeInferContext_GetInputTypeShape, 268);
ORT_ABI_SLOT(ShapeInferContext_GetAttribute, 269);
ORT_ABI_SLOT(ShapeInferContext_SetOutputTypeShape, 270);
ORT_ABI_SLOT(SetSymbolicDimensions, 271);
ORT_ABI_SLOT(ReadOpAttr, 272);
ORT_ABI_SLOT(KernelContext_ParallelFor, 274);
#undef ORT_ABI_SLOT
static_assert(sizeof(OrtApi) == 275 * sizeof(void*), "OrtApi ends after slot 274");
// OrtCustomOp: a uint32_t padded to pointer alignment, then 25 function pointers.
static_assert(offsetof(OrtCustomOp, CreateKernel) == 1 * sizeof(void*), "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, GetInputCharacteristic) == 10 * sizeof(void*), "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, CreateKernelV2) == 17 * sizeof(void*), "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, InferOutputShapeFn) == 19 * sizeof(void*), "OrtCustomOp layout");
static_assert(sizeof(OrtCustomOp) == 26 * sizeof(void*), "OrtCustomOp layout");
#endif  // __cplusplus
