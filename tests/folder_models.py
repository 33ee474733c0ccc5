"""Small model folders of each kind users bring, built from one tiny random-weight Llama.

* :func:`write_hf_llama`: a transformers folder (config, safetensors, a
  word-level tokenizer whose words are those of ``tests.test_cli.TEXT``);
* :func:`run_builder`: that folder through onnxruntime-genai's model builder
  (GroupQueryAttention, fused qkv and gate/up, symbolic ``kv_cache_dim``);
* :func:`optimum_export`: through Optimum's ``text-generation-with-past``
  exporter, in the venv ``make optimum-venv`` makes;
* :func:`own_export`: through ``onnx-gptq export``, with the tokenizer and
  config.json beside it.

And the clients that load what is written: :func:`genai_greedy`
(onnxruntime_genai.Model) and :func:`optimum_greedy` (ORTModelForCausalLM).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_cli import TEXT

ROOT = Path(__file__).resolve().parents[1]
OPTIMUM_PYTHON = ROOT / "build" / "venv-optimum" / "bin" / "python"
OPTIMUM_SCRIPT = Path(__file__).with_name("optimum_roundtrip.py")
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = 96  # not the hidden size: the builder wires the head wrongly when the two are equal
#: The prompt every client generates from: BOS and three words of TEXT.
PROMPT = [1, 4, 5, 6]
_TIMEOUT = 300


def write_hf_llama(folder: Path, *, seed: int = 0) -> Path:
    """A tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads, tied head) saved as a transformers folder.

    Weights are drawn wider than transformers' default (std 0.2, not 0.02) so
    the logits are far from flat and quantization error shows in them.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    words = sorted(set(TEXT.split()))
    vocab = {token: i for i, token in enumerate(SPECIAL)} | {w: i + len(SPECIAL) for i, w in enumerate(words)}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{tail}")
    return done


def run_builder(hf_folder: Path, out: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder on `hf_folder` for the CPU (``-p precision``) into `out`."""
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct",
          "-i", str(hf_folder), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")],
         f"the builder (-p {precision})")
    return out


def optimum_available() -> bool:
    """Whether ``make optimum-venv`` has made Optimum's venv."""
    return (OPTIMUM_PYTHON.parent.parent / ".installed").is_file()


def optimum_export(hf_folder: Path, out: Path) -> Path:
    """Optimum's ``text-generation-with-past`` export of `hf_folder` into `out`."""
    _run([str(OPTIMUM_PYTHON), str(OPTIMUM_SCRIPT), "export", str(hf_folder), str(out)], "Optimum's export")
    return out


def optimum_greedy(*folders: Path, new_tokens: int = 4) -> list[tuple[list[int], np.ndarray]]:
    """ORTModelForCausalLM.from_pretrained on each folder (one process): greedy ids after :data:`PROMPT`
    and the first step's logits."""
    done = _run([str(OPTIMUM_PYTHON), str(OPTIMUM_SCRIPT), "generate", ",".join(map(str, PROMPT)), str(new_tokens),
                 *map(str, folders)], "ORTModelForCausalLM")
    results = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    assert len(results) == len(folders), done.stdout
    return [(r["tokens"], np.asarray(r["logits"], dtype=np.float32)) for r in results]


def own_export(hf_folder: Path, out: Path) -> Path:
    """``onnx-gptq export`` of `hf_folder` as `out`/model.onnx, with its config.json and tokenizer files."""
    from onnx_gptq.cli import main

    out.mkdir()
    assert main(["export", str(hf_folder), "-o", str(out / "model.onnx")]) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(hf_folder / name, out / name)
    return out


def genai_greedy(folder: Path, new_tokens: int = 4, prompt: list[int] | None = None
                 ) -> tuple[list[int], np.ndarray]:
    """onnxruntime_genai.Model(folder): greedy ids after `prompt` (default :data:`PROMPT`; its KV cache) and the
    first step's logits (the last :data:`VOCAB` of them)."""
    import onnxruntime_genai as og

    prompt = PROMPT if prompt is None else prompt
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    logits = np.array(generator.get_logits(), dtype=np.float32).reshape(-1)[-VOCAB:]
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


def onnxruntime_logits(folder: Path) -> np.ndarray:
    """The last :data:`PROMPT` position's logits of `folder`'s model run by onnxruntime itself (no cache)."""
    from onnx_gptq.tools.logits import LogitsRunner

    runner = LogitsRunner(folder, ["CPUExecutionProvider"], custom_ops=True)
    return runner.logits(np.array([PROMPT], dtype=np.int64))[0, -1].astype(np.float32)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


__all__ = ["OPTIMUM_PYTHON", "PROMPT", "VOCAB", "genai_greedy", "optimum_available", "optimum_export",
           "optimum_greedy", "onnxruntime_logits", "own_export", "relative_error", "run_builder", "write_hf_llama"]
