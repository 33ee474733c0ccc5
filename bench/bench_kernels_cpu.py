"""CPU kernel benchmark: onnx_gptq.GptqMatMul vs com.microsoft.MatMulNBits vs fp32 MatMul.

Each op runs as a one-node onnxruntime session on the CPU execution provider
with the same intra-op thread count; the weight is a random N x K quantized
matrix packed by onnx_gptq.pack (pack_custom / pack_matmulnbits), and the fp32
MatMul gets its dequantized copy. GptqMatMul and MatMulNBits run at
accuracy_level 0 (fp32 math) and 4 (int8 activations). The ops of one row are
timed in turns (one call each, round robin) so that a busy machine slows them
alike; each call is timed with the wall clock and with process CPU time, and
the table shows medians of both ("cpu / wall" ms).

    python bench/bench_kernels_cpu.py                      # the default grid
    python bench/bench_kernels_cpu.py --m 1 --bits 4 --shapes 4096x4096 --threads 1 2

MatMulNBits takes 2, 4 and 8 bits; for 3-bit rows its columns show the 4-bit
weight of the same shape (the target: 3-bit GptqMatMul reads fewer bytes).
At m = 1 the table also gives GptqMatMul's effective weight bandwidth (packed
bytes of B, scales and zero points per call / wall time) next to the machine's
copy bandwidth, measured first with numpy (bytes read + written per second,
one thread).
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


def matmulnbits_model(qw: QuantizedWeight, accuracy_level: int = 0) -> onnx.ModelProto:
    t = pack_matmulnbits(qw)
    inits = [numpy_helper.from_array(t.B, "B"), numpy_helper.from_array(t.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if t.zero_points is not None:
        inits.append(numpy_helper.from_array(t.zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=t.K, N=t.N, bits=t.bits,
                            block_size=t.block_size, accuracy_level=accuracy_level)
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


def time_ops(runs: dict[str, Callable[[], object]], min_time: float, min_runs: int) -> dict[str, tuple[float, float]]:
    """Median (process CPU, wall) seconds per call of each op, timed in turns after warm-up."""
    for run in runs.values():
        for _ in range(3):
            run()
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while min(len(v) for v in wall.values()) < min_runs or time.perf_counter() - start < min_time:
        for name, run in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in runs}


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Best bytes (read + written) per second of a numpy copy of `megabytes` MB (one thread)."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), options(threads), providers=["CPUExecutionProvider"])


OPS = ("GptqMatMul acc0", "GptqMatMul acc4", "MatMulNBits acc0", "MatMulNBits acc4", "fp32 MatMul")


def bench_one(k: int, n: int, bits: int, group: int, ms: list[int], threads: int, min_time: float,
              rng: np.random.Generator) -> list[tuple[int, dict[str, tuple[float, float]], int]]:
    """Rows (m, {op: (cpu s, wall s)}, packed weight bytes) for one weight."""
    qw = random_weight(k, n, bits, group, rng)
    packed = pack_custom(qw)
    weight_bytes = packed.B.nbytes + packed.scales.nbytes + (packed.zero_points.nbytes if packed.zero_points is not None else 0)
    nbits_qw = qw if bits in MATMULNBITS_BITS else random_weight(k, n, 4, group, rng)
    sessions = {
        "GptqMatMul acc0": custom_ops.make_session(custom_ops.gptq_matmul_model(packed), sess_options=options(threads)),
        "GptqMatMul acc4": custom_ops.make_session(custom_ops.gptq_matmul_model(packed, accuracy_level=4),
                                                   sess_options=options(threads)),
        "MatMulNBits acc0": _session(matmulnbits_model(nbits_qw, 0), threads),
        "MatMulNBits acc4": _session(matmulnbits_model(nbits_qw, 4), threads),
        "fp32 MatMul": _session(fp32_model(qw), threads),
    }
    rows = []
    for m in ms:
        x = rng.standard_normal((m, k), dtype=np.float32)
        ref = sessions["fp32 MatMul"].run(None, {"A": x})[0]
        scale = max(float(np.abs(ref).max()), 1e-30)
        for name, tol in (("GptqMatMul acc0", 1e-4), ("GptqMatMul acc4", 5e-2)):
            rel = float(np.abs(sessions[name].run(None, {"A": x})[0] - ref).max()) / scale
            if rel > tol:
                raise AssertionError(f"{name} disagrees with fp32 MatMul at {k}x{n} {bits}-bit m={m}: {rel:.2e}")
        runs = {name: (lambda s=s: s.run(None, {"A": x})) for name, s in sessions.items()}
        rows.append((m, time_ops(runs, min_time, 20 if m <= 8 else 5), weight_bytes))
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
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 128, 512], help="rows of A")
    parser.add_argument("--group", nargs="+", type=int, default=[128, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op threads of every session")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed runs per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    bandwidth = copy_bandwidth()
    print(f"# onnxruntime {ort.__version__}, CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"kernel ISA: {custom_ops.cpu_isa()}, int8 ISA: {custom_ops.cpu_int8_isa()}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (numpy, read + write, one thread)")
    header = ("K x N", "bits", "group", "threads", "m", *(f"{op} ms" for op in OPS),
              "acc4 vs NBits acc4", "acc0 vs fp32", "m=1 weight GB/s")
    print("# times: process CPU / wall ms, medians; ratios: other op's time / GptqMatMul's (CPU time); "
          ">= 1.00x means GptqMatMul is as fast or faster")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        for bits in args.bits:
            for group in args.group:
                for threads in args.threads:
                    for m, t, weight_bytes in bench_one(k, n, bits, group, args.m, threads, args.min_time, rng):
                        cells = [f"{t[op][0] * 1e3:.3f} / {t[op][1] * 1e3:.3f}" for op in OPS]
                        vs_nb = t["MatMulNBits acc4"][0] / t["GptqMatMul acc4"][0]
                        vs_fp = t["fp32 MatMul"][0] / t["GptqMatMul acc0"][0]
                        gbs = "-"
                        if m == 1:
                            best = min(t["GptqMatMul acc0"][1], t["GptqMatMul acc4"][1])
                            gbs = f"{weight_bytes / best / 1e9:.1f} ({weight_bytes / best / bandwidth:.0%})"
                        nb_bits = "" if bits in MATMULNBITS_BITS else " (NBits 4-bit)"
                        print(f"| {k}x{n} | {bits}{nb_bits} | {group} | {threads} | {m} | " + " | ".join(cells) +
                              f" | {vs_nb:.2f}x | {vs_fp:.2f}x | {gbs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
