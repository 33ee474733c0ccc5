# CUDA kernels of onnx_gptq.GptqMatMul, added to the custom-op library.
#
# Included by custom_ops/CMakeLists.txt (owned by the library's build) when
# CUDA is enabled, *after* the library target exists:
#
#     set(ONNX_GPTQ_OPS_TARGET <library target>)   # default: onnx_gptq_ops
#     include(${CMAKE_CURRENT_SOURCE_DIR}/cuda.cmake)
#
# It adds custom_ops/kernels/cuda/*.cu (math, plain C entry points
# onnx_gptq_cuda_*) and custom_ops/ort/cuda_*.cc (onnxruntime CUDA EP glue)
# to that target, defines ONNX_GPTQ_WITH_CUDA on it (register.cc then calls
# onnx_gptq_register_cuda_ops), and links the static CUDA runtime so the
# library loads wherever only the NVIDIA driver is installed (and still loads,
# CPU ops only, where there is no driver at all).
#
# Architectures: SASS for sm_80, 86, 89, 90 and PTX for compute_90 (JIT on
# newer GPUs). Override with -DONNX_GPTQ_CUDA_ARCHITECTURES="...".

if(NOT DEFINED ONNX_GPTQ_OPS_TARGET)
  set(ONNX_GPTQ_OPS_TARGET onnx_gptq_ops)
endif()
if(NOT TARGET ${ONNX_GPTQ_OPS_TARGET})
  message(FATAL_ERROR "cuda.cmake: library target '${ONNX_GPTQ_OPS_TARGET}' does not exist; "
                      "include cuda.cmake after add_library() and set ONNX_GPTQ_OPS_TARGET")
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "ONNX_GPTQ_CUDA is ON but no CUDA compiler was found "
                      "(install the CUDA toolkit or set CMAKE_CUDA_COMPILER=/path/to/nvcc)")
endif()
set(ONNX_GPTQ_CUDA_ARCHITECTURES "80-real;86-real;89-real;90" CACHE STRING
    "CUDA architectures of the GptqMatMul kernels (90 = sm_90 SASS + compute_90 PTX)")
# enable_language needs some architecture list; the target property below is what counts.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES ${ONNX_GPTQ_CUDA_ARCHITECTURES})
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

set(_onnx_gptq_cuda_dir ${CMAKE_CURRENT_LIST_DIR})
target_sources(${ONNX_GPTQ_OPS_TARGET} PRIVATE
  ${_onnx_gptq_cuda_dir}/kernels/cuda/entry.cu
  ${_onnx_gptq_cuda_dir}/kernels/cuda/gemv.cu
  ${_onnx_gptq_cuda_dir}/kernels/cuda/gemm_tc.cu
  ${_onnx_gptq_cuda_dir}/kernels/cuda/gemm_simt.cu
  ${_onnx_gptq_cuda_dir}/ort/cuda_gptq_matmul.cc)
target_include_directories(${ONNX_GPTQ_OPS_TARGET} PRIVATE ${_onnx_gptq_cuda_dir}/kernels/cuda)
target_compile_definitions(${ONNX_GPTQ_OPS_TARGET} PRIVATE ONNX_GPTQ_WITH_CUDA)
set_target_properties(${ONNX_GPTQ_OPS_TARGET} PROPERTIES
  CUDA_ARCHITECTURES "${ONNX_GPTQ_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY Static
  CUDA_SEPARABLE_COMPILATION OFF
  POSITION_INDEPENDENT_CODE ON)
target_compile_options(${ONNX_GPTQ_OPS_TARGET} PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-fvisibility=hidden>)
target_link_libraries(${ONNX_GPTQ_OPS_TARGET} PRIVATE CUDA::cudart_static)
