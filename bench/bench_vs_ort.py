"""onnx-gptq against onnxruntime's own MatMulNBitsQuantizer, on one model and one calibration set.

Rows: onnx-gptq gptq, onnx-gptq rtn, onnxruntime RTN (DefaultWeightOnlyQuantConfig),
onnxruntime GPTQ (GPTQWeightOnlyQuantConfig). Columns: end-to-end wall time and
the relative output error tr(dW H dW^T) / tr(W H W^T) per layer, with H from
the same calibration samples for every row. Also: calibration time against one
plain onnxruntime forward pass over the same tokens.

    python bench/bench_vs_ort.py                        # SmolLM2-135M, fetched and exported
    python bench/bench_vs_ort.py --model m.onnx --tokenizer tok.json --text calib.txt
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_gptq import calibrate, rewrite, targets  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.pipeline import quantize_with_report  # noqa: E402
from onnx_gptq.error_traces import relative_error  # noqa: E402

logger = logging.getLogger("bench_vs_ort")


def smollm2(workdir: Path) -> tuple[Path, Path, Path]:
    """SmolLM2-135M exported to fp32 ONNX, its GGUF (tokenizer), and the pre-2000 SOTU text."""
    from devtools import assets
    from onnx_gptq.tools import export

    gguf = assets.smollm2_gguf()
    model = workdir / "smollm2.onnx"
    if not model.exists():
        export.export_model(str(gguf), model)
    calib_text, _ = assets.sotu_split_files()
    return model, gguf, calib_text


def weights_of_matmulnbits(path: Path, suffix: str) -> dict[str, np.ndarray]:
    """Dequantized [N, K] weights of every MatMulNBits node, keyed by the original weight name.

    `suffix` is a regex for what the quantizer appended to the weight's name
    (ours: "_B"; onnxruntime's RTN: "_Q4", its GPTQ: "_Q4G128").
    """
    return {name: qw.dequantize() for name, qw in rewrite.read_packed(ir.load(path), suffix).items()}


def _reader(batches: list[dict[str, np.ndarray]]):
    """An onnxruntime.quantization CalibrationDataReader over our batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(batches):
                return None
            self.i += 1
            return batches[self.i - 1]

        def rewind(self) -> None:
            self.i = 0

    return Reader()


def run_ort_quantizer(model: Path, out: Path, algo: str, batches: list[dict[str, np.ndarray]],
                      group: int, sym: bool) -> float:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    start = time.perf_counter()
    proto = onnx.load(str(model))
    if algo == "rtn":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=sym)
    else:
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(batches), percdamp=0.01,
                                               block_size=group, actorder=False, mse=False, perchannel=True)
    quantizer = mnq.MatMulNBitsQuantizer(proto, block_size=group, is_symmetric=sym, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return time.perf_counter() - start


def plain_forward_seconds(model: Path, batches: list[dict[str, np.ndarray]]) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    start = time.perf_counter()
    for feeds in batches:
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="fp32 ONNX causal LM (default: SmolLM2-135M)")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--text", type=Path, help="calibration text")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true",
                        help="symmetric grids for every row (onnxruntime's GPTQ path crashes packing asymmetric "
                             "zero points when a row has an odd number of groups)")
    parser.add_argument("--skip-ort-gptq", action="store_true", help="leave out the slow onnxruntime GPTQ row")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-gptq-bench")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model, args.tokenizer, args.text = smollm2(args.workdir)

    calib = CalibConfig(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    proto = onnx.load(str(args.model), load_external_data=False)
    batches = calibrate.make_batches(args.text, proto, calib, tokenizer=args.tokenizer)
    ids = np.concatenate([b["input_ids"] for b in batches])
    ids_path = args.workdir / "calib_ids.npy"
    np.save(ids_path, ids)  # every row sees exactly these tokens

    config = QuantConfig(bits=4, group_size=args.group_size, sym=args.sym, head_bits=None,
                         embedding_bits=None)  # the body only, as onnxruntime's quantizers
    times: dict[str, float] = {}
    outputs: dict[str, tuple[Path, str]] = {}
    for algo in ("gptq", "rtn"):
        out = args.workdir / f"onnx_gptq_{algo}.onnx"
        start = time.perf_counter()
        _, report = quantize_with_report(args.model, ids_path, QuantConfig(**{**config.to_dict(), "algo": algo}),
                                         calib=calib, output=out)
        times[f"onnx-gptq {algo}"] = time.perf_counter() - start
        outputs[f"onnx-gptq {algo}"] = (out, "_B")
        if algo == "gptq":
            calibration_seconds = report.phases.get("calibrate", 0.0)
    failures: dict[str, str] = {}
    for algo in ("rtn",) + (() if args.skip_ort_gptq else ("gptq",)):
        out = args.workdir / f"ort_{algo}.onnx"
        try:
            times[f"onnxruntime {algo}"] = run_ort_quantizer(args.model, out, algo, batches, args.group_size,
                                                             args.sym)
        except Exception as exc:  # noqa: BLE001 - a quantizer that crashes is a result too
            failures[f"onnxruntime {algo}"] = f"{type(exc).__name__}: {exc}"
            continue
        outputs[f"onnxruntime {algo}"] = (out, r"_Q\d+(G\d+)?")

    # Per-layer relative output error, every row against the same Hessians.
    float_model = ir.load(args.model)
    groups, _ = targets.find_targets(float_model, QuantConfig())
    stats = calibrate.collect_hessians(onnx.load(str(args.model), load_external_data=False),
                                       sorted({t.activation.name for g in groups for t in g.targets}),
                                       batches, model_dir=args.model.parent)
    errors: dict[str, list[float]] = {row: [] for row in outputs}
    layer_names = []
    dequantized = {row: weights_of_matmulnbits(path, suffix) for row, (path, suffix) in outputs.items()}
    for group in groups:
        total = None
        for t in group.targets:
            total = stats[t.activation.name] if total is None else total + stats[t.activation.name]
        H = total.hessian()
        W = group.load().T  # [N, K]
        layer_names.append(group.targets[0].module or group.name)
        for row in outputs:
            Q = dequantized[row].get(group.name)
            errors[row].append(float("nan") if Q is None else relative_error(W, Q, H))

    forward = plain_forward_seconds(args.model, batches)
    tokens = ids.size
    lines = [f"model: {args.model.name}, calibration: {ids.shape[0]} x {ids.shape[1]} tokens, "
             f"W4 {'sym' if args.sym else 'asym'} group {args.group_size}", "",
             "| method | wall time (s) | vs onnxruntime GPTQ | mean rel. error | max rel. error | layers worse than onnx-gptq gptq |",
             "|---|---|---|---|---|---|"]
    ours = np.array(errors["onnx-gptq gptq"])
    ort_gptq = times.get("onnxruntime gptq")
    for row in outputs:
        e = np.array(errors[row])
        speed = f"{ort_gptq / times[row]:.1f}x faster" if ort_gptq else "-"
        worse = int(np.sum(e > ours * (1 + 1e-6))) if row != "onnx-gptq gptq" else 0
        lines.append(f"| {row} | {times[row]:.1f} | {speed} | {np.nanmean(e):.3e} | {np.nanmax(e):.3e} | "
                     f"{worse} / {len(e)} |")
    for row, reason in failures.items():
        lines.append(f"| {row} | failed: {reason[:150]} | | | | |")
    lines += ["", f"| calibration (onnx-gptq, {tokens} tokens) | plain forward pass, same tokens | ratio |",
              "|---|---|---|", f"| {calibration_seconds:.1f} s | {forward:.1f} s | {calibration_seconds / forward:.2f}x |"]
    if ort_gptq:
        lowest = int(np.sum(ours < np.array(errors["onnxruntime gptq"])))
        lines += ["", f"onnx-gptq gptq has the lower error at {lowest} of {len(ours)} layers."]
    lines += ["", "| layer | " + " | ".join(outputs) + " |", "|---|" + "---|" * len(outputs)]
    for i, name in enumerate(layer_names):
        lines.append(f"| {name} | " + " | ".join(f"{errors[row][i]:.3e}" for row in outputs) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
