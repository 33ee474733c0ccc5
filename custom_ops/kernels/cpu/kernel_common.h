// Helpers both kernels (kernel_impl.h: fp32, int8_impl.h: accuracy_level 4)
// use, compiled into each ISA's namespace. Include after internal.h and after
// defining GPTQ_ISA_NS; nothing here instantiates standard-library templates.
#pragma once

#include <cstddef>
#include <cstdint>

// Fully unroll loops over register-resident arrays (rows, columns, sub-vectors)
// so those arrays stay in registers.
#ifndef GPTQ_UNROLL
#define GPTQ_UNROLL _Pragma("GCC unroll 16")
#endif

namespace onnx_gptq {
namespace cpu {
namespace GPTQ_ISA_NS {

inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t MaxI(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Code j of one block's little-endian bit stream (any width 1..8).
inline uint32_t ExtractCode(const uint8_t* blob, int64_t blob_size, int bits, int64_t j) {
  const int64_t t = j * bits;
  const int64_t byte = t >> 3;
  uint32_t v = blob[byte];
  if (byte + 1 < blob_size) v |= uint32_t(blob[byte + 1]) << 8;
  return (v >> (t & 7)) & ((1u << bits) - 1u);
}

// Compile-time bit width handed to a kernel's RunBits by DispatchBits.
template <int B>
struct BitsTag {
  static constexpr int kBits = B;
};

// run(BitsTag<bits>{}) for the widths the kernels are built for (2, 3, 4, 8);
// kInvalidArgument for any other.
template <class RunFn>
Status DispatchBits(int bits, const RunFn& run) {
  switch (bits) {
    case 2: return run(BitsTag<2>{});
    case 3: return run(BitsTag<3>{});
    case 4: return run(BitsTag<4>{});
    case 8: return run(BitsTag<8>{});
    default: return Status::kInvalidArgument;
  }
}

// The fields of a kernel's Call (kernel_impl.h, int8_impl.h) that follow from
// the params alone: shape, blocks, scales and zero points.
template <int BITS, class CallT>
void SetCallShape(const GptqMatMulParams& p, CallT& c) {
  c.p = &p;
  c.M = p.M;
  c.K = p.K;
  c.N = p.N;
  c.bits = BITS;
  c.bs = p.block_size;
  c.n_blocks = CeilDiv(p.K, p.block_size);
  c.blob = CeilDiv(p.block_size * BITS, 8);
  c.n_groups = p.n_groups;
  if (p.dtype == DType::kFloat32) {
    c.scales_f32 = static_cast<const float*>(p.scales);
  } else {
    c.scales_f16 = static_cast<const uint16_t*>(p.scales);
  }
  c.zp = p.zero_points;
  c.zp_default = float(1 << (BITS - 1));
}

// Owns memory from detail::AlignedAlloc.
struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(size_t bytes) : ptr(detail::AlignedAlloc(bytes == 0 ? 64 : bytes)) {}
  ~Buffer() { detail::AlignedFree(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

}  // namespace GPTQ_ISA_NS
}  // namespace cpu
}  // namespace onnx_gptq
