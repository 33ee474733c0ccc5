"""Text cut as samples (special tokens, truncation) or windows (BOS), chosen by model kind;
padded batches keep padding out of the Hessians (issue 12, items 1 and 2)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.calibrate import collect_hessians, make_batches
from onnx_gptq.calibrate.model_kind import ModelKind, choose_split, kind_from_config, kind_from_graph
from onnx_gptq.config import CalibConfig, CalibSplit
from onnx_gptq.errors import ConfigError
from onnx_gptq.tools.tokenizer import load_tokenizer
from tests import tiny_models

PAD, UNK, CLS, SEP = 0, 1, 2, 3
SENTENCES = ["the cat runs", "a dog sleeps quickly in the house", "water flows",
             "the bird sings a song of light and fire on the river by the city road",
             "this book is not that book", "fish", "the tree grows slowly and the river flows quickly to the city"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model.onnx with its config.json, tokenizer.json) of a tiny random BertModel."""
    folder = tmp_path_factory.mktemp("bert")
    model = tiny_models.export_bert(tiny_models.build_bert(), folder / "model.onnx")
    return model, tiny_models.wordpiece_tokenizer(tmp_path_factory.mktemp("bert_tok") / "tokenizer.json")


def _word_ids(sentence: str) -> list[int]:
    return [5 + tiny_models.ENCODER_WORDS.index(w) for w in sentence.split()]


def test_encoder_text_is_cut_by_sample_with_cls_and_sep(encoder: tuple[Path, Path], tmp_path: Path) -> None:
    model, tok = encoder
    proto = onnx.load(model, load_external_data=False)
    assert choose_split(None, proto, model.parent) == (CalibSplit.SAMPLES, "model kind encoder (from config.json)")
    assert choose_split(None, proto, None) == (CalibSplit.SAMPLES, "model kind encoder (from graph)")
    config = CalibConfig(num_samples=len(SENTENCES), seq_len=10, batch_size=1)
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")  # no blank line: one sample per line
    rows = [b["input_ids"][0].tolist() for b in make_batches(path, proto, config, tokenizer=tok,
                                                             model_dir=model.parent)]
    expected = [[CLS, *_word_ids(s)[:8], SEP] for s in SENTENCES]  # truncated to 10 with both specials kept
    assert rows == expected
    # Paragraphs (blank-line separated, wrapped lines inside) are one sample each; lists and datasets per string.
    path.write_text("the cat\nruns\n\n\nwater flows\n", encoding="utf-8")
    rows = [b["input_ids"][0].tolist() for b in make_batches(path, proto, config, tokenizer=tok)]
    assert rows == [[CLS, *_word_ids("the cat runs"), SEP], [CLS, *_word_ids("water flows"), SEP]]
    import datasets

    for source in (SENTENCES[:3], datasets.Dataset.from_dict({"text": SENTENCES[:3]})):
        rows = [b["input_ids"][0].tolist() for b in make_batches(source, proto, config, tokenizer=tok)]
        assert rows == [[CLS, *_word_ids(s)[:8], SEP] for s in SENTENCES[:3]]


def test_more_samples_than_asked_are_a_seeded_choice_in_order(encoder: tuple[Path, Path]) -> None:
    model, tok = encoder
    proto = onnx.load(model, load_external_data=False)
    texts = [" ".join(tiny_models.ENCODER_WORDS[i:i + 3]) for i in range(40)]
    pick = lambda seed: [b["input_ids"][0, 1].item() for b in make_batches(  # noqa: E731
        texts, proto, CalibConfig(num_samples=5, seq_len=8, batch_size=1, seed=seed), tokenizer=tok)]
    first = pick(0)
    assert len(first) == 5 and first == sorted(first) and pick(0) == first and pick(1) != first


def test_windows_forced_on_an_encoder_start_with_its_bos(encoder: tuple[Path, Path]) -> None:
    model, tok = encoder
    proto = onnx.load(model, load_external_data=False)
    config = CalibConfig(num_samples=4, seq_len=6, batch_size=4, split="windows")
    (batch,) = make_batches(SENTENCES, proto, config, tokenizer=tok)
    assert batch["input_ids"].shape == (4, 6)
    assert (batch["input_ids"][:, 0] == CLS).all() and not np.isin(batch["input_ids"][:, 1:], [CLS, SEP]).any()
    assert batch["attention_mask"].all()


def test_causal_lm_keeps_windows_and_samples_can_be_asked_for(tiny_llama_onnx: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    proto = onnx.load(tiny_llama_onnx, load_external_data=False)
    assert kind_from_graph(proto) is ModelKind.CAUSAL_LM  # logits out, no token_type_ids
    vocab = {"<s>": 0, "<unk>": 1} | {f"w{i}": i + 2 for i in range(200)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    text = [" ".join(f"w{(7 * i + j) % 200}" for j in range(30)) for i in range(5)]
    config = CalibConfig(num_samples=3, seq_len=12, batch_size=3)
    # A loaded tokenizers.Tokenizer is wrapped like a tokenizer.json: windows start with its BOS <s>.
    (batch,) = make_batches(text, proto, config, tokenizer=raw)
    assert (batch["input_ids"][:, 0] == 0).all() and (batch["input_ids"][:, 1:] >= 2).all()
    samples = make_batches(text, proto, CalibConfig(num_samples=3, seq_len=40, batch_size=3, split="samples"),
                           tokenizer=raw)
    assert [b["input_ids"].shape for b in samples] == [(3, 31)]  # <s> + 30 words each
    assert (samples[0]["input_ids"][:, 0] == 0).all()
    with pytest.raises(ConfigError, match="calib_split: 'rows' is not one of windows, samples"):
        CalibConfig(split="rows")
    assert CalibConfig(split="auto").split is None and CalibConfig(split="SAMPLES").split is CalibSplit.SAMPLES


def test_kind_from_config_json(tmp_path: Path) -> None:
    def kind(config: object) -> ModelKind:
        (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return kind_from_config(tmp_path)

    assert kind({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) is ModelKind.CAUSAL_LM
    assert kind({"architectures": ["BertModel"]}) is ModelKind.ENCODER
    assert kind({"model_type": "xlm-roberta"}) is ModelKind.ENCODER
    assert kind({"model_type": "bert", "is_decoder": True}) is ModelKind.CAUSAL_LM
    assert kind({"model_type": "t5"}) is ModelKind.UNKNOWN
    (tmp_path / "config.json").write_text("{oops", encoding="utf-8")
    assert kind_from_config(tmp_path) is ModelKind.UNKNOWN
    assert kind_from_config(None) is ModelKind.UNKNOWN


# ---------------------------------------------------------------------------
# Padding


def _integer_model() -> onnx.ModelProto:
    """input_ids, attention_mask -> Gather of an integer-valued table, so every X^T X in
    float32 is exact, tapped four ways: [B, S, K] ("emb"), flattened [B*S, K] ("flat"),
    one row per sample ("first", position 0), and two rows per token ("heads")."""
    table = np.random.default_rng(0).integers(-3, 4, size=(20, 4)).astype(np.float32)
    table[PAD] = 5.0  # a pad token's row would change X^T X a lot if it got in
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0),
        helper.make_node("Reshape", ["emb", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["emb", "zero"], ["first"], axis=1),
        helper.make_node("Reshape", ["emb", "head_shape"], ["heads"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_f"], ["out"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([-1, 4], np.int64), "flat_shape"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0, 0, 2, 2], np.int64), "head_shape")]
    graph = helper.make_graph(nodes, "ints", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_padded_batches_give_the_hessians_of_one_by_one_calibration(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    model = _integer_model()
    rows = [np.array(r, np.int64) for r in ([4, 5, 6], [7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17])]
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"input_ids": r.tolist()}) for r in rows), encoding="utf-8")
    names = ["emb", "flat", "first", "heads"]
    one_by_one = collect_hessians(model, names, make_batches(ids, model, CalibConfig(num_samples=4, batch_size=1)))
    padded_batches = make_batches(ids, model, CalibConfig(num_samples=4, batch_size=3))
    assert [b["input_ids"].shape for b in padded_batches] == [(3, 6), (1, 4)]
    with caplog.at_level(logging.INFO, logger="onnx_gptq.calibrate.run"):
        padded = collect_hessians(model, names, padded_batches)
    tokens = sum(r.size for r in rows)
    assert padded["emb"].rows == padded["flat"].rows == one_by_one["emb"].rows == tokens
    for name in ("emb", "flat", "first"):
        np.testing.assert_array_equal(padded[name].xtx, one_by_one[name].xtx)  # exact: integer sums
        assert padded[name].rows == one_by_one[name].rows
    # One row per sample: no row is padding, all are kept (and the log names it).
    assert padded["first"].rows == 4
    assert "activation 'first' do not map to (batch, sequence)" in caplog.text
    # Rows per head do not map to tokens either: all rows of the padded batch, padding included.
    assert padded["heads"].rows == 2 * (3 * 6 + 4)
    assert "activation 'heads'" in caplog.text and "activation 'emb'" not in caplog.text
    # The same batches without the mask: padding enters (what the masked taps prevent).
    naive = collect_hessians(model, ["emb"], padded_batches, token_masks=[None, None])
    assert naive["emb"].rows == 3 * 6 + 4
    assert np.abs(naive["emb"].xtx - one_by_one["emb"].xtx).max() > 100


def test_encoder_padded_calibration_matches_one_by_one(encoder: tuple[Path, Path]) -> None:
    """A real BERT export: every MatMul input's Hessian from padded batches of 4 equals the
    one from unpadded samples run alone (float32 activations: to float32 rounding)."""
    model, tok = encoder
    proto = onnx.load(model, load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    names = sorted({n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    assert len(names) >= 8
    config = CalibConfig(num_samples=len(SENTENCES), seq_len=16, batch_size=4)
    padded_batches = make_batches(SENTENCES, proto, config, tokenizer=tok, model_dir=model.parent)
    assert not all(b["attention_mask"].all() for b in padded_batches)
    alone = make_batches(SENTENCES, proto, CalibConfig(num_samples=len(SENTENCES), seq_len=16, batch_size=1),
                         tokenizer=tok)
    padded = collect_hessians(proto, names, padded_batches, model_dir=model.parent)
    reference = collect_hessians(proto, names, alone, model_dir=model.parent)
    naive = collect_hessians(proto, names[:1], padded_batches, model_dir=model.parent,
                             token_masks=[None] * len(padded_batches))
    tokens = sum(min(len(s.split()) + 2, 16) for s in SENTENCES)
    for name in names:
        assert padded[name].rows == reference[name].rows == tokens
        scale = np.abs(reference[name].xtx).max()
        np.testing.assert_allclose(padded[name].xtx, reference[name].xtx, rtol=0, atol=2e-6 * scale)
    assert np.abs(naive[names[0]].xtx - reference[names[0]].xtx).max() > 1e-2 * np.abs(reference[names[0]].xtx).max()


def test_quantize_an_encoder_from_text_reports_the_split(encoder: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from onnx_gptq import cli

    model, tok = encoder
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES * 3), encoding="utf-8")
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code = cli.main([str(model), "--calib", str(calib), "--tokenizer", str(tok), "-o", str(out), "--bits", "4",
                     "--group-size", "32", "--num-samples", "8", "--seq-len", "16", "--batch-size", "4",
                     "--report", str(report)])
    assert code == 0
    assert "calibration text split: samples (model kind encoder (from config.json))" in capsys.readouterr().out
    calib_report = json.loads(report.read_text())["calib"]
    assert calib_report["split"] == "samples" and "encoder" in calib_report["split_reason"]
    import onnxruntime as ort

    feeds = make_batches(SENTENCES[:2], onnx.load(model), CalibConfig(num_samples=2, seq_len=16, batch_size=2),
                         tokenizer=tok)[0]
    ref = ort.InferenceSession(str(model)).run(None, feeds)[0]
    got = ort.InferenceSession(str(out)).run(None, feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos[real].min() > 0.95
    assert cli.main([str(model), "--calib", str(calib), "--tokenizer", str(tok), "-o", str(tmp_path / "x.onnx"),
                     "--calib-split", "rows", "-q"]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_load_tokenizer_special_tokens(encoder: tuple[Path, Path]) -> None:
    tok = load_tokenizer(encoder[1])
    assert tok.special_tokens == ((CLS,), (SEP,)) and tok.bos_token_id == CLS and tok.pad_token_id == PAD
    assert tok.encode("the cat") == _word_ids("the cat")
    assert tok.encode_sample("the cat runs", 4) == [CLS, *_word_ids("the cat"), SEP]
    assert tok.encode_sample("the cat runs", 1) == [CLS]


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
def test_every_layer_counts_only_real_tokens(encoder: tuple[Path, Path], tmp_path: Path, sequential: bool) -> None:
    """Through the pass, one-pass and sequential (whose stages do not read the mask): every
    quantized layer's Hessian saw exactly the real tokens of the padded batches."""
    import onnx_gptq
    from onnx_gptq.config import QuantConfig

    model, tok = encoder
    calib = CalibConfig(num_samples=len(SENTENCES), seq_len=16, batch_size=4, sequential=sequential)
    _, report = onnx_gptq.quantize_with_report(model, SENTENCES, QuantConfig(group_size=32), calib=calib,
                                               tokenizer=tok, output=tmp_path / "q.onnx", device="cpu")
    tokens = sum(min(len(s.split()) + 2, 16) for s in SENTENCES)
    assert len(report.layers) >= 8
    assert {row.calibration_rows for row in report.layers} == {tokens}


@pytest.mark.slow
def test_real_minilm_padded_samples(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (PyPI), exported here: padded sample batches give the one-by-one Hessians,
    and W4 g32 GPTQ calibrated on them keeps the mean-pooled sentence embeddings close."""
    import onnxruntime as ort
    from transformers import BertModel

    import onnx_gptq
    from devtools import assets
    from onnx_gptq.config import QuantConfig

    folder = assets.minilm_folder()
    model = tiny_models.export_bert(BertModel.from_pretrained(str(folder)).eval(), tmp_path / "model.onnx")
    tok = folder / "tokenizer.json"
    calib_text, eval_text = assets.sotu_split()
    proto = onnx.load(model, load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    names = sorted({n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights})[:6]
    # One sentence per sample (the addresses' paragraphs are whole speeches); held-out sentences from 2000 on.
    sentences = lambda text: [s for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 40]  # noqa: E731
    paragraphs = sentences(calib_text)[:8]
    padded = collect_hessians(proto, names, make_batches(paragraphs, proto, CalibConfig(num_samples=8, seq_len=64,
                                                                                       batch_size=4), tokenizer=tok))
    alone = collect_hessians(proto, names, make_batches(paragraphs, proto, CalibConfig(num_samples=8, seq_len=64,
                                                                                      batch_size=1), tokenizer=tok))
    for name in names:
        assert padded[name].rows == alone[name].rows
        scale = np.abs(alone[name].xtx).max()
        np.testing.assert_allclose(padded[name].xtx, alone[name].xtx, rtol=0, atol=1e-5 * scale)
    assert padded[names[0]].rows < 8 * 64  # the sentences were of unequal length: some were padded
    out, report = onnx_gptq.quantize_with_report(
        model, sentences(calib_text), QuantConfig(bits=4, group_size=32), tokenizer=tok, output=tmp_path / "q.onnx",
        calib=CalibConfig(num_samples=32, seq_len=128, batch_size=8), device="cpu")
    assert report.calib["split"] == "samples"
    feeds = make_batches(sentences(eval_text)[:64], proto, CalibConfig(num_samples=64, seq_len=128, batch_size=64),
                         tokenizer=tok)[0]

    def embed(path: Path) -> np.ndarray:
        hidden = ort.InferenceSession(str(path)).run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

    # A sanity bound: whether GPTQ beats round-to-nearest here depends on damping (issue 12, items 3-4).
    cosine = (embed(model) * embed(Path(out))).sum(-1)
    assert cosine.mean() > 0.8, cosine


def test_a_tokenizer_json_that_pads_and_truncates_is_used_without_either(tmp_path: Path) -> None:
    """sentence-transformers' tokenizer.json pads and truncates every encoding to a fixed length:
    neither may reach calibration (samples would all be that long, the window stream cut short)."""
    from tokenizers import Tokenizer

    path = tiny_models.wordpiece_tokenizer(tmp_path / "tokenizer.json")
    raw = Tokenizer.from_file(str(path))
    raw.enable_padding(pad_id=PAD, pad_token="[PAD]", length=12)
    raw.enable_truncation(max_length=12)
    raw.save(str(path))
    tok = load_tokenizer(path)
    long_text = " ".join(["the cat runs"] * 10)
    assert tok.encode("the cat") == _word_ids("the cat")
    assert len(tok.encode(long_text)) == 30
    assert tok.encode_sample("the cat", 64) == [CLS, *_word_ids("the cat"), SEP] and tok.pad_token_id == PAD
