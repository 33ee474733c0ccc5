"""Tiny GPT-2-style (Gemm) and Llama-style (MatMul) causal LMs, exported in the tests.

Built from transformers configs with random weights (no downloads), exported
with torch.onnx's dynamo and TorchScript exporters, so the graphs have the
shapes real exports have: tied output heads seen through Transpose, Gemm with
and without bias, module names in node metadata.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

VOCAB = 256
HIDDEN = 64


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask -> logits, without the KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def build_llama(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def build_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                       n_positions=256)).eval()
    with torch.no_grad():  # non-zero biases, so the exported Gemm keeps them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model


def export(model: torch.nn.Module, path: Path, *, dynamo: bool) -> Path:
    """Export `model` to `path` with dynamic batch and sequence axes."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    wrapped = LogitsOnly(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: "batch", 1: "sequence"}
            torch.onnx.export(wrapped, (ids, mask), str(path), dynamo=True, opset_version=18,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                              verbose=False)
        else:
            axes = {0: "batch", 1: "sequence"}
            torch.onnx.export(wrapped, (ids, mask), str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes})
    return path
