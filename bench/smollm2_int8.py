"""SmolLM2-135M perplexity of custom-format (GptqMatMul) models at accuracy_level 0 and 4.

For each bit width, quantizes SmolLM2 once (GPTQ, group 128, act-order,
calibration on State of the Union addresses before 2000) with --format custom,
then scores the same model file twice on the same evaluation windows (addresses
from 2000 on): as written (accuracy_level 0, fp32 math) and with
accuracy_level=4 set on every GptqMatMul node (int8 activations). Only the
attribute differs between the two runs.

    python bench/smollm2_int8.py --bits 4 3 --calib-samples 32 --windows 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import smollm2_bench  # noqa: E402
from onnx_gptq import quantize_with_report  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.runtime import custom_ops  # noqa: E402
from onnx_gptq.tools.evaluate import evaluate  # noqa: E402


def with_accuracy_level(src: Path, dst: Path, level: int) -> int:
    """Copies model `src` to `dst` with accuracy_level=`level` on every GptqMatMul node; returns their count."""
    model = onnx.load(str(src), load_external_data=False)
    count = 0
    for node in model.graph.node:
        if node.domain == custom_ops.DOMAIN and node.op_type == custom_ops.OP_TYPE:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
            count += 1
    onnx.save(model, str(dst))  # external data stays in src's file, which dst names relative to the same folder
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    args = parser.parse_args(argv)
    setup = smollm2_bench.prepare("int8")
    tok, calib, ev, work, ref = setup.tokenizer, setup.calib, setup.evaluation, setup.work, setup.reference
    fp32 = evaluate(ref, ev, tok, seq_len=512, max_windows=args.windows)
    print(f"| model | accuracy_level 0 ppl | accuracy_level 4 ppl | difference |")
    print("|---|---|---|---|")
    print(f"| fp32 | {fp32.perplexity:.3f} | - | - |", flush=True)
    for bits in args.bits:
        out = work / f"w{bits}_custom.onnx"
        t = time.time()
        quantize_with_report(ref, calib, QuantConfig(bits=bits, group_size=128, format="custom", head_bits=None,
                                                   embedding_bits=None),
                             calib=CalibConfig(num_samples=args.calib_samples, seq_len=512), tokenizer=tok,
                             output=out)
        quant_s = time.time() - t
        out4 = work / f"w{bits}_custom_acc4.onnx"
        nodes = with_accuracy_level(out, out4, 4)
        r0 = evaluate(out, ev, tok, seq_len=512, max_windows=args.windows)
        r4 = evaluate(out4, ev, tok, seq_len=512, max_windows=args.windows)
        print(f"| W{bits} g128 GPTQ, {nodes} GptqMatMul nodes (quantized in {quant_s:.0f} s) | {r0.perplexity:.3f} | "
              f"{r4.perplexity:.3f} | {r4.perplexity - r0.perplexity:+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
