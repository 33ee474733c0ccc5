"""Generation speed of a model folder in onnxruntime-genai, with its KV cache.

Run as a child process (one per model, so its peak RSS is that model's):

    python bench/genai_speed.py FOLDER --prompt-ids ids.json --new-tokens 64 --repeats 3

It loads ``onnxruntime_genai.Model(FOLDER)`` and, per repeat, feeds the fixed
prompt (``append_tokens``: the prefill forward), picks the first token, then
decodes greedily, one cached forward per token. Reported: the best repeat's
first-token latency (prefill + first pick), prefill tokens/s, greedy decode
tokens/s (tokens after the first over their time), the greedy continuation,
and the process's peak RSS.

Decode speed on a shared machine drifts by more than the gap between two
int4 models, so a target comparison is timed side by side instead:

    python bench/genai_speed.py --side-by-side OURS THEIRS --prompt-ids ids.json --pairs 12

loads both folders in one process and alternates their generations in ABBA
order (so a slow drift hits both alike). Reported: each folder's median decode
tokens/s and the median, lowest and highest of the per-pair ratio A/B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.measured_run import emit_result, peak_rss_mb  # noqa: E402


def one_generation(model: Any, prompt: Sequence[int], new_tokens: int) -> dict[str, Any]:
    """One greedy generation of up to `new_tokens` tokens after `prompt`, timed.

    Args:
        model: an ``onnxruntime_genai.Model``.
        prompt: token ids.
        new_tokens: tokens to generate (fewer when the model ends the text).
    Returns:
        prefill_s, first_token_s, decode_s (time of the tokens after the first),
        generated (token count) and tokens (the new ids).
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(list(prompt))
    prefilled = time.perf_counter()
    generator.generate_next_token()  # the first token comes from the prefill's logits
    first = time.perf_counter()
    generated = 1
    while generated < new_tokens and not generator.is_done():
        generator.generate_next_token()
        generated += 1
    end = time.perf_counter()
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt):]]
    return {"prefill_s": prefilled - start, "first_token_s": first - start, "decode_s": end - first,
            "generated": generated, "tokens": tokens}


def measure(folder: str | Path, prompt: Sequence[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` generation speed of `folder` (after one warm-up generation).

    Args:
        folder: a model folder holding genai_config.json.
        prompt: token ids.
        new_tokens: tokens generated per repeat (at least 2: decode needs one after the first).
        repeats: timed generations; each column takes its best.
    Returns:
        first_token_ms, prefill_tok_s, decode_tok_s, generated, text_ids (the
        greedy continuation) and run_rss_mb.
    """
    import onnxruntime_genai as og

    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens {new_tokens} must be >= 2 and repeats {repeats} >= 1")
    model = og.Model(str(folder))
    one_generation(model, prompt, min(new_tokens, 4))  # warm-up: session allocations, caches
    runs = [one_generation(model, prompt, new_tokens) for _ in range(repeats)]
    decoded = [r for r in runs if r["generated"] > 1]
    return {
        "first_token_ms": 1000 * min(r["first_token_s"] for r in runs),
        "prefill_tok_s": len(prompt) / min(r["prefill_s"] for r in runs),
        "decode_tok_s": max((r["generated"] - 1) / r["decode_s"] for r in decoded) if decoded else None,
        "generated": runs[-1]["generated"],
        "text_ids": runs[-1]["tokens"],
        "run_rss_mb": peak_rss_mb(),
    }


def abba_order(pairs: int) -> list[int]:
    """Which of two models runs at each step of `pairs` pairs: 0 1 1 0 0 1 1 0 ...

    Args:
        pairs: timed pairs.
    Returns:
        2 * `pairs` indices; each pair holds one run of each model.
    """
    return [(i // 2 + i) % 2 for i in range(2 * pairs)]  # 0,1 | 1,0 | 0,1 | ...


def side_by_side(folders: Sequence[str | Path], prompt: Sequence[int], new_tokens: int,
                 pairs: int) -> dict[str, Any]:
    """Greedy decode speed of two folders timed alternately in one process.

    Args:
        folders: (A, B), each a folder holding genai_config.json.
        prompt: token ids.
        new_tokens: tokens per generation (at least 2).
        pairs: timed pairs (ABBA order after one warm-up each).
    Returns:
        decode_tok_s: [median of A, median of B]; ratio_median / ratio_min / ratio_max of the
        per-pair A/B decode speeds; pairs.
    """
    import onnxruntime_genai as og

    if new_tokens < 2 or pairs < 1:
        raise ValueError(f"new_tokens {new_tokens} must be >= 2 and pairs {pairs} >= 1")
    models = [og.Model(str(f)) for f in folders]
    for model in models:
        one_generation(model, prompt, min(new_tokens, 4))
    speeds: list[list[float | None]] = [[], []]
    for which in abba_order(pairs):
        run = one_generation(models[which], prompt, new_tokens)
        speeds[which].append((run["generated"] - 1) / run["decode_s"] if run["generated"] > 1 else None)
    timed = [(a, b) for a, b in zip(*speeds) if a is not None and b is not None]
    if not timed:
        raise ValueError("no pair decoded past its first token: the models end the text at once")
    ratios = [a / b for a, b in timed]
    return {"decode_tok_s": [statistics.median(s) for s in zip(*timed)], "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "pairs": len(timed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--side-by-side", nargs=2, metavar=("A", "B"), help="time two folders alternately")
    parser.add_argument("--pairs", type=int, default=12, help="with --side-by-side: timed pairs")
    parser.add_argument("--prompt-ids", required=True, type=Path, help="JSON list of prompt token ids")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    prompt = json.loads(args.prompt_ids.read_text())
    if args.side_by_side:
        emit_result(side_by_side(args.side_by_side, prompt, args.new_tokens, args.pairs))
    elif args.folder:
        emit_result(measure(args.folder, prompt, args.new_tokens, args.repeats))
    else:
        parser.error("give a FOLDER or --side-by-side A B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
