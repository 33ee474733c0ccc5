"""Optimum's side of the folder tests, run by the python of ``build/venv-optimum`` (``make optimum-venv``).

optimum-onnx pins transformers 4.x and the project runs 5.x, so the tests call
this script in a subprocess instead of importing Optimum:

* ``export HF_FOLDER OUT``: ``text-generation-with-past`` export of a
  transformers folder (the tokenizer files are copied beside it when
  Optimum's transformers cannot read the 5.x tokenizer config);
* ``generate IDS N FOLDER...``: per folder, ``ORTModelForCausalLM.from_pretrained(FOLDER)``
  greedy generation of N tokens after the comma-separated prompt IDS; prints
  one JSON line per folder: ``tokens`` (the new ids) and ``logits`` (the last
  prompt position's logits, the first step's). (One process for several
  folders: importing torch and transformers is most of the time.) When FOLDER holds onnx-gptq's
  custom-op library (a model with GptqMatMul), it is registered on the
  session options Optimum is given, as a user would.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(hf_folder: Path, out: Path) -> None:
    """Export `hf_folder` with Optimum into `out` (model.onnx with past_key_values, config.json)."""
    from optimum.exporters.onnx import main_export

    main_export(str(hf_folder), output=str(out), task="text-generation-with-past")
    for name in TOKENIZER_FILES:
        if (hf_folder / name).is_file() and not (out / name).exists():
            shutil.copy2(hf_folder / name, out / name)


def generate(folder: Path, prompt: list[int], new_tokens: int) -> dict[str, list]:
    """Greedy generation through ORTModelForCausalLM (its KV cache); the new ids and the first step's logits."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    import onnxruntime

    options = onnxruntime.SessionOptions()
    for library in folder.glob("*onnx_gptq_ops*"):
        options.register_custom_ops_library(str(library))
    model = ORTModelForCausalLM.from_pretrained(str(folder), session_options=options)
    ids = torch.tensor([prompt], dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return {"tokens": out[0, len(prompt):].tolist(), "logits": logits.float().tolist()}


def main(argv: list[str]) -> int:
    """Dispatch ``export`` / ``generate``; returns the exit code."""
    if argv[:1] == ["export"] and len(argv) == 3:
        export(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["generate"] and len(argv) >= 4:
        for folder in argv[3:]:
            print(json.dumps(generate(Path(folder), [int(t) for t in argv[1].split(",")], int(argv[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
