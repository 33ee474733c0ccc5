"""CPU kernel benchmark: onnx_gptq.GptqMatMul vs com.microsoft.MatMulNBits vs fp32 MatMul.

Each op runs as a one-node onnxruntime session on the CPU execution provider
with the same intra-op thread count; the weight is a random N x K quantized
matrix packed by onnx_gptq.pack (pack_custom / pack_matmulnbits), and the fp32
MatMul gets its dequantized copy. Prints one table row per (shape, bits, m) with
the median time of each op.

    python bench/bench_kernels_cpu.py                      # the default grid
    python bench/bench_kernels_cpu.py --m 1 --bits 4 --shapes 4096x4096

MatMulNBits runs with accuracy_level 0 (fp32 compute) and only for the bit
widths it takes (2, 4, 8; 3-bit rows show "-").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.runtime import custom_ops
from onnx_gptq.pack import MATMULNBITS_BITS, pack_custom, pack_matmulnbits
from onnx_gptq.qweight import QuantizedWeight

DEFAULT_SHAPES = ["576x1536", "1536x576", "2048x2048", "4096x4096", "4096x11008"]


def random_weight(k: int, n: int, bits: int, group: int, rng: np.random.Generator) -> QuantizedWeight:
    """An asymmetric grouped N x K weight with random codes, scales and zero points."""
    n_groups = -(-k // group)
    return QuantizedWeight(
        codes=rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8),
        scales=(rng.random((n, n_groups), dtype=np.float32) * 0.02 + 0.001),
        zeros=rng.integers(0, 1 << bits, size=(n, n_groups), dtype=np.uint8),
        bits=bits, group_size=group, sym=False)


def _model(node: onnx.NodeProto, k: int, n: int, inits: list[onnx.TensorProto],
           extra_opsets: list[onnx.OperatorSetIdProto]) -> onnx.ModelProto:
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])
    model.ir_version = 8
    return model


def matmulnbits_model(qw: QuantizedWeight) -> onnx.ModelProto:
    t = pack_matmulnbits(qw)
    inits = [numpy_helper.from_array(t.B, "B"), numpy_helper.from_array(t.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if t.zero_points is not None:
        inits.append(numpy_helper.from_array(t.zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=t.K, N=t.N, bits=t.bits,
                            block_size=t.block_size, accuracy_level=0)
    return _model(node, t.K, t.N, inits, [helper.make_opsetid("com.microsoft", 1)])


def fp32_model(qw: QuantizedWeight) -> onnx.ModelProto:
    n, k = qw.shape
    w = np.ascontiguousarray(qw.dequantize().T)
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _model(node, k, n, [numpy_helper.from_array(w, "W")], [])


def options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_run(run: Callable[[], object], min_time: float, min_runs: int) -> float:
    """Median seconds per call, after warm-up, over >= min_runs calls and >= min_time seconds."""
    for _ in range(3):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = clock()
        run()
        times.append(clock() - t0)
    return statistics.median(times)


def bench_one(k: int, n: int, bits: int, group: int, ms: list[int], threads: int, min_time: float,
              rng: np.random.Generator) -> list[tuple[int, float, float | None, float]]:
    qw = random_weight(k, n, bits, group, rng)
    gptq = custom_ops.make_session(custom_ops.gptq_matmul_model(pack_custom(qw)), sess_options=options(threads))
    nbits = None
    if bits in MATMULNBITS_BITS:
        nbits = ort.InferenceSession(matmulnbits_model(qw).SerializeToString(), options(threads),
                                     providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(fp32_model(qw).SerializeToString(), options(threads),
                                providers=["CPUExecutionProvider"])
    rows = []
    for m in ms:
        x = rng.standard_normal((m, k), dtype=np.float32)
        ref = fp32.run(None, {"A": x})[0]
        got = gptq.run(None, {"A": x})[0]
        rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        if rel > 1e-4:
            raise AssertionError(f"GptqMatMul disagrees with fp32 MatMul at {k}x{n} {bits}-bit m={m}: {rel:.2e}")
        min_runs = 20 if m <= 8 else 5
        t_gptq = time_run(lambda: gptq.run(None, {"A": x}), min_time, min_runs)
        t_nbits = time_run(lambda: nbits.run(None, {"A": x}), min_time, min_runs) if nbits else None
        t_fp32 = time_run(lambda: fp32.run(None, {"A": x}), min_time, min_runs)
        rows.append((m, t_gptq, t_nbits, t_fp32))
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN weight shapes")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 128, 512], help="rows of A")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every session")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per op and m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (meaningful with --threads 1 on a busy machine)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]

    rng = np.random.default_rng(args.seed)
    print(f"# onnxruntime {ort.__version__}, CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"intra_op_num_threads={args.threads}, kernel ISA: {custom_ops.cpu_isa()}, group {args.group}, "
          f"{args.clock} clock")
    header = ("K x N", "bits", "m", "GptqMatMul ms", "MatMulNBits ms", "fp32 MatMul ms", "vs NBits", "vs fp32")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        for bits in args.bits:
            for m, t_g, t_nb, t_f in bench_one(k, n, bits, args.group, args.m, args.threads, args.min_time, rng):
                nb = f"{t_nb * 1e3:.3f}" if t_nb is not None else "-"
                vs_nb = f"{t_nb / t_g:.2f}x" if t_nb is not None else "-"
                print(f"| {k}x{n} | {bits} | {m} | {t_g * 1e3:.3f} | {nb} | {t_f * 1e3:.3f} | {vs_nb} | "
                      f"{t_f / t_g:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
