"""Quantization wall time against one plain onnxruntime forward pass over the same tokens.

    python bench/quant_vs_forward.py [--samples 128] [--seq-len 512]

The forward pass runs the fp32 model (logits included) over the calibration
windows in batches of calibration's default size; quantization is the whole
`onnx_gptq.quantize` call (load, calibrate, solve, pack, write), W4 g128.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import assets  # noqa: E402
from onnx_gptq.tools import export  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.pipeline import quantize_with_report  # noqa: E402
from onnx_gptq.tools.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    gguf = assets.smollm2_gguf()
    calib_text, _ = assets.sotu_split_files()
    work = assets.cache_root() / "quality"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2.onnx"
    if not model.exists():
        export.export_model(str(gguf), model)
    # The same windows for both: tokenized once, saved as ids.
    ids = np.asarray(load_tokenizer(gguf).encode(calib_text.read_text()[:4_000_000]), dtype=np.int64)
    starts = np.random.default_rng(0).integers(0, len(ids) - args.seq_len, size=args.samples)
    windows = np.stack([ids[s:s + args.seq_len] for s in starts])
    ids_path = work / f"ids_{args.samples}x{args.seq_len}.npy"
    np.save(ids_path, windows)

    calib = CalibConfig(num_samples=args.samples, seq_len=args.seq_len)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    for b in range(0, len(windows), calib.batch_size):
        x = windows[b:b + calib.batch_size]
        session.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
    forward = time.perf_counter() - start
    del session

    start = time.perf_counter()
    _, report = quantize_with_report(model, ids_path, QuantConfig(bits=4, group_size=128, head_bits=None,
                                     embedding_bits=None), calib=calib,
                                     output=work / "q4_timing.onnx")
    total = time.perf_counter() - start
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items())
    print(f"| {args.samples} x {args.seq_len} | {forward:.1f} s | {total:.1f} s | {total / forward:.2f}x | {phases} |")


if __name__ == "__main__":
    main()
