"""Generation speed of a model folder in onnxruntime-genai, with its KV cache.

Run as a child process (one per model, so its peak RSS is that model's):

    python bench/genai_speed.py FOLDER --prompt-ids ids.json --new-tokens 64 --repeats 3

It loads ``onnxruntime_genai.Model(FOLDER)`` and, per repeat, feeds the fixed
prompt (``append_tokens``: the prefill forward), picks the first token, then
decodes greedily, one cached forward per token. Reported: the best repeat's
first-token latency (prefill + first pick), prefill tokens/s, greedy decode
tokens/s (tokens after the first over their time), the greedy continuation,
and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--prompt-ids", required=True, type=Path, help="JSON list of prompt token ids")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    prompt = json.loads(args.prompt_ids.read_text())
    emit_result(measure(args.folder, prompt, args.new_tokens, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
