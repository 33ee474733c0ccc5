"""The deployment benchmark (issue 11): what a user ships, side by side with the builder's int4.

SmolLM2-135M-Instruct goes through onnxruntime-genai's model builder (fp32,
CPU); onnx-gptq's rows run the plain CLI on that fp32 folder
(``onnx-gptq FOLDER --calib sotu_before_2000.txt -o OUT``), the builder's rows
run the builder on the transformers folder. Every row is a complete folder that
``onnxruntime_genai.Model`` loads.

Columns: perplexity, mean KL(fp32 || row) and top-1 agreement with the builder's
fp32 folder on the same windows of State of the Union text from 2000 on; folder
size; the time and peak RSS of the step that wrote the folder; and, in
onnxruntime-genai with its KV cache, first-token latency, prefill tokens/s and
greedy decode tokens/s for a fixed prompt (best of --repeats) and that
process's peak RSS. Each measured step runs in a child process of its own.
The target's decode comparison is timed again side by side: the onnx-gptq
defaults and the builder int4 folder alternate in one process for --pairs
ABBA pairs (bench/genai_speed.py --side-by-side), and the verdict uses the
median ratio, since the machine's drift between rows exceeds the gap.

Finished rows are cached under --work, keyed by their settings (and, for
onnx-gptq rows, the git trees of onnx_gptq/ and custom_ops/ plus any
uncommitted change there), so a rerun only measures what changed; --retime
measures the speed again.

Usage:
    python bench/bench_deploy.py --markdown bench-deploy.md
    python bench/bench_deploy.py --smoke --rows builder-int4,gptq
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.measured_run import ChildFailed, emit_result, python_env, run_measured  # noqa: E402

logger = logging.getLogger("bench_deploy")

#: The row every other is scored against.
REFERENCE = "builder-fp32"
#: The two rows the target compares.
BUILDER_TARGET, OURS_TARGET = "builder-int4", "gptq"


@dataclasses.dataclass(frozen=True)
class DeployRow:
    """One way of producing a deployable folder.

    Attributes:
        name: short id (``--rows``).
        label: what the table says.
        kind: "builder" (onnxruntime-genai's builder) or "onnx-gptq" (our CLI on the fp32 folder).
        args: builder ``-p`` precision then its extra arguments, or the CLI's extra flags.
    """

    name: str
    label: str
    kind: str
    args: tuple[str, ...] = ()


def _algo(name: str) -> tuple[str, ...]:
    return ("int4", "--extra_options", f"algo_config={name}")


def head_embedding_rows(cli_options: set[str]) -> list[DeployRow]:
    """The rows on the head and the embedding, in the flags the CLI at hand offers.

    Args:
        cli_options: the option strings of ``onnx-gptq``'s parser.
    Returns:
        Rows "gptq-float-head-embed" (both float) and with both at 4 and at 8 bits, where the
        CLI has ``--head`` / ``--embedding``; before those existed (head and embedding float by
        default), the float row is the defaults and the other quantizes the head.
    """
    if {"--head", "--embedding"} <= cli_options:
        return [DeployRow("gptq-float-head-embed", "onnx-gptq, head and embedding float", "onnx-gptq",
                          ("--head", "float", "--embedding", "float")),
                *(DeployRow(f"gptq-head{b}-embed{b}", f"onnx-gptq, head and embedding {b}-bit", "onnx-gptq",
                            ("--head", b, "--embedding", b)) for b in ("4", "8"))]
    return [DeployRow("gptq-float-head-embed", "onnx-gptq, head and embedding float (its defaults then)",
                      "onnx-gptq"),
            DeployRow("gptq-head", "onnx-gptq --quantize-head", "onnx-gptq", ("--quantize-head",))]


def _cli_options() -> set[str]:
    from onnx_gptq import cli

    return {o for action in cli.build_parser()._actions for o in action.option_strings}


ROWS = [
    DeployRow(REFERENCE, "builder fp32", "builder", ("fp32",)),
    DeployRow(BUILDER_TARGET, "builder int4 (default: RTN, block 32, accuracy_level 4)", "builder", ("int4",)),
    DeployRow("builder-int4-rtn-last", "builder int4 rtn_last (head int8)", "builder", _algo("rtn_last")),
    DeployRow("builder-int4-kquant", "builder int4 k_quant", "builder", _algo("k_quant")),
    DeployRow("builder-int4-kquant-mixed", "builder int4 k_quant_mixed", "builder", _algo("k_quant_mixed")),
    DeployRow(OURS_TARGET, "onnx-gptq defaults", "onnx-gptq"),
    DeployRow("gptq-acc0", "onnx-gptq defaults, --accuracy-level 0", "onnx-gptq", ("--accuracy-level", "0")),
    *head_embedding_rows(_cli_options()),
    DeployRow("gptq-w3", "onnx-gptq W3", "onnx-gptq", ("--bits", "3")),
    DeployRow("gptq-w3-down8", "onnx-gptq W3, down_proj 8-bit (--layer-config)", "onnx-gptq",
              ("--bits", "3", "--layer-config", "down_proj=bits:8")),
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run-wide settings.

    Attributes:
        samples, calib_seq_len: the CLI's --num-samples / --seq-len (onnx-gptq rows).
        eval_windows, eval_seq_len: the scored windows of the evaluation text.
        prompt_len, new_tokens, repeats: the timed generation (best of `repeats`).
        pairs: ABBA pairs of the side-by-side decode timing of the target's two rows.
    """

    samples: int = 128
    calib_seq_len: int = 512
    eval_windows: int = 16
    eval_seq_len: int = 512
    prompt_len: int = 128
    new_tokens: int = 64
    repeats: int = 3
    pairs: int = 12


SMOKE = Settings(samples=8, calib_seq_len=256, eval_windows=2, eval_seq_len=256, prompt_len=64,
                 new_tokens=16, repeats=1, pairs=2)


def select_rows(names: str | None) -> list[DeployRow]:
    """The rows `names` (comma separated; all when None), the reference first.

    Raises:
        SystemExit: an unknown row name (the message lists the known ones).
    """
    by_name = {r.name: r for r in ROWS}
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else list(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"bench_deploy: unknown row(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    if REFERENCE not in wanted:
        wanted.insert(0, REFERENCE)  # every other row is scored against it
    return [by_name[n] for n in wanted]


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able `parts` (the name of a cached result)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version() -> str:
    """What the quantizer's code is: the git trees of the package and the custom ops at HEAD,
    plus a hash of any uncommitted change to them (a commit elsewhere keeps the cached rows)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    diff = git("diff", "HEAD", "--", "onnx_gptq", "custom_ops")
    trees = git("rev-parse", "HEAD:onnx_gptq", "HEAD:custom_ops").replace("\n", ",")
    return trees + (f"+{cache_key(diff)}" if diff else "")


def folder_mb(folder: Path) -> float:
    """Size of the files in `folder` (not below it), MiB."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


# ---------------------------------------------------------------------------
# The measured steps


def _cached(path: Path, make: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    values = make()
    path.write_text(json.dumps(values, indent=1) + "\n")
    return values


def produce(row: DeployRow, settings: Settings, work: Path, calib: Path) -> tuple[Path, dict[str, Any]]:
    """The row's folder under `work`, written once; returns it and its quant_s / quant_rss_mb."""
    from devtools import llm_folders

    if row.kind == "builder":
        import onnxruntime_genai

        key = cache_key(row.kind, row.args, onnxruntime_genai.__version__)
    else:
        key = cache_key(row.kind, row.args, code_version(), settings.samples, settings.calib_seq_len)
    folder = work / f"{row.name}-{key}"
    sidecar = work / f"{row.name}-{key}.produce.json"
    if folder.is_dir() and sidecar.is_file():
        return folder, json.loads(sidecar.read_text())
    scratch = work / f".{folder.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    if row.kind == "builder":
        command = llm_folders.builder_command(llm_folders.smollm2_hf_folder(), scratch, row.args[0],
                                              work / ".builder-cache", row.args[1:])
    else:
        reference, _ = produce(ROWS[0], settings, work, calib)
        command = [sys.executable, "-m", "onnx_gptq.cli", str(reference), "--calib", str(calib),
                   "--num-samples", str(settings.samples), "--seq-len", str(settings.calib_seq_len),
                   "-o", str(scratch), "-q", *row.args]
    logger.info("producing %s: %s", row.name, " ".join(command))
    run = run_measured(command, env=python_env(str(REPO))).check(f"producing {row.name}")
    scratch.rename(folder)
    values = {"quant_s": run.seconds, "quant_rss_mb": run.peak_rss_mb}
    sidecar.write_text(json.dumps(values) + "\n")
    return folder, values


def _child(*args: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    return run_measured(command, env=python_env(str(REPO))).result(args[0])


def _timing_child(what: str, settings: Settings, prompt: Path, *args: str) -> dict[str, Any]:
    """bench/genai_speed.py's numbers for `args` on `prompt`, run as a measured child."""
    command = [sys.executable, str(REPO / "bench" / "genai_speed.py"), *args, "--prompt-ids", str(prompt),
               "--new-tokens", str(settings.new_tokens)]
    return run_measured(command, env=python_env(str(REPO))).result(what)


def _score_child(model: str, reference: str, windows: str) -> dict[str, Any]:
    import numpy as np

    from onnx_gptq.tools.evaluate import evaluate_ids

    ref = None if model == reference else reference
    scores = evaluate_ids(model, np.load(windows), reference=ref)
    return {"perplexity": scores.perplexity, "kl": scores.kl, "top1": scores.top1,
            "eval_tokens": scores.n_tokens}


def measure_row(row: DeployRow, settings: Settings, work: Path, inputs: dict[str, Path],
                retime: bool) -> dict[str, Any]:
    """Produce, score and time one row (each step cached); a failed step is reported, not raised."""
    result: dict[str, Any] = {"row": row.name, "label": row.label}
    try:
        folder, made = produce(row, settings, work, inputs["calib"])
        reference, _ = produce(ROWS[0], settings, work, inputs["calib"])
        result |= made | {"folder": str(folder), "size_mb": folder_mb(folder)}
        result |= _cached(work / f"{folder.name}.score-{cache_key(settings.eval_windows, settings.eval_seq_len)}.json",
                          lambda: _child("_score", str(folder), str(reference), str(inputs["windows"])))
        speed_key = cache_key(inputs["prompt"].read_text(), settings.new_tokens, settings.repeats)
        speed_file = work / f"{folder.name}.speed-{speed_key}.json"
        if retime:
            speed_file.unlink(missing_ok=True)
        result |= _cached(speed_file, lambda: _timing_child(
            f"timing {row.name}", settings, inputs["prompt"], str(folder), "--repeats", str(settings.repeats)))
    except ChildFailed as exc:  # a row that cannot be produced or run is a result too
        logger.warning("%s failed: %s", row.name, exc)
        result["error"] = exc.reason
    logger.info("%s: %s", row.name, {k: round(v, 3) if isinstance(v, float) else v
                                     for k, v in result.items() if k != "text_ids"})
    return result


def target_rows(results: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The target's (onnx-gptq defaults, builder int4) rows; None when either is missing or failed."""
    by_name = {r["row"]: r for r in results if "error" not in r}
    if OURS_TARGET not in by_name or BUILDER_TARGET not in by_name:
        return None
    return by_name[OURS_TARGET], by_name[BUILDER_TARGET]


def time_side_by_side(results: Sequence[dict[str, Any]], settings: Settings, work: Path,
                      prompt: Path, retime: bool) -> dict[str, Any] | None:
    """The target's two folders timed alternately in one child (cached); None when either is missing.

    Returns:
        genai_speed.side_by_side's numbers (A = onnx-gptq defaults, B = builder int4), or
        {"error": ...} when the child failed.
    """
    rows = target_rows(results)
    if rows is None:
        return None
    folders = [row["folder"] for row in rows]
    key = cache_key([Path(f).name for f in folders], prompt.read_text(), settings.new_tokens, settings.pairs)
    cached = work / f"side-by-side-{key}.json"
    if retime:
        cached.unlink(missing_ok=True)
    try:
        return _cached(cached, lambda: _timing_child("side-by-side timing", settings, prompt, "--side-by-side",
                                                     *folders, "--pairs", str(settings.pairs)))
    except ChildFailed as exc:
        logger.warning("side-by-side timing failed: %s", exc)
        return {"error": exc.reason}


def prepare_inputs(settings: Settings, work: Path) -> dict[str, Path]:
    """Calibration text, evaluation windows (.npy) and the timing prompt (.json), in `work`."""
    import numpy as np

    from devtools import assets, llm_folders
    from onnx_gptq.tools.evaluate import text_windows
    from onnx_gptq.tools.tokenizer import load_tokenizer

    calib, evaluation = assets.sotu_split_files()
    tokenizer = load_tokenizer(llm_folders.smollm2_hf_folder() / "tokenizer.json")
    windows = work / f"eval-{settings.eval_windows}x{settings.eval_seq_len}.npy"
    if not windows.is_file():
        np.save(windows, text_windows(evaluation, tokenizer, settings.eval_seq_len, settings.eval_windows))
    prompt = work / f"prompt-{settings.prompt_len}.json"
    if not prompt.is_file():
        # The prompt is the opening of the evaluation text: real prose, the same for every row.
        ids = text_windows(evaluation, tokenizer, settings.prompt_len, 1)[0]
        prompt.write_text(json.dumps([int(i) for i in ids]))
    return {"calib": Path(calib), "windows": windows, "prompt": prompt}


# ---------------------------------------------------------------------------
# The report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEAD = ("| row | perplexity | KL vs fp32 | top-1 vs fp32 % | folder MB | quant s | quant RSS MB "
              "| first token ms | prefill tok/s | decode tok/s | run RSS MB |")


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per row; a row that failed before it was scored says why in its line, one that
    failed later (e.g. onnxruntime-genai cannot load it) keeps what was measured, and a note
    under the table says why the rest is missing."""
    width = TABLE_HEAD.count("|") - 1
    lines = [TABLE_HEAD, "|" + "---|" * width]
    notes = []
    for r in results:
        if "error" in r and r.get("perplexity") is None:
            lines.append(f"| {r['label']} | failed: {r['error'][:160]} |" + " |" * (width - 2))
            continue
        if "error" in r:
            notes.append(f"- {r['label']}: failed after scoring: {r['error'][:300]}")
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        lines.append("| " + " | ".join([
            r["label"], _fmt(r.get("perplexity"), ".2f"), _fmt(r.get("kl"), ".4f"), _fmt(top1, ".1f"),
            _fmt(r.get("size_mb"), ".1f"), _fmt(r.get("quant_s"), ".0f"), _fmt(r.get("quant_rss_mb"), ".0f"),
            _fmt(r.get("first_token_ms"), ".0f"), _fmt(r.get("prefill_tok_s"), ".0f"),
            _fmt(r.get("decode_tok_s"), ".1f"), _fmt(r.get("run_rss_mb"), ".0f")]) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


@dataclasses.dataclass(frozen=True)
class Check:
    """One part of the target: `ours` against `theirs`, and whether it is met."""

    what: str
    ours: float
    theirs: float
    met: bool

    def line(self) -> str:
        """The check in words, e.g. ``MISSED: folder MB (at most): onnx-gptq 172.48, builder int4 85.87``."""
        state = "met" if self.met else "MISSED"
        return f"{state}: {self.what}: onnx-gptq {self.ours:.2f}, builder int4 {self.theirs:.2f}"


def _decode_check(ours: dict[str, Any], theirs: dict[str, Any], side: dict[str, Any] | None) -> Check:
    """Decode speed: from the side-by-side timing when it ran (median ratio >= 1), else the rows' best."""
    if side and "error" not in side:
        what = (f"decode tok/s (at least; medians of {side['pairs']} ABBA pairs side by side, per-pair "
                f"ratio median {side['ratio_median']:.3f}, range {side['ratio_min']:.2f}-{side['ratio_max']:.2f})")
        mine, other = side["decode_tok_s"]
        return Check(what, mine, other, side["ratio_median"] >= 1.0)
    return Check("decode tok/s (at least; best of each row's repeats)", ours["decode_tok_s"],
                 theirs["decode_tok_s"], ours["decode_tok_s"] >= theirs["decode_tok_s"])


def verdict(results: Sequence[dict[str, Any]], side: dict[str, Any] | None = None) -> list[Check]:
    """The issue's target: onnx-gptq's default row below the builder int4's perplexity, at most
    its folder size and at least its decode tokens/s, all at once. Empty when either row is
    missing or failed.

    Args:
        results: the rows' numbers.
        side: time_side_by_side's numbers, which decide the decode part when present.
    """
    rows = target_rows(results)
    if rows is None:
        return []
    ours, theirs = rows
    return [Check("perplexity (lower wins)", ours["perplexity"], theirs["perplexity"],
                  ours["perplexity"] < theirs["perplexity"]),
            Check("folder MB (at most)", ours["size_mb"], theirs["size_mb"], ours["size_mb"] <= theirs["size_mb"]),
            _decode_check(ours, theirs, side)]


def verdict_text(checks: Sequence[Check]) -> str:
    """The target in words: each part met or missed, then the overall answer."""
    if not checks:
        return f"target: not judged (needs the rows {OURS_TARGET} and {BUILDER_TARGET})"
    overall = "MET: all three at once" if all(c.met for c in checks) else "NOT MET"
    return "\n".join([f"target ({OURS_TARGET} vs {BUILDER_TARGET}): {overall}", *(f"- {c.line()}" for c in checks)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help=f"comma-separated rows ({REFERENCE} is always added): "
                   + ", ".join(r.name for r in ROWS))
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the pipeline (numbers meaningless)")
    p.add_argument("--samples", type=int, help="calibration windows (128)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows of 512 tokens (16)")
    p.add_argument("--repeats", type=int, help="timed generations per row, best taken (3)")
    p.add_argument("--pairs", type=int, help="ABBA pairs of the target's side-by-side decode timing (12)")
    p.add_argument("--work", type=Path, help="folders and cached rows (default <cache>/bench-deploy)")
    p.add_argument("--retime", action="store_true", help="measure generation speed again")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--markdown", type=Path, help="write the table and the verdict here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_score":
        emit_result(_score_child(*argv[1:4]))
        return 0
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from devtools.assets import cache_root

    settings = SMOKE if args.smoke else Settings()
    overrides = {k: v for k, v in {"samples": args.samples, "eval_windows": args.eval_windows,
                                   "repeats": args.repeats, "pairs": args.pairs}.items() if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    work = args.work or cache_root() / ("bench-deploy-smoke" if args.smoke else "bench-deploy")
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(settings, work)
    results = [measure_row(row, settings, work, inputs, args.retime) for row in select_rows(args.rows)]
    side = time_side_by_side(results, settings, work, inputs["prompt"], args.retime)
    report = markdown_table(results) + "\n\n" + verdict_text(verdict(results, side))
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"settings": dataclasses.asdict(settings), "results": results,
                                         "side_by_side": side},
                                        indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
