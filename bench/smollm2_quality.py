"""SmolLM2-135M quality at 128 x 512 calibration tokens: rows given on the command line.

Each row is BITS:FLAGS with flags joined by '+': rtn, gptq, act (act-order is the
default since this measurement; 'gptq' means without act-order here), sym, mse, seq
(--sequential; rows without it are one-pass), dN (damp N, e.g. d0.05; dauto: per layer by held-out error), own (quantize in a child
process through the CLI, and print its wall time and peak RSS; no Hessians shared). Calibration: 128 windows of 512 tokens from State of the Union
addresses before 2000; evaluation: perplexity, KL and top-1 against fp32 on 16
windows of 512 tokens from 2000 on.

    python bench/smollm2_quality.py 128 "3:rtn,3:act,3:act+seq,4:rtn,4:act"

An optional third argument, austen, calibrates on Jane Austen's novels instead
(out-of-domain for the evaluation text); an optional fourth, the number of
evaluation windows (default 16); an optional fifth, the model: smollm2 (default) or
gemma3 (Gemma 3 270M, devtools.assets.gemma3_gguf). Rows without seq share one set of
one-pass Hessians (devtools.hessian_memo): quant times after the first are solve times.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import smollm2_bench, text_assets  # noqa: E402
from devtools.hessian_memo import reuse_hessians  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.tools.evaluate import evaluate  # noqa: E402
from onnx_gptq.pipeline import quantize_with_report  # noqa: E402



def quantize_in_child(kw: dict, n: int, sequential: bool, out: Path) -> tuple[float, float]:
    """Quantize through `python -m onnx_gptq.cli` (head and embedding float); (wall seconds, peak RSS MB)."""
    command = [sys.executable, "-m", "onnx_gptq.cli", str(ref), "--calib", calib, "--tokenizer", tok, "-o", str(out),
               "--bits", str(kw["bits"]), "--group-size", "128", "--num-samples", str(n), "--seq-len", "512",
               "--damp", str(kw.get("damp", 0.01)), "--head", "float", "--embedding", "float", "-q"]
    command += ["--act-order" if kw["act_order"] else "--no-act-order", "--algo", kw.get("algo", "gptq")]
    command += ["--sym"] if kw.get("sym") else []
    command += ["--mse"] if kw.get("mse") else []
    command += ["--sequential", "on" if sequential else "off"]
    start = time.time()
    child = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"quantizing {out.name} failed: {command}")
    return time.time() - start, usage.ru_maxrss / 1024


model_name = sys.argv[5] if len(sys.argv) > 5 else "smollm2"
setup = smollm2_bench.prepare("quality" if model_name == "smollm2" else f"quality-{model_name}", model_name)
tok, calib, ev, work, ref = setup.tokenizer, setup.calib, setup.evaluation, setup.work, setup.reference
n = int(sys.argv[1])
rows = sys.argv[2].split(",")
domain = sys.argv[3] if len(sys.argv) > 3 else "sotu"
if domain == "austen":
    calib = str(text_assets.austen_text_file())
windows = int(sys.argv[4]) if len(sys.argv) > 4 else 16
fp32 = evaluate(ref, ev, tok, seq_len=512, max_windows=windows)
print(f"fp32           ppl {fp32.perplexity:.2f}", flush=True)
with reuse_hessians():
    for row in rows:
        bits, rest = row.split(":")
        kw = dict(bits=int(bits), group_size=128, act_order=False, head_bits=None, embedding_bits=None)  # body
        flags = rest.split("+")
        if "rtn" in flags:
            kw["algo"] = "rtn"
        if "act" in flags:
            kw["act_order"] = True
        if "sym" in flags:
            kw["sym"] = True
        if "mse" in flags:
            kw["mse"] = True
        kw.update(("damp", "auto" if f == "dauto" else float(f[1:])) for f in flags if f.startswith("d"))
        out = work / f"q_{domain}_{row.replace(':', '_').replace('+', '_')}.onnx"
        sequential = "seq" in flags
        rss, solve = "", ""
        if "own" in flags:
            qt, peak = quantize_in_child(kw, n, sequential, out)
            rss = f" peak RSS {peak:.0f} MB"
        else:
            t = time.time()
            _, report = quantize_with_report(ref, calib, QuantConfig(**kw), calib=CalibConfig(
                num_samples=n, seq_len=512, sequential=sequential), tokenizer=tok, output=out)
            qt = time.time() - t
            solve = f" (solve {report.phases.get('solve', report.phases.get('sequential:solve', 0.0)):.0f}s)"
            if report.layers and report.layers[0].damp_held_errors is not None:
                chosen = [r.damp for r in report.layers]
                solve += " damps " + " ".join(f"{d:g}x{chosen.count(d)}" for d in sorted(set(chosen)))
        r = evaluate(out, ev, tok, reference=ref, seq_len=512, max_windows=windows)
        print(f"{row:14s} {domain} n={n} ppl {r.perplexity:.2f} (+{r.perplexity - fp32.perplexity:.2f}) kl {r.kl:.4f} "
              f"top1 {r.top1:.3f} quant {qt:.0f}s{solve}{rss}", flush=True)
