"""The deployment benchmark's pure pieces and its measuring helpers, on a tiny builder folder.

The benchmark itself runs SmolLM2 for minutes (``make bench-deploy``); here: the
table, the target verdict, row selection and cache keys, the child-process
helpers (wall time, peak RSS, result lines) and the onnxruntime-genai timing
child on a tiny random-weight Llama through the builder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_deploy  # noqa: E402
import decode_profile  # noqa: E402
import genai_speed  # noqa: E402
from devtools import measured_run  # noqa: E402
from tests.folder_models import PROMPT, VOCAB, genai_greedy  # noqa: E402


def _row(name: str, **values: float) -> dict[str, object]:
    base = {"row": name, "label": name, "perplexity": 30.0, "kl": 0.1, "top1": 0.8, "size_mb": 86.0,
            "quant_s": 14.0, "quant_rss_mb": 1700.0, "first_token_ms": 400.0, "prefill_tok_s": 320.0,
            "decode_tok_s": 100.0, "run_rss_mb": 230.0}
    return base | values


def test_verdict_names_each_part_met_or_missed() -> None:
    ours = _row("gptq", perplexity=29.0, size_mb=90.0, decode_tok_s=100.0)
    checks = bench_deploy.verdict([_row("builder-int4", perplexity=31.8), ours])
    assert [c.met for c in checks] == [True, False, True]
    text = bench_deploy.verdict_text(checks)
    assert text.startswith("target (gptq vs builder-int4): NOT MET")
    assert "MISSED: folder MB (at most): onnx-gptq 90.00, builder int4 86.00" in text
    assert "met: decode tok/s (at least; best of each row's repeats)" in text


def test_verdict_met_only_when_all_three_hold_and_not_judged_without_rows() -> None:
    checks = bench_deploy.verdict([_row("builder-int4", perplexity=31.8, decode_tok_s=87.0),
                                   _row("gptq", perplexity=29.5, size_mb=80.0, decode_tok_s=90.0)])
    assert all(c.met for c in checks)
    assert "MET: all three at once" in bench_deploy.verdict_text(checks)
    # Equal perplexity is not "below"; a failed row cannot be judged.
    tie = bench_deploy.verdict([_row("builder-int4"), _row("gptq")])
    assert [c.met for c in tie] == [False, True, True]
    assert bench_deploy.verdict([_row("builder-int4"), {"row": "gptq", "label": "x", "error": "boom"}]) == []
    assert "not judged" in bench_deploy.verdict_text([])


def test_side_by_side_timing_decides_the_decode_part() -> None:
    rows = [_row("builder-int4", perplexity=31.8, decode_tok_s=80.0), _row("gptq", size_mb=80.0, decode_tok_s=90.0)]
    slower = {"decode_tok_s": [43.0, 45.0], "ratio_median": 0.96, "ratio_min": 0.8, "ratio_max": 1.1, "pairs": 12}
    checks = bench_deploy.verdict(rows, slower)
    assert [c.met for c in checks] == [True, True, False]  # the rows' best said 90 >= 80; the pairs say no
    assert (checks[2].ours, checks[2].theirs) == (43.0, 45.0)
    assert "12 ABBA pairs" in checks[2].what and "ratio median 0.960, range 0.80-1.10" in checks[2].what
    assert bench_deploy.verdict(rows, slower | {"ratio_median": 1.0})[2].met
    # A failed side-by-side child leaves the rows' own numbers to decide.
    assert bench_deploy.verdict(rows, {"error": "boom"})[2].met


def test_abba_order_balances_each_pair() -> None:
    order = genai_speed.abba_order(4)
    assert order == [0, 1, 1, 0, 0, 1, 1, 0]
    assert all(sorted(order[i:i + 2]) == [0, 1] for i in range(0, 8, 2))


def test_side_by_side_child_times_two_folders_alternately(genai_folder: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps([1, *range(4, 35)]))
    run = measured_run.run_measured([sys.executable, str(ROOT / "bench" / "genai_speed.py"), "--side-by-side",
                                     str(genai_folder), str(genai_folder), "--prompt-ids", str(prompt),
                                     "--new-tokens", "8", "--pairs", "3"], env=measured_run.python_env(str(ROOT)))
    result = run.result("side by side")
    assert result["pairs"] == 3 and len(result["decode_tok_s"]) == 2 and min(result["decode_tok_s"]) > 0
    assert 0 < result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]


def test_table_has_one_line_per_row_and_says_why_a_row_failed() -> None:
    rows = [_row("builder-fp32", kl=None, top1=None), _row("gptq", top1=0.8125),
            {"row": "gptq-w3", "label": "onnx-gptq W3", "error": "ModelError: bad"},
            {"row": "gptq-w2", "label": "onnx-gptq W2", "perplexity": 90.0, "size_mb": 50.0,
             "error": "RuntimeError: no such op"}]
    lines = bench_deploy.markdown_table(rows).splitlines()
    assert len(lines) == 8
    assert all(line.count("|") == lines[0].count("|") for line in lines[:6])
    fp32 = lines[2].split(" | ")
    assert fp32[2:4] == ["-", "-"]  # no KL / top-1 against itself
    assert lines[3].split(" | ")[1:5] == ["30.00", "0.1000", "81.2", "86.0"]
    assert "failed: ModelError: bad" in lines[4]
    # Scored, then failed in onnxruntime-genai: its numbers stay, the reason goes under the table.
    assert lines[5].split(" | ")[1:5] == ["90.00", "-", "-", "50.0"]
    assert lines[7] == "- onnx-gptq W2: failed after scoring: RuntimeError: no such op"


def test_rows_selection_adds_the_reference_and_refuses_unknown_names() -> None:
    assert [r.name for r in bench_deploy.select_rows("gptq,builder-int4")] == ["builder-fp32", "gptq", "builder-int4"]
    assert len(bench_deploy.select_rows(None)) == len(bench_deploy.ROWS)
    with pytest.raises(SystemExit, match="unknown row.*nope; choose from builder-fp32"):
        bench_deploy.select_rows("gptq,nope")
    names = [r.name for r in bench_deploy.ROWS]
    assert len(set(names)) == len(names)
    assert {bench_deploy.OURS_TARGET, bench_deploy.BUILDER_TARGET} <= set(names)


def test_cache_key_is_stable_and_changes_with_any_setting() -> None:
    key = bench_deploy.cache_key("onnx-gptq", ("--bits", "3"), "abc", 128)
    assert key == bench_deploy.cache_key("onnx-gptq", ("--bits", "3"), "abc", 128)
    assert len(key) == 12
    assert key != bench_deploy.cache_key("onnx-gptq", ("--bits", "3"), "abd", 128)
    assert key != bench_deploy.cache_key("onnx-gptq", ("--bits", "4"), "abc", 128)


def test_run_measured_reports_the_childs_own_peak_rss_and_time() -> None:
    script = ("import sys, time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
              "time.sleep(0.2); print('@@bench result: {\"ok\": 1}'); sys.stderr.write('done\\n')")
    run = measured_run.run_measured([sys.executable, "-c", script])
    assert run.returncode == 0
    assert 300 <= run.peak_rss_mb < 600
    assert run.seconds >= 0.2
    assert run.result("alloc") == {"ok": 1}
    small = measured_run.run_measured([sys.executable, "-c", "pass"])
    assert small.peak_rss_mb < 100


def test_run_measured_failures_name_the_step_and_its_last_error_line() -> None:
    failed = measured_run.run_measured([sys.executable, "-c", "import sys; sys.exit('bad input: x')"])
    with pytest.raises(measured_run.ChildFailed, match="quantizing failed") as info:
        failed.result("quantizing")
    assert info.value.reason == "bad input: x"
    with pytest.raises(measured_run.ChildFailed, match="no result line"):
        measured_run.run_measured([sys.executable, "-c", "print('hello')"]).result("timing")
    slow = measured_run.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow.returncode != 0 and slow.seconds < 10


def test_genai_speed_child_times_kv_cache_generation(genai_folder: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps([1, *range(4, 35)]))
    run = measured_run.run_measured([sys.executable, str(ROOT / "bench" / "genai_speed.py"), str(genai_folder),
                                     "--prompt-ids", str(prompt), "--new-tokens", "8", "--repeats", "2"],
                                    env=measured_run.python_env(str(ROOT)))
    result = run.result("timing")
    assert result["generated"] == len(result["text_ids"]) <= 8
    assert all(0 <= t < VOCAB for t in result["text_ids"])
    assert result["first_token_ms"] > 0 and result["prefill_tok_s"] > 0
    if result["generated"] > 1:
        assert result["decode_tok_s"] > 0
    assert 0 < result["run_rss_mb"] <= run.peak_rss_mb + 1


def test_generation_is_greedy_and_repeatable(genai_folder: Path) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(genai_folder))
    first = genai_speed.one_generation(model, PROMPT, 6)
    again = genai_speed.one_generation(model, PROMPT, 6)
    assert first["tokens"] == again["tokens"]
    # The same greedy continuation as the folder tests' own onnxruntime-genai loop.
    assert first["tokens"] == genai_greedy(genai_folder, 6)[0][:len(first["tokens"])]
    assert first["first_token_s"] >= first["prefill_s"] > 0
    with pytest.raises(ValueError, match="new_tokens 1 must be >= 2"):
        genai_speed.measure(genai_folder, [1, 2], 1, 1)


def test_folder_mb_counts_the_files_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x" * 2**20)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 2**19)
    (tmp_path / "sub").mkdir()
    assert bench_deploy.folder_mb(tmp_path) == pytest.approx(1.5)


def test_head_and_embedding_rows_follow_the_cli_at_hand() -> None:
    later = bench_deploy.head_embedding_rows({"--head", "--embedding", "--bits"})
    assert [(r.name, r.args) for r in later] == [
        ("gptq-float-head-embed", ("--head", "float", "--embedding", "float")),
        ("gptq-head4-embed4", ("--head", "4", "--embedding", "4")),
        ("gptq-head8-embed8", ("--head", "8", "--embedding", "8"))]
    before = bench_deploy.head_embedding_rows({"--quantize-head", "--bits"})
    assert [(r.name, r.args) for r in before] == [("gptq-float-head-embed", ()), ("gptq-head", ("--quantize-head",))]
    from onnx_gptq import cli

    parser = cli.build_parser()
    for row in bench_deploy.ROWS:  # every onnx-gptq row's flags parse with today's CLI
        if row.kind == "onnx-gptq":
            parser.parse_args(["model.onnx", *row.args])


def test_code_version_names_the_package_and_custom_op_trees() -> None:
    import re

    version = bench_deploy.code_version()
    assert re.fullmatch(r"[0-9a-f]{40},[0-9a-f]{40}(\+[0-9a-f]{12})?", version), version


def test_decode_profile_sums_kernel_time_and_weight_bytes_per_op(genai_folder: Path) -> None:
    import onnx

    result = decode_profile.profile(genai_folder, threads=1, past=8, steps=2)
    assert result["step_ms"] > 0 and result["kernel_ms"]["MatMul"] > 0
    model = onnx.load(str(genai_folder / "model.onnx"))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    matmul_bytes = sum(sizes.get(i, 0) for n in model.graph.node if n.op_type == "MatMul" for i in n.input)
    assert matmul_bytes > 0 and result["weight_mb"]["MatMul"] == pytest.approx(matmul_bytes / 1e6)
