"""Benchmark the CUDA GptqMatMul kernels against fp16 cuBLAS and torch's int4 kernel.

Usage (needs an NVIDIA GPU and the library built with CUDA):

    python3 bench/bench_kernels_cuda.py [--bits 4] [--group-size 128] [--ms 1 16 256 1024]

For each K x N in 4096x4096, 4096x11008, 11008x4096 and each M it times, with
CUDA events around CUDA-graph replays (so Python launch overhead is not
counted), warmup and the median of several replays:

* ours: `devtools.cuda_kernels.gptq_matmul_cuda` (GEMV path for M <= 8,
  tensor cores above), fp16 activations, asymmetric 4-bit, group 128;
* cuBLAS: `torch.nn.functional.linear` in fp16 with the dense weight;
* torch int4: `torch._weight_int4pack_mm` (bf16 activations, weight from
  `torch._convert_weight_to_int4pack`), when this torch build has it on CUDA.

Every kernel cycles through enough weight copies to exceed 3x the L2 cache,
so weights stream from DRAM as in a real decoder. DRAM bandwidth is measured
with a device-to-device copy; for M <= 8 the table reports our kernel's
bandwidth (bytes of packed weights + scales + zero points per call / time)
as a share of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# The checkout's root: devtools/ (the CUDA entry point's ctypes binding) lives
# there, and onnx_gptq too when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die(message: str) -> None:
    sys.exit(f"bench_kernels_cuda: {message}")


def _time_us(fns: list[Callable[[], object]], reps: int = 20, iters: int = 15) -> float:
    """Median time per call in microseconds of cycling through `fns`.

    Captured into a CUDA graph of `reps` calls when possible (no launch
    overhead in the measurement), else timed as a plain loop.
    """
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fns[i % len(fns)]()
    except RuntimeError as exc:  # a kernel that refuses capture: fall back to eager timing
        print(f"  (CUDA graph capture failed, timing eagerly: {exc})", file=sys.stderr)
        graph = None

    def run() -> None:
        if graph is not None:
            graph.replay()
        else:
            for i in range(reps):
                fns[i % len(fns)]()

    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    return statistics.median(times)


def dram_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _time_us([lambda: dst.copy_(src)], reps=5, iters=10)
    del src, dst
    return 2 * n_bytes / (t * 1e-6) / 1e9


def _copies(bytes_per_copy: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return int(max(1, min(64, -(-3 * l2 // bytes_per_copy))))


def _random_packed(n: int, k: int, bits: int, group_size: int, rng: np.random.Generator):
    from onnx_gptq.pack import pack_custom
    from onnx_gptq.qweight import QuantizedWeight

    n_groups = -(-k // group_size)
    qw = QuantizedWeight(
        codes=rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8),
        scales=rng.uniform(0.005, 0.02, size=(n, n_groups)).astype(np.float32),
        zeros=rng.integers(0, 1 << bits, size=(n, n_groups), dtype=np.uint8),
        bits=bits, group_size=group_size)
    return pack_custom(qw)


def _int4_kernel(k: int, n: int, group_size: int, copies: int) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """A closure timing torch's int4 weight-only matmul, or why it is unavailable."""
    if not hasattr(torch, "_weight_int4pack_mm") or not hasattr(torch, "_convert_weight_to_int4pack"):
        return "n/a (torch has no _weight_int4pack_mm)"
    try:
        weights = []
        for _ in range(copies):
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            w = torch._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.rand(k // group_size, n, 2, device="cuda", dtype=torch.bfloat16)
            weights.append((w, sz))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, weights[0][0], group_size, weights[0][1])
    except RuntimeError as exc:
        return f"n/a ({str(exc).splitlines()[0][:60]})"
    state = {"i": 0}

    def call(xb: torch.Tensor) -> torch.Tensor:
        w, sz = weights[state["i"] % copies]
        state["i"] += 1
        return torch._weight_int4pack_mm(xb, w, group_size, sz)

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"],
                        help="K x N pairs")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        _die("needs an NVIDIA GPU with a CUDA build of torch (torch.cuda.is_available() is False; "
             f"torch {torch.__version__}); run it on a GPU machine")
    from devtools import cuda_kernels

    try:
        cuda_kernels._library()
    except Exception as exc:  # noqa: BLE001 - report any load failure in one line
        _die(f"cannot load the CUDA kernels: {exc}")

    props = torch.cuda.get_device_properties(0)
    bw = dram_bandwidth_gbs()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; "
          f"device-to-device copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}")
    print(f"weights: {args.bits}-bit, group {args.group_size}, asymmetric; ours/cuBLAS fp16, int4 bf16")
    header = (f"{'K':>6} {'N':>6} {'M':>5} | {'ours us':>9} {'cuBLAS us':>9} {'int4 us':>9} | "
              f"{'vs cuBLAS':>9} {'vs int4':>8} | {'ours TFLOP/s':>12} {'ours GB/s':>9} {'%DRAM':>6}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        packed = _random_packed(n, k, args.bits, args.group_size, rng)
        w0 = cuda_kernels.to_device(packed, "cuda", torch.float16)
        weight_bytes = w0.B.numel() + w0.scales.numel() * 2 + (w0.zero_points.numel() if w0.zero_points is not None else 0)
        ours_w = [w0] + [cuda_kernels.CudaGptqWeight(
            B=w0.B.clone(), scales=w0.scales.clone(), zero_points=None if w0.zero_points is None else w0.zero_points.clone(),
            g_idx=None, K=k, N=n, bits=args.bits, block_size=args.group_size) for _ in range(_copies(weight_bytes) - 1)]
        dense_w = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(_copies(2 * n * k))]
        int4 = _int4_kernel(k, n, args.group_size, _copies(n * k // 2)) if args.bits == 4 else "n/a (bits != 4)"
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            t_ours = _time_us([lambda w=w: cuda_kernels.gptq_matmul_cuda(x, w) for w in ours_w])
            t_blas = _time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense_w])
            t_int4 = _time_us([lambda: int4(xb)]) if callable(int4) else None
            tflops = 2 * m * n * k / (t_ours * 1e-6) / 1e12
            gbs = weight_bytes / (t_ours * 1e-6) / 1e9
            pct = f"{100 * gbs / bw:5.0f}%" if m <= 8 else f"{'':>6}"
            int4_txt = f"{t_int4:9.1f}" if t_int4 is not None else f"{'n/a':>9}"
            vs_int4 = f"{t_int4 / t_ours:7.2f}x" if t_int4 is not None else f"{'':>8}"
            print(f"{k:>6} {n:>6} {m:>5} | {t_ours:9.1f} {t_blas:9.1f} {int4_txt} | {t_blas / t_ours:8.2f}x "
                  f"{vs_int4} | {tflops:12.1f} {gbs:9.0f} {pct}")
        if not callable(int4):
            print(f"  torch int4: {int4}")
        del ours_w, dense_w
        torch.cuda.empty_cache()
    print("ours: GEMV for M <= 8 (GB/s counts packed weights + scales + zero points), tensor cores above; "
          "'vs' columns: their time / ours (> 1 means ours is faster)")


if __name__ == "__main__":
    main()
