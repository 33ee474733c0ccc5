"""Where one cached decode step of a model folder spends its time, per op type.

    python bench/decode_profile.py FOLDER [--threads 1] [--past 128] [--steps 50]

Runs the folder's model.onnx in onnxruntime with its profiler on: one new
token after `--past` cached positions (random past keys and values, as the
kernels' cost does not depend on their values), and sums the profiled kernel
time per op type. It also prints the bytes of the initializers each op type
takes. For MatMulNBits these are the weights every decoded token streams from
memory, which bound decode speed on CPU. (GroupQueryAttention's are its cos/sin
caches, of which a step reads one row.)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _feed_shape(dims: list[Any], past: int, head_size: int) -> list[int]:
    """A concrete shape for a decode step: batch 1, one new token, `past` cached positions."""
    shape = []
    for dim in dims:
        if isinstance(dim, int):
            shape.append(dim)
        elif "total" in dim:
            shape.append(past + 1)
        elif "past" in dim:
            shape.append(past)
        elif "kv" in dim or "head" in dim:
            shape.append(head_size)
        else:  # batch_size, sequence_length
            shape.append(1)
    return shape


def decode_feeds(session: Any, past: int, head_size: int) -> dict[str, np.ndarray]:
    """Inputs of one decode step after `past` positions."""
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = _feed_shape(list(arg.shape), past, head_size)
        if arg.name == "input_ids":
            feeds[arg.name] = np.full(shape, 42, dtype=np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones(shape, dtype=np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.full(shape, past, dtype=np.int64)
        else:
            dtype = np.float16 if "float16" in arg.type else np.float32
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def weight_bytes_per_op(model_path: Path) -> dict[str, int]:
    """Bytes of initializers each op type consumes (each initializer counted once per use)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=True)
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    per_op: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        per_op[node.op_type] += sum(sizes.get(name, 0) for name in node.input)
    return dict(per_op)


def profile(folder: Path, threads: int, past: int, steps: int) -> dict[str, Any]:
    """Per-op kernel ms per decode step, the whole step's ms, and weight bytes per op.

    Args:
        folder: a model folder holding model.onnx (and genai_config.json for the head size).
        threads: onnxruntime intra-op threads.
        past: cached positions before the step.
        steps: timed steps (after 5 warm-up steps).
    """
    import onnxruntime as ort

    config_file = folder / "genai_config.json"
    head_size = json.loads(config_file.read_text())["model"]["decoder"]["head_size"] if config_file.is_file() else 64
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = decode_feeds(session, past, head_size)
    for _ in range(5):
        session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, feeds)
    step_ms = 1000 * (time.perf_counter() - start) / steps
    events = json.loads(Path(session.end_profiling()).read_text())
    kernel_us: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel_us[event["args"]["op_name"]] += event["dur"]
    runs = steps + 5
    return {"step_ms": step_ms, "kernel_ms": {op: us / runs / 1000 for op, us in kernel_us.most_common()},
            "weight_mb": {op: b / 1e6 for op, b in weight_bytes_per_op(folder / "model.onnx").items() if b}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    result = profile(args.folder, args.threads, args.past, args.steps)
    print(f"{args.folder}: {result['step_ms']:.2f} ms per decode step ({args.threads} thread(s), past {args.past})")
    for op, ms in result["kernel_ms"].items():
        print(f"  {op:34s} {ms:8.3f} ms/step   weights {result['weight_mb'].get(op, 0.0):8.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
