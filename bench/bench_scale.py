"""Scale benchmark: peak memory and wall time of `onnx-gptq` on synthetic Llama-shaped models.

For each layer count, a synthetic model (bench/synthetic_llama.py, random fp16
weights in external data) is written, then quantized by the CLI in a child
process per mode (one-pass, `--sequential`) with N x T random token ids.
The child's memory is sampled from /proc every 0.2 s (VmRSS, and its
anonymous and file-backed parts: memory-mapped weights count in RssFile and
can be reclaimed by the kernel, RssAnon cannot) and its exact peak RSS taken
from wait4's rusage. Phase times come from the CLI's `--report` JSON.

A child whose RSS passes `--kill-above-gb` is stopped (a 7B model that does
not fit would otherwise invite the kernel's OOM killer onto other processes).

`--probe-ort` also measures onnxruntime alone: one forward pass of the float
model under session-option variants, to tell onnxruntime's share of the
memory from ours.

Usage:
    python3 bench/bench_scale.py --shape 1b --layers 4 8 16 --modes onepass sequential
    python3 bench/bench_scale.py --shape 7b --layers 32 --modes sequential --workdir /big/disk
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_CLI = "import sys; from onnx_gptq.cli import main; sys.exit(main())"
_PROBE = r"""
import sys, time, numpy as np, onnxruntime as ort
path, variant, n, t, b, vocab = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
o = ort.SessionOptions()
o.log_severity_level = 3
if variant == "no-opt":
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
else:
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
if variant in ("no-prepack", "no-opt"):
    o.add_session_config_entry("session.disable_prepacking", "1")
start = time.perf_counter()
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
load = time.perf_counter() - start
ids = np.random.default_rng(0).integers(0, vocab, size=(n, t), dtype=np.int64)
start = time.perf_counter()
for i in range(0, n, b):
    s.run(["logits"], {"input_ids": ids[i:i + b], "attention_mask": np.ones_like(ids[i:i + b])})
print("PROBE", load, time.perf_counter() - start)
"""


@dataclasses.dataclass
class Memory:
    """Peaks of one child process, in bytes."""

    rss: int = 0  # wait4 ru_maxrss
    rss_sampled: int = 0
    anon: int = 0
    file: int = 0
    cpu_s: float = 0.0  # user + system CPU seconds


def _status(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) of `pid` in bytes, from /proc."""
    values = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values["VmRSS"], values["RssAnon"], values["RssFile"]


def run_measured(command: list[str], *, kill_above: int, log: Path) -> tuple[int, float, Memory]:
    """Run `command`, sampling its memory.

    Returns:
        (exit code, wall seconds, memory peaks); `memory.cpu_s` is the child's
        user + system CPU time, steadier than wall time on a shared machine.
    """
    memory = Memory()
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss, anon, file = _status(child.pid)
                memory.rss_sampled = max(memory.rss_sampled, rss)
                memory.anon = max(memory.anon, anon)
                memory.file = max(memory.file, file)
                if rss > kill_above:
                    out.write(f"\n[bench] RSS {rss / 2**30:.1f} GiB over the limit: killed\n")
                    out.flush()
                    child.kill()
                    return
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        child.returncode = os.waitstatus_to_exitcode(status)
    memory.rss = usage.ru_maxrss * 1024
    memory.cpu_s = usage.ru_utime + usage.ru_stime
    return child.returncode, wall, memory


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1b", "7b", "tiny"], default="1b")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--modes", nargs="+", choices=["onepass", "sequential"], default=["onepass", "sequential"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--extra", default="", help="more CLI arguments, space separated (e.g. '--jobs 2')")
    parser.add_argument("--workdir", type=Path, default=None, help="where models go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--kill-above-gb", type=float, default=20.0)
    parser.add_argument("--probe-ort", nargs="*", default=None,
                        choices=["default", "no-prepack", "no-opt"],
                        help="also time and measure a plain onnxruntime forward under these variants")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnx-gptq-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kill_above = int(args.kill_above_gb * 2**30)
    ids = np.random.default_rng(0).integers(0, synthetic_llama.PRESETS[args.shape].vocab,
                                            size=(args.samples, args.seq_len), dtype=np.int64)
    calib = workdir / "ids.npy"
    np.save(calib, ids)
    results = []
    print(f"machine: {platform.node()} {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM; "
          f"{args.samples} x {args.seq_len} tokens, W{args.bits} g{args.group_size}", flush=True)
    try:
        for layers in args.layers:
            shape = dataclasses.replace(synthetic_llama.PRESETS[args.shape], layers=layers)
            model = workdir / f"{args.shape}_{layers}l.onnx"
            start = time.perf_counter()
            synthetic_llama.build(shape, model)
            print(f"{model.name}: {shape.parameters / 1e9:.2f} B params written in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            for variant in args.probe_ort or []:
                code, wall, memory = run_measured(
                    [sys.executable, "-c", _PROBE, str(model), variant, str(args.samples), str(args.seq_len),
                     str(args.batch_size), str(shape.vocab)],
                    kill_above=kill_above, log=workdir / f"probe_{layers}_{variant}.log")
                text = (workdir / f"probe_{layers}_{variant}.log").read_text()
                times = [float(x) for x in text.split("PROBE")[-1].split()[:2]] if "PROBE" in text else []
                row = {"layers": layers, "mode": f"ort:{variant}", "params_b": shape.parameters / 1e9,
                       "exit": code, "wall_s": wall, "cpu_s": memory.cpu_s, "peak_rss": memory.rss,
                       "peak_anon": memory.anon, "peak_file": memory.file,
                       "phases": dict(zip(["session", "forward"], times))}
                results.append(row)
                print(json.dumps(row), flush=True)
            for mode in args.modes:
                output = workdir / f"{model.stem}.{mode}.q{args.bits}.onnx"
                report = workdir / f"{model.stem}.{mode}.json"
                command = [sys.executable, "-c", _CLI, str(model), "-o", str(output), "--calib", str(calib),
                           "--num-samples", str(args.samples), "--seq-len", str(args.seq_len),
                           "--batch-size", str(args.batch_size), "--bits", str(args.bits),
                           "--group-size", str(args.group_size), "--report", str(report), "--quiet",
                           *args.extra.split()]
                command += ["--sequential", "on" if mode == "sequential" else "off"]
                code, wall, memory = run_measured(command, kill_above=kill_above,
                                                  log=workdir / f"{model.stem}.{mode}.log")
                phases = json.loads(report.read_text())["phases"] if code == 0 and report.exists() else {}
                row = {"layers": layers, "mode": mode, "params_b": shape.parameters / 1e9, "exit": code,
                       "wall_s": wall, "cpu_s": memory.cpu_s, "peak_rss": memory.rss, "peak_anon": memory.anon,
                       "peak_file": memory.file, "phases": phases}
                if code != 0:
                    row["log_tail"] = (workdir / f"{model.stem}.{mode}.log").read_text()[-1500:]
                results.append(row)
                print(json.dumps(row), flush=True)
                if not args.keep:
                    for path in (output, Path(f"{output}.data")):
                        path.unlink(missing_ok=True)
            if not args.keep:
                model.unlink(missing_ok=True)
                Path(f"{model}.data").unlink(missing_ok=True)
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n| shape | layers | params | mode | exit | wall s | CPU s | peak RSS GiB | peak anon GiB | peak file GiB "
          "| phases (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        print(f"| {args.shape} | {r['layers']} | {r['params_b']:.2f} B | {r['mode']} | {r['exit']} "
              f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} "
              f"| {_gib(r['peak_rss'])} | {_gib(r['peak_anon'])} | {_gib(r['peak_file'])} | {phases} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
