"""Text generation through onnxruntime with the KV cache: ``onnx-gptq generate`` and :func:`generate`.

The model is an .onnx file or a model folder (ours, onnxruntime-genai's
builder's, Optimum's: see `decoder` for what is fed). The prompt is encoded
with the folder's tokenizer (or ``tokenizer=``), through its chat template
with ``chat=True``; tokens are chosen by `sampling`; decoded text streams to a
callback (stdout on the command line) as tokens arrive; generation stops at an
end-of-sequence id of the folder's configs, after `max_new_tokens`, or at the
context length. The result carries the time to the first token and the
prefill and decode throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnx_gptq.errors import ConfigError, UserError
from onnx_gptq.tools.sampling import Sampler, Sampling

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one generation produced and how fast.

    Attributes:
        text: the decoded new tokens ("" without a tokenizer).
        prompt_ids: the prompt's token ids as fed (special tokens and chat template included).
        token_ids: the new tokens, the end-of-sequence id included when one stopped it.
        stop_reason: "eos", "max_new_tokens" or "context".
        first_token_s: seconds from the start of the prefill to the first new token.
        prefill_tokens_per_s: prompt tokens over the prefill's seconds.
        decode_tokens_per_s: tokens after the first over their seconds (0 when there were none).
        cached: the model ran with its KV cache (False: the whole sequence each step).
    """

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    stop_reason: str
    first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line of timings for a terminal."""
        return (f"{len(self.prompt_ids)} prompt tokens, {len(self.token_ids)} new ({self.stop_reason}); "
                f"first token {self.first_token_s * 1000:.1f} ms; prefill {self.prefill_tokens_per_s:.1f} tok/s; "
                f"decode {self.decode_tokens_per_s:.1f} tok/s" + ("" if self.cached else " (no KV cache)"))


def _ids(value: Any) -> set[int]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def eos_ids(folder: Any) -> set[int]:
    """End-of-sequence ids named by a folder's genai_config.json, config.json and generation_config.json."""
    found = _ids(((folder.genai_config or {}).get("model") or {}).get("eos_token_id"))
    found |= _ids((folder.hf_config or {}).get("eos_token_id"))
    generation = folder.folder / "generation_config.json"
    if generation.is_file():
        try:
            found |= _ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            logger.info("'%s' is unreadable; its eos_token_id is ignored", generation)
    return found


def _context_length(folder: Any, graph_limit: int | None) -> int | None:
    limits = [graph_limit] if graph_limit else []
    for key in ("max_position_embeddings", "n_positions"):
        value = (folder.hf_config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
    return min(limits) if limits else None


def chat_prompt(tokenizer_dir: Path, prompt: str) -> str:
    """`prompt` as one user turn through the tokenizer's chat template, ready for the assistant's answer.

    Raises:
        ConfigError: the tokenizer has no chat template (or transformers cannot read it).
    """
    from transformers import AutoTokenizer

    directory = tokenizer_dir if tokenizer_dir.is_dir() else tokenizer_dir.parent
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"chat: transformers cannot read the tokenizer in '{directory}' "
                          f"({type(exc).__name__})") from None
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"chat: the tokenizer in '{directory}' has no chat template")
    return str(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True))


class _TextStream:
    """Decodes the new ids after each token and hands on only the text not yet given out."""

    def __init__(self, tokenizer: Any, sink: Callable[[str], None] | None) -> None:
        self.tokenizer, self.sink, self.ids, self.text = tokenizer, sink, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if self.sink is not None and text.startswith(self.text) and len(text) > len(self.text):
            self.sink(text[len(self.text):])
        self.text = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""
        if self.sink is not None and text.startswith(self.text) and len(text) > len(self.text):
            self.sink(text[len(self.text):])
        return text


def generate(model: str | os.PathLike[str], prompt: str | Sequence[int], *, max_new_tokens: int = 64,
             tokenizer: str | os.PathLike[str] | None = None, chat: bool = False, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             providers: Sequence[str] = ("CPUExecutionProvider",), stream: Callable[[str], None] | None = None,
             stop_at_eos: bool = True) -> GenerationResult:
    """Generate a continuation of `prompt` with an ONNX causal LM.

    Args:
        model: an .onnx file or a model folder.
        prompt: text (encoded with the tokenizer, its BOS prepended) or token ids (fed as they are).
        max_new_tokens: most tokens to generate (>= 1).
        tokenizer: tokenizer.json, a tokenizer folder or a .gguf (default: the model folder's).
        chat: put a text prompt through the tokenizer's chat template as a user turn.
        do_sample, temperature, top_k, top_p, seed: how tokens are chosen (see `sampling.Sampling`).
        providers: onnxruntime execution providers.
        stream: called with each piece of decoded text as it arrives.
        stop_at_eos: stop at an end-of-sequence id of the folder's configs.
    Returns:
        A :class:`GenerationResult`.
    Raises:
        ModelError: missing or unloadable model. ConfigError: bad sampling values,
        max_new_tokens < 1, a prompt that fills the context, or chat without a template.
        UserError: a text prompt and no tokenizer.
    """
    from onnx_gptq import model_folder
    from onnx_gptq.tools.decoder import CachedDecoder
    from onnx_gptq.tools.tokenizer import load_tokenizer

    sampler = Sampler(Sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: {max_new_tokens!r} must be a whole number >= 1")
    folder = model_folder.resolve(model)
    spec = tokenizer if tokenizer is not None else folder.tokenizer
    tok = load_tokenizer(spec) if spec is not None else None
    if isinstance(prompt, str):
        if tok is None:
            raise UserError(f"model '{folder.folder}' has no tokenizer files; give a tokenizer (--tokenizer)")
        if chat:
            prompt_ids = tok.encode(chat_prompt(Path(spec), prompt))  # type: ignore[arg-type]
        else:
            prompt_ids = [*tok.special_tokens[0][:1], *tok.encode(prompt)]
    else:
        if chat:
            raise ConfigError("chat: needs a text prompt, not token ids")
        prompt_ids = [int(i) for i in prompt]
    if not prompt_ids:
        raise ConfigError("prompt: it encodes to no tokens")
    decoder = CachedDecoder(folder.model, folder=folder.folder, providers=providers)
    if decoder.vocab_size is not None and max(prompt_ids) >= decoder.vocab_size:
        raise ConfigError(f"prompt: token id {max(prompt_ids)} is outside the model's vocabulary of "
                          f"{decoder.vocab_size}")
    context = _context_length(folder, decoder.max_positions)
    if context is not None and len(prompt_ids) >= context:
        raise ConfigError(f"prompt: {len(prompt_ids)} tokens leave no room in the model's context of {context}")
    budget = max_new_tokens if context is None else min(max_new_tokens, context - len(prompt_ids))
    stops = eos_ids(folder) if stop_at_eos else set()
    text = _TextStream(tok, stream)

    start = time.perf_counter()
    logits = decoder.forward(prompt_ids)
    token = sampler(logits)
    first = time.perf_counter()
    text.push(token)
    reason = "eos" if token in stops else ""
    while not reason and len(text.ids) < budget:
        token = sampler(decoder.forward([token]))
        text.push(token)
        reason = "eos" if token in stops else ""
    end = time.perf_counter()
    if not reason:
        reason = "max_new_tokens" if len(text.ids) >= max_new_tokens else "context"
    decoded = text.finish()
    steps = len(text.ids) - 1
    return GenerationResult(text=decoded, prompt_ids=prompt_ids, token_ids=list(text.ids), stop_reason=reason,
                            first_token_s=first - start,
                            prefill_tokens_per_s=len(prompt_ids) / max(first - start, 1e-9),
                            decode_tokens_per_s=steps / (end - first) if steps and end > first else 0.0,
                            cached=decoder.has_cache)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``onnx-gptq generate`` arguments to `parser`."""
    parser.add_argument("model", help="an .onnx model or a model folder (ours, onnxruntime-genai's, Optimum's)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json, tokenizer folder or .gguf "
                                                          "(default: the model folder's)")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="onnxruntime execution providers, comma separated (default CPU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming text")


def run(args: argparse.Namespace) -> int:
    """Run ``onnx-gptq generate`` with parsed `args`: text to stdout, timings to stderr; returns the exit code."""
    from onnx_gptq.runtime.sessions import check_providers

    providers = [str(p) for p in check_providers(p.strip() for p in args.providers.split(",") if p.strip())]

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer,
                      chat=args.chat, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, providers=providers,
                      stream=None if args.json else write)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print()
    print(result.summary(), file=sys.stderr)
    return 0


__all__ = ["GenerationResult", "chat_prompt", "configure_parser", "eos_ids", "generate", "run"]
