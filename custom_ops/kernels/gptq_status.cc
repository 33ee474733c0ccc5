// Names and descriptions of the status codes, generated from gptq_status.h's list.
#include "gptq_status.h"

extern "C" {

const char* onnx_gptq_status_name(int status) {
  switch (status) {
#define ONNX_GPTQ_STATUS_NAME_CASE(NAME, VALUE, TEXT) \
  case VALUE: return #NAME;
    ONNX_GPTQ_STATUS_LIST(ONNX_GPTQ_STATUS_NAME_CASE)
#undef ONNX_GPTQ_STATUS_NAME_CASE
  }
  return nullptr;
}

const char* onnx_gptq_status_string(int status) {
  switch (status) {
#define ONNX_GPTQ_STATUS_TEXT_CASE(NAME, VALUE, TEXT) \
  case VALUE: return TEXT;
    ONNX_GPTQ_STATUS_LIST(ONNX_GPTQ_STATUS_TEXT_CASE)
#undef ONNX_GPTQ_STATUS_TEXT_CASE
  }
  return "unknown onnx_gptq status";
}

}  // extern "C"
