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


def build_chatty_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose greedy continuations vary (weights 15x the default spread; the default
    model repeats one token), for generation tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
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


# ---------------------------------------------------------------------------
# A sentence encoder: BertModel (input_ids, attention_mask, token_type_ids -> last_hidden_state)

ENCODER_WORDS = ("the a of to and in is was it for on with as at by from this that be are or an not "
                 "cat dog bird fish tree river house city road car book song music light water fire "
                 "runs sleeps sings reads falls grows flows burns opens closes quickly slowly").split()


class LastHidden(torch.nn.Module):
    """A BertModel giving only last_hidden_state, as sentence-encoder exports do."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def wordpiece_tokenizer(path: Path) -> Path:
    """A WordPiece tokenizer.json over ENCODER_WORDS with BERT's [PAD]/[UNK]/[CLS]/[SEP]/[MASK]
    and its [CLS] ... [SEP] post-processor, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + list(ENCODER_WORDS))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    tok.save(str(path))
    return path


def build_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(ENCODER_WORDS), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                        type_vocab_size=2, attn_implementation="eager")
    return BertModel(config, add_pooling_layer=False).eval()


def export_bert(model: torch.nn.Module, path: Path) -> Path:
    """Export a BertModel with TorchScript (dynamic batch and sequence axes), with its config.json
    beside it, as a transformers model folder converted to ONNX has."""
    ids = torch.randint(5, 5 + len(ENCODER_WORDS), (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), (ids, mask, torch.zeros_like(ids)), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "last_hidden_state": axes})
    model.config.to_json_file(str(path.parent / "config.json"))
    return path


#: The chat template of `save_chatty_tokenizer`: each turn's text after "<s>", then "t7" to prompt the answer.
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}t7{% endif %}")


def save_chatty_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary ("<pad>", "<s>", "</s>", then "t3" ... "t255"),
    with a chat template, saved as a transformers tokenizer (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
