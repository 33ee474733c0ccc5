"""Write a synthetic Llama-shaped ONNX model with random weights in an external data file.

The graph is what a decoder-only export looks like: token embedding, rotary
position tables and an additive causal/padding mask computed once and shared
by every block; per block RMSNorm, q/k/v projections, rotary, grouped-query
(or multi-head) attention, output projection, residual, RMSNorm, SwiGLU MLP,
residual; a final RMSNorm and a tied or untied LM head. Node names follow
TorchScript exports ("/model/layers.3/self_attn/q_proj/MatMul") so module
paths and block indices are read as from a real model.

Weights are random (scaled by 1/sqrt(fan_in) so activations stay O(1)) and
written one tensor at a time into `<model>.data`, page-aligned: no more than
one weight is ever held in memory, so a 7B-shaped model (13.5 GB in fp16) can
be written on a small machine.

Usage:
    python3 bench/synthetic_llama.py OUT.onnx --hidden 2048 --layers 16 --ffn 5632 --vocab 32000
    python3 bench/synthetic_llama.py OUT.onnx --preset 7b
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

logger = logging.getLogger(__name__)

_ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map each tensor
_CHUNK_ELEMENTS = 1 << 24  # random numbers are drawn in chunks of this many


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-style decoder.

    Attributes:
        hidden: model width H.
        layers: transformer blocks.
        ffn: MLP width F.
        vocab: vocabulary size V.
        heads: attention heads (head dim = hidden / heads).
        kv_heads: key/value heads (< heads: grouped-query attention).
        tied: the LM head reuses the embedding (seen through a Transpose).
        dtype: "float16" or "float32" weights and activations.
    """

    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: hidden must "
                             "split into heads of even size and heads into kv_heads groups")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r} is not float16 or float32")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        """Number of weights (norm scales included)."""
        h, d = self.hidden, self.head_dim
        per_layer = h * h * 2 + 2 * h * self.kv_heads * d + 3 * h * self.ffn + 2 * h
        head = 0 if self.tied else h * self.vocab
        return self.vocab * h + self.layers * per_layer + h + head


PRESETS = {
    "tiny": LlamaShape(hidden=64, layers=2, ffn=96, vocab=256, heads=4, kv_heads=2),
    "1b": LlamaShape(hidden=2048, layers=16, ffn=5632, vocab=32000, heads=32, kv_heads=32),
    "7b": LlamaShape(hidden=4096, layers=32, ffn=11008, vocab=32000, heads=32, kv_heads=32),
}


class _DataWriter:
    """Appends tensors to one external data file and returns initializers referring to them."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0
        self.rng = np.random.default_rng(seed)

    def random(self, name: str, shape: tuple[int, ...], dtype: np.dtype, scale: float) -> TensorProto:
        """A uniform random tensor with standard deviation `scale`, written chunk by chunk."""
        self._pad()
        start = self.offset
        count = math.prod(shape)
        bound = scale * math.sqrt(3.0)  # U(-b, b) has std b / sqrt(3)
        done = 0
        while done < count:
            n = min(_CHUNK_ELEMENTS, count - done)
            chunk = (self.rng.random(n, dtype=np.float32) * np.float32(2 * bound) - np.float32(bound)).astype(dtype)
            self.file.write(chunk.tobytes())
            done += n
        self.offset += count * np.dtype(dtype).itemsize
        return self._reference(name, shape, dtype, start)

    def constant(self, name: str, array: np.ndarray) -> TensorProto:
        """A given (small) tensor, also written to the data file."""
        self._pad()
        start = self.offset
        data = np.ascontiguousarray(array).tobytes()
        self.file.write(data)
        self.offset += len(data)
        return self._reference(name, array.shape, array.dtype, start)

    def _pad(self) -> None:
        pad = (-self.offset) % _ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad

    def _reference(self, name: str, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> TensorProto:
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        length = math.prod(shape) * np.dtype(dtype).itemsize
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        self.file.close()


class _Graph:
    """Small helper to emit nodes with TorchScript-style names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.counter = 0

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, **attrs: object) -> list[str]:
        self.counter += 1
        name = f"{scope}/{op_type}_{self.counter}"
        outs = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], scope: str, **attrs: object) -> str:
        return self.op(op_type, inputs, scope, **attrs)[0]

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name


def _rms_norm(g: _Graph, x: str, weight: str, scope: str, dtype: int) -> str:
    """RMSNorm with float32 statistics, as exporters write it."""
    xf = g.one("Cast", [x], scope, to=TensorProto.FLOAT)
    sq = g.one("Pow", [xf, "const_two"], scope)
    mean = g.one("ReduceMean", [sq], scope, axes=[-1], keepdims=1)
    denom = g.one("Sqrt", [g.one("Add", [mean, "const_eps"], scope)], scope)
    normed = g.one("Cast", [g.one("Div", [xf, denom], scope)], scope, to=dtype)
    return g.one("Mul", [normed, weight], scope)


def _rotary(g: _Graph, x: str, cos: str, sin: str, scope: str) -> str:
    """x * cos + rotate_half(x) * sin, x [B, heads, S, D]."""
    first, second = g.op("Split", [x, "const_half_split"], scope, outputs=2, axis=-1)
    rotated = g.one("Concat", [g.one("Neg", [second], scope), first], scope, axis=-1)
    return g.one("Add", [g.one("Mul", [x, cos], scope), g.one("Mul", [rotated, sin], scope)], scope)


def build(shape: LlamaShape, path: Path, *, seed: int = 0) -> Path:
    """Write the model to `path` and its weights to `path.name + '.data'` beside it.

    Args:
        shape: the sizes.
        path: the .onnx file to write.
        seed: random seed of the weights.

    Returns:
        `path`.
    """
    np_dtype = np.dtype(shape.dtype)
    dtype = helper.np_dtype_to_tensor_dtype(np_dtype)
    h, d, f, v = shape.hidden, shape.head_dim, shape.ffn, shape.vocab
    kv = shape.kv_heads * d
    writer = _DataWriter(path.with_name(path.name + ".data"), seed)
    g = _Graph()
    try:
        g.const("const_two", np.array(2.0, np.float32))
        g.const("const_eps", np.array(1e-5, np.float32))
        g.const("const_one_i", np.array(1, np.int64))
        g.const("const_zero_i", np.array(0, np.int64))
        g.const("const_half_split", np.array([d // 2, d // 2], np.int64))
        g.const("const_q_shape", np.array([0, 0, shape.heads, d], np.int64))
        g.const("const_kv_shape", np.array([0, 0, shape.kv_heads, d], np.int64))
        g.const("const_merge_shape", np.array([0, 0, h], np.int64))
        g.const("const_gqa_expand", np.array([1, 1, shape.heads // shape.kv_heads, 1, 1], np.int64))
        g.const("const_gqa_shape", np.array([0, shape.heads, -1, d], np.int64))
        g.const("const_scale", np.array(1.0 / math.sqrt(d), np_dtype))
        g.const("const_mask_min", np.array(-1e4, np.float32))
        g.const("const_one_f", np.array(1.0, np.float32))
        g.const("const_inv_freq", (1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d)).reshape(1, 1, -1))

        embed = writer.random("model.embed_tokens.weight", (v, h), np_dtype, 1.0)
        g.initializers.append(embed)
        hidden = g.one("Gather", [embed.name, "input_ids"], "/model/embed_tokens")

        # Shared tensors: positions from the mask, rotary tables, additive causal + padding mask.
        scope = "/model/rotary_emb"
        positions = g.one("Sub", [g.one("CumSum", ["attention_mask", "const_one_i"], scope), "const_one_i"], scope)
        positions = g.one("Max", [positions, "const_zero_i"], scope)
        pos_f = g.one("Unsqueeze", [g.one("Cast", [positions], scope, to=TensorProto.FLOAT),
                                    g.const("const_axis_last", np.array([-1], np.int64))], scope)
        freqs = g.one("Mul", [pos_f, "const_inv_freq"], scope)  # [B, S, D/2]
        emb = g.one("Concat", [freqs, freqs], scope, axis=-1)
        head_axis = g.const("const_axis_1", np.array([1], np.int64))
        cos = g.one("Unsqueeze", [g.one("Cast", [g.one("Cos", [emb], scope)], scope, to=dtype), head_axis], scope)
        sin = g.one("Unsqueeze", [g.one("Cast", [g.one("Sin", [emb], scope)], scope, to=dtype), head_axis], scope)

        scope = "/model/mask"
        mask_f = g.one("Cast", ["attention_mask"], scope, to=TensorProto.FLOAT)  # [B, S]
        seq = g.one("Shape", ["attention_mask"], scope, start=1, end=2)
        square = g.one("Concat", [seq, seq], scope, axis=0)
        causal = g.one("Trilu", [g.one("ConstantOfShape", [square], scope,
                                       value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))],
                       scope, upper=0)  # [S, S]
        keys = g.one("Unsqueeze", [mask_f, g.const("const_axes_12", np.array([1, 2], np.int64))], scope)
        allowed = g.one("Mul", [causal, keys], scope)  # [B, 1, S, S]
        bias = g.one("Mul", [g.one("Sub", ["const_one_f", allowed], scope), "const_mask_min"], scope)
        bias = g.one("Cast", [bias], scope, to=dtype)

        for layer in range(shape.layers):
            prefix = f"model.layers.{layer}"
            scope = f"/model/layers.{layer}"

            def weight(name: str, rows: int, cols: int) -> str:
                tensor = writer.random(f"{prefix}.{name}.weight", (rows, cols), np_dtype, 1.0 / math.sqrt(rows))
                g.initializers.append(tensor)
                return tensor.name

            def linear(x: str, name: str, rows: int, cols: int) -> str:
                w = weight(name, rows, cols)
                out = f"{scope}/{name.replace('.', '/')}/MatMul_output_0"
                g.nodes.append(helper.make_node("MatMul", [x, w], [out],
                                                name=f"{scope}/{name.replace('.', '/')}/MatMul"))
                return out

            g.initializers.append(writer.constant(f"{prefix}.input_layernorm.weight", np.ones(h, np_dtype)))
            x = _rms_norm(g, hidden, f"{prefix}.input_layernorm.weight", f"{scope}/input_layernorm", dtype)
            attn = f"{scope}/self_attn"
            q = g.one("Transpose", [g.one("Reshape", [linear(x, "self_attn.q_proj", h, h), "const_q_shape"], attn)],
                      attn, perm=[0, 2, 1, 3])
            k = g.one("Transpose", [g.one("Reshape", [linear(x, "self_attn.k_proj", h, kv), "const_kv_shape"],
                                          attn)], attn, perm=[0, 2, 1, 3])
            val = g.one("Transpose", [g.one("Reshape", [linear(x, "self_attn.v_proj", h, kv), "const_kv_shape"],
                                            attn)], attn, perm=[0, 2, 1, 3])
            q, k = _rotary(g, q, cos, sin, attn), _rotary(g, k, cos, sin, attn)
            if shape.kv_heads != shape.heads:
                axis2 = "const_axis_2"
                if not any(t.name == axis2 for t in g.initializers):
                    g.const(axis2, np.array([2], np.int64))
                k, val = (g.one("Reshape", [g.one("Expand", [g.one("Unsqueeze", [t, axis2], attn),
                                                             "const_gqa_expand"], attn), "const_gqa_shape"], attn)
                          for t in (k, val))
            scores = g.one("MatMul", [q, g.one("Transpose", [k], attn, perm=[0, 1, 3, 2])], attn)
            scores = g.one("Add", [g.one("Mul", [scores, "const_scale"], attn), bias], attn)
            probs = g.one("Softmax", [scores], attn, axis=-1)
            context = g.one("Transpose", [g.one("MatMul", [probs, val], attn)], attn, perm=[0, 2, 1, 3])
            context = g.one("Reshape", [context, "const_merge_shape"], attn)
            hidden = g.one("Add", [hidden, linear(context, "self_attn.o_proj", h, h)], scope)

            g.initializers.append(writer.constant(f"{prefix}.post_attention_layernorm.weight", np.ones(h, np_dtype)))
            x = _rms_norm(g, hidden, f"{prefix}.post_attention_layernorm.weight",
                          f"{scope}/post_attention_layernorm", dtype)
            gate = linear(x, "mlp.gate_proj", h, f)
            up = linear(x, "mlp.up_proj", h, f)
            mlp = f"{scope}/mlp"
            act = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate], mlp)], mlp), up], mlp)
            hidden = g.one("Add", [hidden, linear(act, "mlp.down_proj", f, h)], scope)
            logger.info("layer %d written (%.2f GB so far)", layer, writer.offset / 1e9)

        g.initializers.append(writer.constant("model.norm.weight", np.ones(h, np_dtype)))
        x = _rms_norm(g, hidden, "model.norm.weight", "/model/norm", dtype)
        if shape.tied:
            head = g.one("Transpose", [embed.name], "/lm_head", perm=[1, 0])
        else:
            tensor = writer.random("lm_head.weight", (h, v), np_dtype, 1.0 / math.sqrt(h))
            g.initializers.append(tensor)
            head = tensor.name
        g.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="/lm_head/MatMul"))
    finally:
        writer.close()

    graph = helper.make_graph(
        g.nodes, "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", dtype, ["batch", "sequence", v])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="synthetic_llama")
    model.ir_version = 8
    # Types of intermediate tensors, as the dynamo exporter records them (weights are not read).
    model = onnx.shape_inference.infer_shapes(model)
    with open(path, "wb") as out:
        out.write(model.SerializeToString())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the .onnx file (weights go to <output>.data)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes of a known shape (flags below override)")
    for name in ("hidden", "layers", "ffn", "vocab", "heads", "kv-heads"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--tied", action="store_true", help="LM head tied to the embedding")
    parser.add_argument("--dtype", choices=["float16", "float32"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = PRESETS[args.preset or "1b"]
    overrides = {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "vocab", "heads", "kv_heads", "dtype")
                 if getattr(args, k) is not None}
    if args.tied:
        overrides["tied"] = True
    shape = dataclasses.replace(base, **overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(shape, args.output, seed=args.seed)
    size = args.output.stat().st_size + Path(str(args.output) + ".data").stat().st_size
    print(f"{args.output}: {shape.parameters / 1e9:.3f} B parameters, {size / 1e9:.2f} GB on disk "
          f"({shape})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["LlamaShape", "PRESETS", "build"]
