"""Quantize a real LLM several ways and compare quality, size, memory and speed on CPU.

Model: SmolLM2-135M-Instruct (GGUF from PyPI, exported to fp32 ONNX here).
Data: State of the Union addresses; calibration windows are drawn from the
addresses before 2000, evaluation windows from 2000 onward, so they never overlap.

Rows: fp32; round-to-nearest; onnxruntime's own MatMulNBitsQuantizer with its
GPTQ config; onnx-gptq in several settings (sym/asym, act-order, per-channel,
3 and 2 bits, 32 vs 128 samples, and ``--calib self``, which uses no text).
All calibrated rows get the *same* token windows (saved as .npy), except
``--calib self``.

Columns: perplexity and its change vs fp32, mean KL(fp32 || row) and top-1
agreement on the evaluation windows, file size, quantization wall time and peak
RSS (in a child process), and CPU speed through onnxruntime (in another child):
first-token latency for a prompt, prefill tokens/s, and decode tokens/s. The
exported graphs carry no KV cache, so "decode" is the latency of a 1-token
forward: the weight-bound per-token cost a cached decoder pays, attention over
the cache excluded. Speed numbers on a shared machine are noisy; compare rows
within one run.

Usage:
    python bench/bench_llm.py                 # all rows (long: tens of minutes on 2 cores)
    python bench/bench_llm.py --quick         # fp32 / RTN / GPTQ W4, small calibration
    python bench/bench_llm.py --rows fp32,gptq-w3-g128 --reuse --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.measured_run import peak_rss_mb  # noqa: E402

logger = logging.getLogger("bench_llm")


@dataclasses.dataclass(frozen=True)
class Row:
    """One way of producing a model.

    Attributes:
        name: short id (``--rows``).
        label: what the table says.
        kind: "float", "onnx-gptq", "ort-default" or "ort-gptq" (onnxruntime's quantizer).
        config: QuantConfig fields (onnx-gptq) or bits/block/sym (ort-gptq).
        samples: calibration windows; None for the run's default, 0 for none.
        self_calib: calibrate on sequences sampled from the float model.
        sequential: true-sequential calibration (--sequential).
    """

    name: str
    label: str
    kind: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    samples: int | None = None
    self_calib: bool = False
    sequential: bool = False


ROWS = [
    Row("fp32", "fp32 (exported)", "float", samples=0),
    Row("rtn-w4-g128", "RTN W4 g128 asym", "onnx-gptq", {"algo": "rtn"}, samples=0),
    Row("ort-rtn-w4-g128", "onnxruntime MatMulNBitsQuantizer default W4 g128", "ort-default",
        {"bits": 4, "block_size": 128, "sym": False}, samples=0),
    # onnxruntime's GPTQ: symmetric (its asymmetric path crashes on SmolLM2, packing zero
    # points across rows) and 8 windows (it re-runs the model per layer: 128 take hours).
    Row("ort-gptq-w4-g128", "onnxruntime MatMulNBitsQuantizer GPTQ W4 g128 sym, 8 samples", "ort-gptq",
        {"bits": 4, "block_size": 128, "sym": True}, samples=8),
    Row("gptq-w4-g128", "onnx-gptq W4 g128 asym (act-order: the default)", "onnx-gptq", {}),
    Row("gptq-w4-g128-sym", "onnx-gptq W4 g128 sym", "onnx-gptq", {"sym": True}),
    Row("gptq-w4-g128-noact", "onnx-gptq W4 g128 without act-order", "onnx-gptq", {"act_order": False}),
    Row("gptq-w4-g128-seq", "onnx-gptq W4 g128 --sequential", "onnx-gptq", {}, sequential=True),
    Row("rtn-w4-pc", "RTN W4 per-channel", "onnx-gptq", {"algo": "rtn", "group_size": -1}, samples=0),
    Row("gptq-w4-pc", "onnx-gptq W4 per-channel", "onnx-gptq", {"group_size": -1}),
    Row("rtn-w3-g128", "RTN W3 g128", "onnx-gptq", {"algo": "rtn", "bits": 3}, samples=0),
    Row("gptq-w3-g128", "onnx-gptq W3 g128", "onnx-gptq", {"bits": 3}),
    Row("gptq-w3-g128-noact", "onnx-gptq W3 g128 without act-order", "onnx-gptq", {"bits": 3, "act_order": False}),
    Row("gptq-w3-g128-seq", "onnx-gptq W3 g128 --sequential", "onnx-gptq", {"bits": 3}, sequential=True),
    Row("rtn-w2-g64", "RTN W2 g64", "onnx-gptq", {"algo": "rtn", "bits": 2, "group_size": 64}, samples=0),
    Row("gptq-w2-g64", "onnx-gptq W2 g64", "onnx-gptq", {"bits": 2, "group_size": 64}),
    Row("gptq-w4-g128-n32", "onnx-gptq W4 g128, 32 samples", "onnx-gptq", {}, samples=32),
    Row("gptq-w4-g128-self", "onnx-gptq W4 g128, --calib self (32 samples)", "onnx-gptq", {},
        samples=32, self_calib=True),
]
QUICK_ROWS = ("fp32", "rtn-w4-g128", "gptq-w4-g128")


@dataclasses.dataclass
class Settings:
    """Run-wide settings (see ``--help``)."""

    samples: int = 128
    calib_seq_len: int = 512
    eval_seq_len: int = 512
    eval_windows: int = 32
    prompt_len: int = 512
    seed: int = 0
    work: Path = Path()
    reuse: bool = False


# ---------------------------------------------------------------------------
# Child processes: quantize one row / time one model, reporting peak RSS


def _child_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    if spec["kind"] in ("ort-gptq", "ort-default"):
        _ort_quantizer(spec)
    else:
        from onnx_gptq.config import CalibConfig, QuantConfig
        from onnx_gptq.pipeline import quantize_with_report

        # The body only, as onnxruntime's quantizers in the other rows (and the recorded tables) do.
        config = QuantConfig(**{"head_bits": None, "embedding_bits": None, **spec["config"]})
        calib = CalibConfig(num_samples=max(1, spec["samples"]), seq_len=spec["seq_len"],
                            seed=spec["seed"], sequential=spec.get("sequential", False))
        calibration = "self" if spec["self_calib"] else spec["calibration"]
        _, report = quantize_with_report(spec["model"], calibration, config, calib=calib,
                                         output=spec["output"])
        logger.info("%s: %s", spec["output"], report.summary().replace("\n", "; "))
    return {"quant_s": time.perf_counter() - start, "quant_rss_mb": peak_rss_mb()}


def _ort_quantizer(spec: dict[str, Any]) -> None:
    """onnxruntime's MatMulNBitsQuantizer: its default (RTN) config, or its GPTQ config
    calibrated on the same windows as onnx-gptq."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    cfg = spec["config"]
    if spec["kind"] == "ort-default":
        quantizer = MatMulNBitsQuantizer(spec["model"], bits=cfg["bits"],
                                         block_size=cfg["block_size"], is_symmetric=cfg["sym"])
        quantizer.process()
        onnx.save_model(quantizer.model.model, spec["output"])
        return
    ids = np.load(spec["calibration"])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = [{"input_ids": r[None, :].astype(np.int64),
                          "attention_mask": np.ones((1, r.shape[0]), np.int64)} for r in ids]
            self.position = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.position >= len(self.rows):
                return None
            self.position += 1
            return self.rows[self.position - 1]

    algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01,
                                     block_size=cfg["block_size"], actorder=False, mse=False,
                                     perchannel=True)
    quantizer = MatMulNBitsQuantizer(spec["model"], bits=cfg["bits"], block_size=cfg["block_size"],
                                     is_symmetric=cfg["sym"], algo_config=algo)
    quantizer.process()
    onnx.save_model(quantizer.model.model, spec["output"])


def _child_speed(model: str, prompt_len: int) -> dict[str, Any]:
    from onnx_gptq.calibrate import ModelInputs
    from onnx_gptq.tools.evaluate import open_session
    import onnx

    session = open_session(model)
    inputs = ModelInputs.from_model(onnx.load(model, load_external_data=False))
    rng = np.random.default_rng(0)
    vocab = inputs.vocab_size or 1000

    def median_latency(length: int, repeats: int) -> float:
        feeds = inputs.feeds(rng.integers(0, vocab, size=(1, length)))
        session.run(None, feeds)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    prefill = median_latency(prompt_len, 5)
    decode = median_latency(1, 30)
    return {"first_token_ms": 1000 * prefill, "prefill_tok_s": prompt_len / prefill,
            "decode_tok_s": 1.0 / decode, "run_rss_mb": peak_rss_mb()}


_RESULT = "@@bench_llm result: "


class ChildFailed(RuntimeError):
    """A child process exited non-zero; `reason` is the last line of its stderr."""

    def __init__(self, what: str, stderr: str) -> None:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        self.reason = lines[-1].strip() if lines else "no output"
        super().__init__(f"child {what} failed:\n{stderr[-3000:]}")


def _in_child(*args: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ChildFailed(args[0], done.stderr)
    # Libraries may print to stdout too (onnxruntime's quantizer does): take our marked line.
    results = [ln[len(_RESULT):] for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
    if not results:
        raise ChildFailed(args[0], f"no result line in its output:\n{done.stdout[-2000:]}\n{done.stderr}")
    return json.loads(results[-1])


# ---------------------------------------------------------------------------
# The run


def file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def prepare(settings: Settings, rows: list[Row]) -> dict[str, Any]:
    """Fetch assets, export the float model, tokenize calibration and evaluation windows."""
    from devtools import assets
    from onnx_gptq.tools.evaluate import text_windows
    from onnx_gptq.tools.export import export_model
    from onnx_gptq.tools.tokenizer import load_tokenizer

    gguf = assets.smollm2_gguf()
    calib_file, eval_file = assets.sotu_split_files()
    settings.work.mkdir(parents=True, exist_ok=True)
    fp32 = settings.work / "smollm2.fp32.onnx"
    if not fp32.exists():
        logger.info("exporting %s -> %s", gguf.name, fp32)
        export_model(gguf, fp32)
    tokenizer = load_tokenizer(gguf)
    eval_ids = text_windows(eval_file, tokenizer, settings.eval_seq_len, settings.eval_windows)
    calib: dict[int, Path] = {}
    stream: np.ndarray | None = None
    needed = {r.samples or settings.samples for r in rows if r.samples != 0 and not r.self_calib}
    for samples in sorted(needed):
        path = settings.work / f"calib_n{samples}_t{settings.calib_seq_len}_s{settings.seed}.npy"
        if not path.exists():
            if stream is None:
                stream = np.asarray(tokenizer.encode(calib_file.read_text(encoding="utf-8")),
                                    np.int64)
            rng = np.random.default_rng(settings.seed)
            starts = rng.integers(0, len(stream) - settings.calib_seq_len, size=samples)
            np.save(path, np.stack([stream[s:s + settings.calib_seq_len] for s in starts]))
        calib[samples] = path
    return {"gguf": gguf, "fp32": fp32, "eval_ids": eval_ids, "calib": calib,
            "calib_file": calib_file, "eval_file": eval_file}


def run_row(row: Row, settings: Settings, prepared: dict[str, Any]) -> dict[str, Any]:
    """Quantize (in a child), evaluate against fp32, and time (in another child) one row."""
    from onnx_gptq.tools.evaluate import evaluate_ids

    fp32: Path = prepared["fp32"]
    result: dict[str, Any] = {"row": row.name, "label": row.label}
    if row.kind == "float":
        model = fp32
    else:
        model = settings.work / f"{row.name}.onnx"
        sidecar = settings.work / f"{row.name}.quant.json"
        if settings.reuse and model.exists() and sidecar.exists():
            result.update(json.loads(sidecar.read_text()))
        else:
            samples = row.samples if row.samples is not None else settings.samples
            spec = {"kind": row.kind, "config": row.config, "model": str(fp32),
                    "output": str(model), "samples": samples, "seq_len": settings.calib_seq_len,
                    "seed": settings.seed, "self_calib": row.self_calib, "sequential": row.sequential,
                    "calibration": (str(prepared["calib"][samples])
                                    if samples and not row.self_calib else None)}
            logger.info("quantizing %s", row.name)
            try:
                timing = _in_child("_quantize", json.dumps(spec))
            except ChildFailed as exc:  # a row that cannot be produced is a result too
                logger.warning("%s failed: %s", row.name, exc.reason)
                return result | {"error": exc.reason}
            sidecar.write_text(json.dumps(timing))
            result.update(timing)
    logger.info("evaluating %s", row.name)
    scores = evaluate_ids(model, prepared["eval_ids"],
                          reference=None if row.kind == "float" else fp32)
    result.update(perplexity=scores.perplexity, kl=scores.kl, top1=scores.top1,
                  eval_tokens=scores.n_tokens, size_mb=file_size(model) / 2**20)
    result.update(_in_child("_speed", str(model), str(settings.prompt_len)))
    logger.info("%s: %s", row.name, {k: round(v, 4) if isinstance(v, float) else v
                                     for k, v in result.items()})
    return result


def add_changes(results: list[dict[str, Any]]) -> None:
    """Percent changes vs the fp32 row (Keras-guide columns), in place."""
    base = next((r for r in results if r["row"] == "fp32"), None)
    if base is None:
        return
    for r in results:
        if "error" in r:
            continue
        r["ppl_change_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        r["size_reduction_pct"] = 100 * (1 - r["size_mb"] / base["size_mb"])
        r["memory_reduction_pct"] = 100 * (1 - r["run_rss_mb"] / base["run_rss_mb"])
        r["first_token_change_pct"] = 100 * (r["first_token_ms"] / base["first_token_ms"] - 1)
        r["decode_change_pct"] = 100 * (r["decode_tok_s"] / base["decode_tok_s"] - 1)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The full table, one row per model."""
    head = ("| model | perplexity | ppl Δ% | KL (nats) | top-1 % | size MB | quant s | quant RSS MB "
            "| first token ms | prefill tok/s | decode tok/s | run RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * 10)
            continue
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        lines.append("| " + " | ".join([
            r["label"], _fmt(r["perplexity"], ".3f"), _fmt(r.get("ppl_change_pct"), "+.2f"),
            _fmt(r.get("kl"), ".4f"), _fmt(top1, ".2f"), _fmt(r["size_mb"], ".1f"),
            _fmt(r.get("quant_s"), ".0f"), _fmt(r.get("quant_rss_mb"), ".0f"),
            _fmt(r["first_token_ms"], ".0f"), _fmt(r["prefill_tok_s"], ".0f"),
            _fmt(r["decode_tok_s"], ".1f"), _fmt(r["run_rss_mb"], ".0f")]) + " |")
    return "\n".join(lines)


def select_rows(names: str | None, quick: bool) -> list[Row]:
    by_name = {r.name: r for r in ROWS}
    wanted = names.split(",") if names else list(QUICK_ROWS if quick else by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"bench_llm: unknown row(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(by_name)}")
    if "fp32" not in wanted:
        wanted.insert(0, "fp32")  # every other row is measured against it
    return [by_name[n] for n in wanted]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fp32 / RTN / GPTQ W4 only, 16 calibration windows of 256, 8 eval windows")
    p.add_argument("--rows", help="comma-separated row names (fp32 is always added)")
    p.add_argument("--samples", type=int, help="calibration windows (default 128; quick 16)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration window (512; quick 256)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, help="evaluation windows (default 32; quick 8)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for the speed rows")
    p.add_argument("--work", type=Path, help="working directory (default <cache>/bench)")
    p.add_argument("--reuse", action="store_true", help="reuse quantized models already in --work")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    from devtools.assets import cache_root

    quick = args.quick
    return Settings(samples=args.samples or (16 if quick else 128),
                    calib_seq_len=args.calib_seq_len or (256 if quick else 512),
                    eval_seq_len=args.eval_seq_len,
                    eval_windows=args.eval_windows or (8 if quick else 32),
                    prompt_len=args.prompt_len,
                    work=args.work or cache_root() / ("bench-quick" if quick else "bench"),
                    reuse=args.reuse)


def run_bench(rows: list[Row], settings: Settings) -> list[dict[str, Any]]:
    """Every row in order; returns their results with the percent-change columns."""
    prepared = prepare(settings, rows)
    results = [run_row(row, settings, prepared) for row in rows]
    add_changes(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_quantize":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        print(_RESULT + json.dumps(_child_quantize(json.loads(argv[1]))), flush=True)
        return 0
    if argv and argv[0] == "_speed":
        print(_RESULT + json.dumps(_child_speed(argv[1], int(argv[2]))), flush=True)
        return 0
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = settings_from(args)
    rows = select_rows(args.rows, args.quick)
    results = run_bench(rows, settings)
    table = markdown_table(results)
    print(table)
    meta = dataclasses.asdict(settings) | {"work": str(settings.work)}
    if args.json:
        args.json.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
