"""`make demo`: quantize a real LLM's deployable folder with onnx-gptq, generate text from it, compare.

SmolLM2-135M-Instruct (the GGUF from PyPI, as a transformers folder) goes
through onnxruntime-genai's model builder for the CPU: an fp32 folder with a
KV cache, and the builder's own int4 folder for comparison. The plain CLI
quantizes the fp32 folder (``onnx-gptq FOLDER --calib sotu_before_2000.txt -o
OUT``, calibrated on State of the Union addresses before 2000). Each folder
then answers the same chat prompt greedily through ``onnx-gptq generate
FOLDER --chat`` (onnxruntime with the KV cache), and the demo prints the
answers one above the other, then a table whose speed columns come from
greedy generation in onnxruntime-genai, the runtime these folders deploy to:
perplexity on addresses from 2000 on (and KL / top-1 against fp32), folder
size, peak memory of the generating process, first-token latency and greedy
decode throughput, each also as a change against fp32 (the columns of Keras'
GPTQ guide). A few minutes on 2 cores; results are cached in
``<cache>/demo-deploy`` (``bench/bench_deploy.py`` runs the full comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_deploy  # noqa: E402
from devtools.measured_run import ChildFailed, python_env, run_measured  # noqa: E402

DEFAULT_PROMPT = "Write two sentences about why a small model can still be useful."
DEMO_ROWS = (bench_deploy.REFERENCE, bench_deploy.BUILDER_TARGET, bench_deploy.OURS_TARGET)
LABELS = {bench_deploy.REFERENCE: "fp32 (builder)", bench_deploy.BUILDER_TARGET: "builder int4",
          bench_deploy.OURS_TARGET: "onnx-gptq W4 (CLI defaults)"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _change(row: dict[str, Any], base: dict[str, Any], key: str, *, reduction: bool = False) -> str:
    if row is base:
        return "baseline"
    if row.get(key) is None or not base.get(key):
        return "-"
    ratio = row[key] / base[key]
    return _pct(100 * (1 - ratio) if reduction else 100 * (ratio - 1))


def before_after(results: Sequence[dict[str, Any]]) -> str:
    """The demo table: absolute numbers, each followed by its change against the first (fp32) row."""
    head = ("| model | perplexity | perplexity increase | KL (nats) | top-1 | folder MB | disk size reduction "
            "| memory MB | memory reduction | first token ms | first-token latency change | decode tok/s "
            "| throughput change |")
    width = head.count("|") - 1
    lines = [head, "|" + "---|" * width]
    base = results[0]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * (width - 2))
            continue
        lines.append("| " + " | ".join([
            r["label"], f"{r['perplexity']:.2f}", _change(r, base, "perplexity"),
            "-" if r.get("kl") is None else f"{r['kl']:.4f}",
            "-" if r.get("top1") is None else f"{100 * r['top1']:.1f}%",
            f"{r['size_mb']:.0f}", _change(r, base, "size_mb", reduction=True),
            f"{r['run_rss_mb']:.0f}", _change(r, base, "run_rss_mb", reduction=True),
            f"{r['first_token_ms']:.0f}", _change(r, base, "first_token_ms"),
            "-" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}",
            _change(r, base, "decode_tok_s"),
        ]) + " |")
    return "\n".join(lines)


def generate_text(folder: str | Path, prompt: str, new_tokens: int) -> dict[str, Any]:
    """``onnx-gptq generate FOLDER --prompt PROMPT --chat --json`` in a child: the answer and its ids.

    Args:
        folder: a model folder.
        prompt: the user turn.
        new_tokens: --max-new-tokens.
    Returns:
        The command's JSON (text, prompt_ids, token_ids, speeds; see onnx_gptq.tools.generate).
    Raises:
        ChildFailed: the command failed.
    """
    command = [sys.executable, "-m", "onnx_gptq.cli", "generate", str(folder), "--prompt", prompt, "--chat",
               "--max-new-tokens", str(new_tokens), "--json"]
    run = run_measured(command, env=python_env(str(bench_deploy.REPO))).check(f"onnx-gptq generate {folder}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _answers(results: Sequence[dict[str, Any]], prompt: str, new_tokens: int) -> list[str]:
    """Each row's answer from onnx-gptq generate, and whether onnxruntime-genai's greedy tokens agree."""
    lines = []
    for r in results:
        if "folder" not in r:
            lines.append(f"--- {r['label']}: failed: {r.get('error')}\n")
            continue
        try:
            answer = generate_text(r["folder"], prompt, new_tokens)
        except ChildFailed as exc:
            lines.append(f"--- {r['label']}: onnx-gptq generate failed: {exc.reason}\n")
            continue
        ours, theirs = answer["token_ids"], r.get("text_ids", [])
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        lines.append(f"--- {r['label']} (onnx-gptq generate: decode {answer['decode_tokens_per_s']:.1f} tok/s; "
                     f"its first {same} of {len(ours)} tokens equal onnxruntime-genai's):\n{answer['text'].strip()}\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user turn every model answers")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    parser.add_argument("--eval-windows", type=int, default=8, help="512-token evaluation windows (default 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each model generates (default 64)")
    parser.add_argument("--work", type=Path, help="working directory (default <cache>/demo-deploy)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from devtools.assets import cache_root

    settings = bench_deploy.Settings(samples=args.samples, calib_seq_len=512, eval_windows=args.eval_windows,
                                     new_tokens=args.new_tokens, repeats=2, pairs=8)
    work = args.work or cache_root() / "demo-deploy"
    work.mkdir(parents=True, exist_ok=True)
    print(f"SmolLM2-135M-Instruct through onnxruntime-genai's builder; onnx-gptq calibrated on "
          f"{settings.samples} windows of {settings.calib_seq_len} tokens of State of the Union addresses "
          f"1790-1999, evaluated on {settings.eval_windows} windows of {settings.eval_seq_len} tokens from "
          "2000-2021. This takes a few minutes on 2 cores.", flush=True)
    inputs = bench_deploy.prepare_inputs(settings, work)
    reference, _ = bench_deploy.produce(bench_deploy.ROWS[0], settings, work, inputs["calib"])
    # onnxruntime-genai is timed on exactly the ids onnx-gptq generate feeds (chat template included).
    ids = generate_text(reference, args.prompt, 1)["prompt_ids"]
    inputs["prompt"] = work / f"chat-prompt-{bench_deploy.cache_key(ids)}.json"
    inputs["prompt"].write_text(json.dumps(ids))
    rows = [dataclasses.replace(r, label=LABELS[r.name]) for r in bench_deploy.select_rows(",".join(DEMO_ROWS))]
    results = [bench_deploy.measure_row(row, settings, work, inputs, retime=False) for row in rows]
    print(f"\nPrompt: {args.prompt}\n(greedy, {settings.new_tokens} new tokens at most, `onnx-gptq generate "
          "FOLDER --chat`, with the KV cache)\n")
    print("\n".join(_answers(results, args.prompt, settings.new_tokens)))
    print(before_after(results))
    print(f"\nSpeed and memory: onnxruntime-genai with its KV cache, greedy, best of {settings.repeats}; memory = "
          f"peak RSS of the process that generated; first token = prefill of the {len(ids)}-token prompt; "
          "decode = tokens/s after the first.")
    # Decode is timed once more with the two int4 folders alternating in one process: the
    # machine's drift between the rows above can exceed the gap between them.
    side = bench_deploy.time_side_by_side(results, settings, work, inputs["prompt"], retime=False)
    print(bench_deploy.verdict_text(bench_deploy.verdict(results, side)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
