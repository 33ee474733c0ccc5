"""make_batches: every source kind, derived model inputs, and every error case."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gptq.calibrate import ModelInputs, make_batches
from onnx_gptq.calibrate import collect_hessians
from onnx_gptq.config import CalibConfig
from onnx_gptq.errors import CalibrationError

VOCAB, HIDDEN = 40, 8
WORDS = [f"w{i}" for i in range(VOCAB - 1)]  # token id i + 1; id 0 is [UNK]


def _lm(*, ids_dims: tuple = ("batch", "sequence"), ids_type: int = TensorProto.INT64, past: bool = True,
        extra: list[onnx.ValueInfoProto] | None = None, gather: bool = True, mask: bool = True) -> onnx.ModelProto:
    """input_ids -> Gather(embedding) -> "emb" -> MatMul -> logits, plus the usual side inputs."""
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    head = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    inputs = [
        helper.make_tensor_value_info("input_ids", ids_type, list(ids_dims)),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    if not mask:
        inputs = [i for i in inputs if i.name != "attention_mask"]
    if past:
        inputs += [
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                          ["batch_size", 2, "past_sequence_length", 4]),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT16, [None, 2, "s7", 4]),
        ]
    inputs += extra or []
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64)]
    if gather:
        nodes.append(helper.make_node("Gather", ["E", "ids64"], ["emb"], axis=0))
    else:  # one-hot embedding: no Gather, vocabulary only visible on the logits
        nodes += [helper.make_node("OneHot", ["ids64", "depth", "onoff"], ["onehot"], axis=-1),
                  helper.make_node("MatMul", ["onehot", "E"], ["emb"])]
    nodes.append(helper.make_node("MatMul", ["emb", "H"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    if past:  # present = Concat(past, this step's key/value) along the sequence axis
        nodes += [helper.make_node("Reshape", ["emb", "heads"], ["emb4"]),
                  helper.make_node("Transpose", ["emb4"], ["key"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", ["past_key_values.0.key", "key"], ["present.0.key"], axis=2),
                  helper.make_node("Cast", ["key"], ["value16"], to=TensorProto.FLOAT16),
                  helper.make_node("Concat", ["past_key_values.0.value", "value16"], ["present.0.value"], axis=2)]
        outputs += [helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT16, None)]
    inits = [numpy_helper.from_array(embedding, "E"), numpy_helper.from_array(head, "H"),
             numpy_helper.from_array(np.array(VOCAB, np.int64), "depth"),
             numpy_helper.from_array(np.array([0, 1], np.float32), "onoff"),
             numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "heads")]
    graph = helper.make_graph(nodes, "lm", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class CharTokenizer:
    """Letters a..z -> ids 1..26 (no special tokens)."""

    vocab_size = 27

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 96 for c in text if "a" <= c <= "z"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _paragraphs(count: int = 6, words: int = 30, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words)) for _ in range(count)]


def _stream(paragraphs: list[str]) -> np.ndarray:
    return np.array([int(w[1:]) + 1 for p in paragraphs for w in p.split()], np.int64)


def _contains(stream: np.ndarray, window: np.ndarray) -> bool:
    n = window.size
    return any(np.array_equal(stream[s:s + n], window) for s in range(stream.size - n + 1))


CONFIG = CalibConfig(num_samples=5, seq_len=16, batch_size=2, seed=3)


def test_text_file_windows_come_from_the_text_and_inputs_are_filled(tmp_path: Path, tokenizer_json: Path) -> None:
    paragraphs = _paragraphs()
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    batches = make_batches(path, _lm(), CONFIG, tokenizer=tokenizer_json)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    stream = _stream(paragraphs)
    for batch in batches:
        ids = batch["input_ids"]
        assert ids.dtype == np.int64
        assert all(_contains(stream, row) for row in ids)
        b, t = ids.shape
        np.testing.assert_array_equal(batch["attention_mask"], np.ones((b, t), np.int64))
        np.testing.assert_array_equal(batch["position_ids"], np.tile(np.arange(t), (b, 1)))
        assert batch["past_key_values.0.key"].shape == (b, 2, 0, 4)
        assert batch["past_key_values.0.key"].dtype == np.float32
        assert batch["past_key_values.0.value"].shape == (b, 2, 0, 4)
        assert batch["past_key_values.0.value"].dtype == np.float16
    again = make_batches(path, _lm(), CONFIG, tokenizer=tokenizer_json)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other_seed = make_batches(path, _lm(), CalibConfig(num_samples=5, seq_len=16, batch_size=2, seed=4),
                              tokenizer=tokenizer_json)
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other_seed))


def test_every_text_source_gives_the_same_windows(tmp_path: Path, tokenizer_json: Path) -> None:
    import datasets

    paragraphs = _paragraphs()
    text_file = tmp_path / "calib.md"
    text_file.write_text("\n\n".join(paragraphs), encoding="utf-8")
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs) + "\n\n", encoding="utf-8")
    sources = [
        text_file,
        str(jsonl),
        iter(paragraphs),
        datasets.Dataset.from_dict({"text": paragraphs, "id": list(range(len(paragraphs)))}),
        datasets.Dataset.from_dict({"content": paragraphs, "id": list(range(len(paragraphs)))}),
        datasets.IterableDataset.from_generator(lambda: ({"body": p, "n": i} for i, p in enumerate(paragraphs))),
    ]
    results = [make_batches(s, _lm(), CONFIG, tokenizer=tokenizer_json) for s in sources]
    first = np.concatenate([b["input_ids"] for b in results[0]])
    for result in results[1:]:
        np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in result]), first)


def test_tokenizer_object_and_int32_ids() -> None:
    model = _lm(ids_type=TensorProto.INT32, past=False)
    text = ["abcdefghij" * 3, "klmnopqrst" * 3]
    batches = make_batches(text, model, CalibConfig(num_samples=3, seq_len=7, batch_size=3),
                           tokenizer=CharTokenizer())
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (3, 7)
    assert batches[0]["input_ids"].dtype == np.int32
    assert set(batches[0]) == {"input_ids", "attention_mask", "position_ids"}


def test_npy_rows_are_cut_and_taken_in_order(tmp_path: Path) -> None:
    ids = np.arange(6 * 20).reshape(6, 20) % VOCAB
    path = tmp_path / "ids.npy"
    np.save(path, ids.astype(np.int32))
    batches = make_batches(path, _lm(), CalibConfig(num_samples=4, seq_len=16, batch_size=3))
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), ids[:4, :16])
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]


def test_short_rows_are_padded_with_mask_zero_or_batched_by_length(tmp_path: Path) -> None:
    rows = [list(range(1, 11)), list(range(1, 31)), [], list(range(2, 12)), [5, 6, 7]]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows), encoding="utf-8")
    config = CalibConfig(num_samples=10, seq_len=16, batch_size=3)
    # The model takes a mask: padded at the end to the batch's longest row, mask 0 there.
    batches = make_batches(path, _lm(), config)
    assert [b["input_ids"].shape for b in batches] == [(3, 16), (1, 3)]
    first = batches[0]
    np.testing.assert_array_equal(first["attention_mask"].sum(axis=1), [10, 16, 10])
    assert first["attention_mask"].dtype == np.int64
    assert first["input_ids"][0].tolist() == rows[0] + [0] * 6
    assert first["input_ids"][2, :10].tolist() == rows[3]
    np.testing.assert_array_equal(batches[1]["attention_mask"], [[1, 1, 1]])
    np.testing.assert_array_equal(first["position_ids"], np.tile(np.arange(16), (3, 1)))
    # Without a mask input, only rows of equal length share a batch (padding would change the model's output).
    batches = make_batches(path, _lm(mask=False), config)
    got = [b["input_ids"].tolist() for b in batches]
    assert got == [[rows[0], rows[3]], [rows[1][:16]], [rows[4]]]


def test_id_stream_array_is_cut_into_windows() -> None:
    stream = np.arange(100) % VOCAB
    batches = make_batches(stream, _lm(past=False), CalibConfig(num_samples=4, seq_len=10, batch_size=4, seed=1))
    (batch,) = batches
    assert batch["input_ids"].shape == (4, 10)
    for row in batch["input_ids"]:
        assert _contains(stream, row)


def test_static_dims_clip_sequence_and_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _lm(ids_dims=(1, 8), past=False)
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": list(range(1, n + 1))}) for n in (12, 5, 9)), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="onnx_gptq.calibrate.batching"):
        batches = make_batches(path, _lm(ids_dims=(1, 8), past=False, mask=False),
                               CalibConfig(num_samples=8, seq_len=512, batch_size=4))
    assert [b["input_ids"].tolist() for b in batches] == [[list(range(1, 9))], [list(range(1, 9))]]
    assert "shorter than the model's fixed sequence length 8" in caplog.text
    # With a mask input, the short row is padded to the static length instead.
    batches = make_batches(path, model, CalibConfig(num_samples=8, seq_len=512, batch_size=4))
    assert [b["input_ids"].tolist() for b in batches] == [[list(range(1, 9))], [[1, 2, 3, 4, 5, 0, 0, 0]],
                                                          [list(range(1, 9))]]
    np.testing.assert_array_equal(batches[1]["attention_mask"], [[1, 1, 1, 1, 1, 0, 0, 0]])


def test_feed_dicts_used_as_given_with_defaults_filled() -> None:
    mask = np.array([[1, 1, 0]], np.int64)
    feeds = [{"input_ids": np.array([[1, 2, 3]]), "attention_mask": mask},
             {"input_ids": np.array([[4, 5], [6, 7]], np.int32)}]
    batches = make_batches(feeds, _lm(), CONFIG)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["attention_mask"], mask)
    assert batches[0]["input_ids"].dtype == np.int64 and batches[1]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(batches[1]["position_ids"], [[0, 1], [0, 1]])
    assert batches[1]["past_key_values.0.key"].shape == (2, 2, 0, 4)


def test_vocabulary_from_logits_without_gather(tmp_path: Path) -> None:
    model = _lm(gather=False, past=False)
    assert ModelInputs.from_model(model).vocab_size == VOCAB
    path = tmp_path / "ids.npy"
    np.save(path, np.full((2, 4), VOCAB, np.int64))
    with pytest.raises(CalibrationError, match=rf"ids.npy.*token id {VOCAB} is outside.*\[0, {VOCAB}\)"):
        make_batches(path, model, CONFIG)


def test_batches_run_through_onnxruntime() -> None:
    """End to end: derived inputs are accepted by onnxruntime; X^T X of the embedding output matches numpy."""
    model = _lm()
    batches = make_batches(np.arange(200) % VOCAB, model, CalibConfig(num_samples=6, seq_len=9, batch_size=4))
    stats = collect_hessians(model, ["emb", "present.0.key", "present.0.value"], batches)
    table = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    X = np.concatenate([table[b["input_ids"]].reshape(-1, HIDDEN) for b in batches])
    assert stats["emb"].rows == 6 * 9
    np.testing.assert_allclose(stats["emb"].xtx, X.T @ X, rtol=1e-5, atol=1e-4)
    # The empty past adds no rows: present holds exactly this step's 2 heads x 9 positions per sequence.
    heads = X.reshape(-1, 2, 4).reshape(-1, 4)
    assert stats["present.0.key"].rows == stats["present.0.value"].rows == 6 * 9 * 2
    np.testing.assert_allclose(stats["present.0.key"].xtx, heads.T @ heads, rtol=1e-5, atol=1e-4)
    half = heads.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(stats["present.0.value"].xtx, half.T @ half, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("writer, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
])
def test_unreadable_text_files(tmp_path: Path, writer, message: str) -> None:
    path = tmp_path / "calib.txt"
    writer(path)
    with pytest.raises(CalibrationError, match=f"calib.txt.*{message}"):
        make_batches(path, _lm(), CONFIG, tokenizer=CharTokenizer())


@pytest.mark.parametrize("content, message", [
    (b"not numpy", "not a readable .npy"),
    (np.zeros((2, 3), np.float32), "must be integers"),
    (np.zeros((2, 3, 4), np.int64), r"\[samples, tokens\]"),
    (np.zeros((0, 16), np.int64), "no usable rows"),
    (np.full((2, 16), -1, np.int64), "token id -1 is outside"),
    (np.full((2, 16), VOCAB + 5, np.int64), f"token id {VOCAB + 5} is outside"),
])
def test_bad_npy_files(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "ids.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(CalibrationError, match=f"ids.npy.*{message}"):
        make_batches(path, _lm(), CONFIG)


@pytest.mark.parametrize("lines, message", [
    (['{"input_ids": [1, 2]}', "{oops"], "line 2: not valid JSON"),
    (['{"tokens": [1, 2]}'], 'line 1: expected {"input_ids"'),
    (['{"input_ids": [1, "2"]}'], "line 1: input_ids must be a list of integers"),
    (['{"input_ids": [1, 2]}', '{"text": "abc"}'], "mixes text lines and input_ids lines"),
    ([""], "is empty"),
])
def test_bad_jsonl_files(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(CalibrationError, match=f"data.jsonl.*{message}"):
        make_batches(path, _lm(), CONFIG, tokenizer=CharTokenizer())


def test_text_errors(tmp_path: Path, tokenizer_json: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("w1 w2 w3", encoding="utf-8")
    with pytest.raises(CalibrationError, match="calib.txt' is text and needs a tokenizer"):
        make_batches(path, _lm(), CONFIG)
    with pytest.raises(CalibrationError, match=r"calib.txt' is too short: 3 tokens.*16"):
        make_batches(path, _lm(), CONFIG, tokenizer=tokenizer_json)
    path.write_text(" \n\n ", encoding="utf-8")
    with pytest.raises(CalibrationError, match="calib.txt' is empty"):
        make_batches(path, _lm(), CONFIG, tokenizer=tokenizer_json)
    with pytest.raises(CalibrationError, match="outside the model's vocabulary"):
        make_batches(["z" * 40], _lm(), CONFIG, tokenizer=type("Big", (), {"encode": lambda s, t: [VOCAB] * 40})())


def test_source_shape_errors() -> None:
    import datasets

    with pytest.raises(CalibrationError, match="iterable is empty"):
        make_batches([], _lm(), CONFIG)
    with pytest.raises(CalibrationError, match="only strings or only dicts"):
        make_batches(["abc", 3], _lm(), CONFIG, tokenizer=CharTokenizer())
    with pytest.raises(CalibrationError, match="unsupported source of type int"):
        make_batches(7, _lm(), CONFIG)
    with pytest.raises(CalibrationError, match="single dict"):
        make_batches({"input_ids": np.zeros((1, 4), np.int64)}, _lm(), CONFIG)
    with pytest.raises(CalibrationError, match="no 'text' column and 2 string columns"):
        make_batches(datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}), _lm(), CONFIG)
    with pytest.raises(CalibrationError, match=r"DatasetDict with splits \['train'\]"):
        make_batches(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}), _lm(), CONFIG)
    with pytest.raises(CalibrationError, match=r"calibration feeds\[0\]: 'pixels' is not an input"):
        make_batches([{"input_ids": np.zeros((1, 4), np.int64), "pixels": np.zeros(3)}], _lm(), CONFIG)
    with pytest.raises(CalibrationError, match=r"calibration feeds\[0\]: token id 99"):
        make_batches([{"input_ids": np.full((1, 4), 99, np.int64)}], _lm(), CONFIG)


def test_inputs_that_cannot_be_filled_are_named() -> None:
    pixels = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
    with pytest.raises(CalibrationError, match="model input 'pixel_values'.*cannot be filled"):
        make_batches(np.arange(50) % VOCAB, _lm(extra=[pixels]), CONFIG)
    odd_past = helper.make_tensor_value_info("past_state", TensorProto.FLOAT, [None, None, 4])
    with pytest.raises(CalibrationError, match="'past_state'.*dimension 0"):
        make_batches(np.arange(50) % VOCAB, _lm(extra=[odd_past]), CONFIG)
    # Given explicitly in feed dicts, such an input is fine.
    feeds = [{"input_ids": np.ones((1, 4), np.int64), "pixel_values": np.zeros((1, 3, 8, 8), np.float32)}]
    (batch,) = make_batches(feeds, _lm(extra=[pixels]), CONFIG)
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    no_ids = helper.make_graph([], "g", [pixels], [pixels])
    with pytest.raises(CalibrationError, match="no 'input_ids' input"):
        make_batches(np.arange(50), helper.make_model(no_ids), CONFIG)


def _bert_like(max_positions: int) -> onnx.ModelProto:
    """Word + learned position (via Range) + token-type embeddings, summed."""
    rng = np.random.default_rng(0)
    tables = {"E": (VOCAB, HIDDEN), "P": (max_positions, HIDDEN), "TT": (2, HIDDEN)}
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["word"]),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["positions"]),
        helper.make_node("Gather", ["P", "positions"], ["pos"]),
        helper.make_node("Gather", ["TT", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["word", "pos"], ["wp"]),
        helper.make_node("Add", ["wp", "types"], ["hidden"]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in tables.items()]
    inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")]
    graph = helper.make_graph(nodes, "bert", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]),
    ], [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_position_table_clips_sequence_length() -> None:
    model = _bert_like(max_positions=12)
    inputs = ModelInputs.from_model(model)
    assert (inputs.vocab_size, inputs.max_positions) == (VOCAB, 12)  # not the 2-row token-type table
    batches = make_batches(np.arange(300) % VOCAB, model, CalibConfig(num_samples=3, seq_len=64, batch_size=3))
    assert batches[0]["input_ids"].shape == (3, 12)
    np.testing.assert_array_equal(batches[0]["token_type_ids"], np.zeros((3, 12), np.int64))
    stats = collect_hessians(model, ["hidden"], batches)  # 64 positions would index past the table
    assert stats["hidden"].rows == 36
    assert ModelInputs.from_model(_lm()).max_positions is None


def test_tiny_gpt2_export(tiny_gpt2_onnx: Path) -> None:
    """Real exports: vocabulary and the 256-row position table are found; Gemm inputs calibrate."""
    proto = onnx.load(tiny_gpt2_onnx, load_external_data=False)
    inputs = ModelInputs.from_model(proto)
    assert (inputs.vocab_size, inputs.max_positions) == (256, 256)
    batches = make_batches(np.arange(3000) % 256, proto, CalibConfig(num_samples=2, seq_len=300, batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 256)]
    np.testing.assert_array_equal(batches[0]["attention_mask"], np.ones((2, 256), np.int64))
    weights = {t.name for t in proto.graph.initializer}
    names = sorted({n.input[0] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights})
    stats = collect_hessians(proto, names, batches, model_dir=tiny_gpt2_onnx.parent)
    assert names and all(s.rows == 2 * 256 for s in stats.values())
    with pytest.raises(CalibrationError, match="token id 256 is outside"):
        make_batches(np.full((1, 8), 256), proto, CONFIG)
