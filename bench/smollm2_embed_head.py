"""SmolLM2-135M: what quantizing the output head and the embedding table costs, and saves.

The body (every MatMul but the head) is quantized once, W4 g128 GPTQ (act-order,
calibration on State of the Union addresses before 2000). Each variant then
quantizes the head (GPTQ on the final hidden state's Hessian, collected on the
quantized body) and / or the embedding table (com.microsoft.GatherBlockQuantized)
of that model; a last row is the whole default run in one go. Every model is
scored on the same windows of the addresses from 2000 on, and its files weighed.

    python bench/smollm2_embed_head.py --calib-samples 32 --windows 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import smollm2_bench  # noqa: E402
from onnx_gptq import model_io, quantize_with_report  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.tools.evaluate import evaluate  # noqa: E402

#: (label, head bits, embedding bits, shared): None is float.
VARIANTS = (  # the smallest first: on a busy machine the later rows may not be reached
    ("head 4-bit + embedding 4-bit, shared", 4, 4, True),
    ("head 4-bit, embedding float", 4, None, True),
    ("head float, embedding 4-bit", None, 4, True),
    ("head 8-bit + embedding 8-bit, shared", 8, 8, True),
    ("head 8-bit, embedding float", 8, None, True),
    ("head float, embedding 8-bit", None, 8, True),
    ("head 4-bit + embedding 4-bit, stored twice", 4, 4, False),
)
HEAD = r"lm_head"
#: Matches no layer: the head stays float (an --include naming it would quantize it at --bits).
NOTHING = r"(?!)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--only", nargs="*", type=int, help="variant numbers to run (default all)")
    parser.add_argument("--reuse-body", action="store_true", help="keep a body model written by an earlier run")
    parser.add_argument("--no-default-run", action="store_true", help="skip the one-run defaults row")
    args = parser.parse_args(argv)
    setup = smollm2_bench.prepare("embed_head")
    tok, calib_text, ev, work = setup.tokenizer, setup.calib, setup.evaluation, setup.work
    calib = CalibConfig(num_samples=args.calib_samples, seq_len=512)

    def score(label: str, path: Path, seconds: float | None) -> None:
        result = evaluate(path, ev, tok, seq_len=512, max_windows=args.windows)
        size = model_io.files_size(path) / 1e6
        took = "-" if seconds is None else f"{seconds:.0f}"
        print(f"| {label} | {result.perplexity:.3f} | {size:.1f} | {took} |", flush=True)

    print(f"SmolLM2-135M-Instruct, W4 g128 GPTQ body, {args.calib_samples} x 512 calibration tokens, "
          f"perplexity on {args.windows} x 512 tokens")
    print("| model | perplexity | file MB | quantization s |")
    print("|---|---|---|---|")
    if not args.reuse_body:
        score("fp32", setup.reference, None)
    body = work / f"body_w4_{args.calib_samples}.onnx"
    t = time.time()
    if not (args.reuse_body and body.exists()):
        quantize_with_report(setup.reference, calib_text, QuantConfig(bits=4, group_size=128, head_bits=None,
                                                                      embedding_bits=None),
                             calib=calib, tokenizer=tok, output=body)
        score("W4 g128 body; head and embedding float", body, time.time() - t)
    for number, (label, head, embedding, shared) in enumerate(VARIANTS):
        if args.only and number not in args.only:
            continue
        out = work / f"variant{number}.onnx"
        config = QuantConfig(bits=4, group_size=128, include=(HEAD if head else NOTHING,), head_bits=head,
                             embedding_bits=embedding,
                             shared_embedding=shared)
        t = time.time()
        quantize_with_report(body, calib_text, config, calib=calib, tokenizer=tok, output=out)
        score(f"W4 g128 body; {label}", out, time.time() - t)
    if args.no_default_run:
        return 0
    out = work / "default.onnx"
    t = time.time()
    _, report = quantize_with_report(setup.reference, calib_text, QuantConfig(), calib=calib, tokenizer=tok,
                                     output=out)
    score(f"onnx-gptq defaults in one run ({QuantConfig().to_dict()['head_bits']}-bit head, "
          f"{QuantConfig().to_dict()['embedding_bits']}-bit embedding)", out, time.time() - t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
