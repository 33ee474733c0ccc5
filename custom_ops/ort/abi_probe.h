// A self-test of ort_abi.h against the onnxruntime that loads the library.
//
// ort_abi.h declares onnxruntime's function table by hand (no headers are
// installable), and a slot counted wrong would call the wrong function. The
// probe calls every slot the header names, in the situation the library calls
// it (registration, kernel creation, shape inference, compute), and records
// for each what it observed: "ok" when the result could be judged on the spot
// (a status read back, dimensions written and read), else the value seen (a
// node name, an attribute) for the caller to compare with its model.
//
// Off unless armed: onnx_gptq_abi_probe_arm(1) (ctypes) before a session
// registers the library makes RegisterCustomOps also add the domain
// "onnx_gptq.abi_probe" with the op AbiProbe: Y = X * f + i for float32 X,
// attributes f (float), i (int) and s (string). tests/test_ort_abi.py runs it
// in a child process, so a wrong slot that crashes fails the test instead of
// the test run.
#pragma once

#include <cstdint>

#include "ort_abi.h"

namespace onnx_gptq {

// Whether onnx_gptq_abi_probe_arm() has armed the probe.
bool AbiProbeArmed();

// Creates the probe's domain, runs the checks that need no kernel, and adds
// the domain to `options`. `*domain` receives the domain (the caller keeps it
// alive as long as sessions may use it). Returns nullptr or an error status.
OrtStatus* AddAbiProbeDomain(const OrtApiBase* api_base, const OrtApi* api, uint32_t op_version,
                             OrtSessionOptions* options, OrtCustomOpDomain** domain);

}  // namespace onnx_gptq
