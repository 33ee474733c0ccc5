"""Sentence-encoder fidelity of RTN and GPTQ: all-MiniLM-L6-v2, calibrated on one domain, scored on another.

The encoder (devtools.assets.minilm_folder) is exported once with torch.onnx
into a folder with its config.json and tokenizer.json (so onnx-gptq sees an
encoder and cuts calibration text into samples with [CLS]/[SEP]). Each row is
quantized through onnx-gptq's Python API and run through onnxruntime on
held-out sentences of another domain: the Python 3.11 tutorial's prose
(devtools.text_assets). Embeddings are mean-pooled over the attention mask, as
sentence-transformers does for this model. Printed per row:

* cos: mean cosine between each sentence's quantized and fp32 embedding;
* top1: fraction of sentences whose quantized embedding is closest (cosine)
  to its own fp32 embedding among all fp32 embeddings (self-retrieval; it
  saturates at 1.0 for W4, kept for continuity with the recorded tables);
* nn1: neighbour agreement, what a search index built AND queried with the
  quantized model sees: fraction of sentences whose nearest other sentence
  (itself excluded) is the one fp32 picks;
* r10: recall@10, the mean share of fp32's 10 nearest other sentences that the
  quantized model's 10 nearest contain.

Rows are METHOD:gGROUP[:dDAMP][:seq] (METHOD rtn or gptq; seq: sequential
calibration, else one pass), e.g.

    python bench/bench_encoder.py austen 128 "rtn:g32,gptq:g32,gptq:g32:d0.1,rtn:g128,gptq:g128,gptq:g128:seq"

The first argument names the calibration text: austen (the six novels'
paragraphs) or sotu (State of the Union addresses before 2000); the second the
number of calibration samples (seq_len 128). The one-pass GPTQ rows share one set
of Hessians (devtools.hessian_memo): quant times after the first are solve times.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import assets, text_assets  # noqa: E402
from devtools.hessian_memo import reuse_hessians  # noqa: E402
from onnx_gptq.config import CalibConfig, QuantConfig  # noqa: E402
from onnx_gptq.pipeline import quantize_with_report  # noqa: E402

logger = logging.getLogger("bench_encoder")
SEQ_LEN = 128


def export_encoder(work: Path) -> Path:
    """all-MiniLM-L6-v2 as ``work/minilm-onnx/model.onnx`` (+ config.json, tokenizer.json), made once."""
    folder = work / "minilm-onnx"
    onnx_path = folder / "model.onnx"
    if onnx_path.is_file():
        return onnx_path
    from transformers import BertModel

    from tests.tiny_models import export_bert  # the tests' BERT export (TorchScript, dynamic axes)

    source = assets.minilm_folder()
    folder.mkdir(parents=True, exist_ok=True)
    export_bert(BertModel.from_pretrained(str(source)).eval(), onnx_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return onnx_path


def calibration_file(domain: str, work: Path) -> Path:
    """The calibration text of `domain`: paragraphs separated by blank lines."""
    if domain == "austen":
        return text_assets.austen_text_file()
    if domain == "sotu":
        return assets.sotu_split_files()[0]
    raise SystemExit(f"calibration domain {domain!r}: choose austen or sotu")


def embed(model: Path, tokenizer_json: Path, sentences: list[str], batch: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings [sentences, hidden] from onnxruntime."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(SEQ_LEN)
    tok.enable_padding(pad_id=0)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(sentences), batch):
        encoded = tok.encode_batch(sentences[start:start + batch])
        ids = np.array([e.ids for e in encoded], np.int64)
        mask = np.array([e.attention_mask for e in encoded], np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def fidelity(quantized: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean cosine to the reference row, retrieval top-1 of each row's own reference)."""
    cos = float(np.mean(np.sum(quantized * reference, axis=1)))
    top1 = float(np.mean(np.argmax(quantized @ reference.T, axis=1) == np.arange(len(reference))))
    return cos, top1


def _neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices [rows, k] of each row's k most cosine-similar other rows, nearest first (itself excluded)."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def neighbour_agreement(quantized: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of rows whose nearest other row under `quantized` is the one under `reference`.

    Args:
        quantized: L2-normalised embeddings [rows, hidden] of the quantized model (index and query).
        reference: the fp32 model's embeddings of the same rows.

    Returns:
        The agreement in [0, 1].
    """
    return float(np.mean(_neighbours(quantized, 1)[:, 0] == _neighbours(reference, 1)[:, 0]))


def recall_at_k(quantized: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean share of the reference's k nearest other rows found among the quantized k nearest.

    Args:
        quantized: L2-normalised embeddings [rows, hidden] of the quantized model.
        reference: the fp32 model's embeddings of the same rows.
        k: neighbours compared per row (fewer than rows).

    Returns:
        The recall in [0, 1].
    """
    ours, theirs = _neighbours(quantized, k), _neighbours(reference, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("domain", help="calibration text: austen or sotu")
    parser.add_argument("num_samples", type=int)
    parser.add_argument("rows", help="comma-separated METHOD:gGROUP[:dDAMP] rows")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--accuracy-level", type=int, default=0,
                        help="0 (default): fp32 activations, so rows differ by their weights only")
    parser.add_argument("--json", type=Path, help="append the rows as JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = assets.cache_root() / "encoder"
    reference = export_encoder(work)
    tokenizer_json = reference.parent / "tokenizer.json"
    calib = calibration_file(args.domain, work)
    sentences = text_assets.python_doc_sentences()
    fp32 = embed(reference, tokenizer_json, sentences)
    print(f"held-out: {len(sentences)} Python-tutorial sentences; calibration: {args.domain}, "
          f"{args.num_samples} samples x <= {SEQ_LEN} tokens; W{args.bits}, accuracy_level {args.accuracy_level}")
    print(f"{'fp32':18s} cos 1.00000 top1 {fidelity(fp32, fp32)[1]:.4f} nn1 1.0000 r10 1.0000", flush=True)
    with reuse_hessians():  # GPTQ rows after the first solve on its Hessians
        for row in args.rows.split(","):
            method, group, *rest = row.split(":")
            damps = ["auto" if r == "dauto" else float(r[1:]) for r in rest if r.startswith("d")]
            damp = damps[0] if damps else QuantConfig().damp
            sequential = "seq" in rest
            config = QuantConfig(bits=args.bits, group_size=int(group[1:]), algo=method, damp=damp,
                                 accuracy_level=args.accuracy_level, head_bits=None,
                                 embedding_bits=None)  # the body only, as recorded
            out = work / f"q_{args.domain}_{args.bits}_{row.replace(':', '_')}.onnx"
            start = time.perf_counter()
            _, report = quantize_with_report(reference, str(calib), config, output=out, tokenizer=tokenizer_json,
                                 calib=CalibConfig(num_samples=args.num_samples, seq_len=SEQ_LEN, split="samples",
                                                   sequential=sequential))
            seconds = time.perf_counter() - start
            embedded = embed(out, tokenizer_json, sentences)
            cos, top1 = fidelity(embedded, fp32)
            nn1, r10 = neighbour_agreement(embedded, fp32), recall_at_k(embedded, fp32)
            label = f"{method} g{group[1:]}" + (f" d{damp}" if method == "gptq" else "") + (" seq" if sequential else "")
            print(f"{label:18s} cos {cos:.5f} top1 {top1:.4f} nn1 {nn1:.4f} r10 {r10:.4f} quant {seconds:.0f}s "
                  f"(solve {report.phases.get('solve', 0.0):.0f}s){_damps_chosen(report)}", flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as f:
                    f.write(json.dumps(dict(domain=args.domain, bits=args.bits, method=method, group=int(group[1:]),
                                            damp=damp if method == "gptq" else None, sequential=sequential,
                                            cos=cos, top1=top1, nn1=nn1, r10=r10,
                                            damps=[r.damp for r in report.layers],
                                            n=args.num_samples, seconds=seconds)) + "\n")


def _damps_chosen(report) -> str:  # noqa: ANN001
    """With damp auto: how many layers took each damping ('' otherwise)."""
    if not report.layers or report.layers[0].damp_held_errors is None:
        return ""
    counts: dict[float, int] = {}
    for row in report.layers:
        counts[row.damp] = counts.get(row.damp, 0) + 1
    return " damps " + " ".join(f"{d:g}x{c}" for d, c in sorted(counts.items()))


if __name__ == "__main__":
    main()
