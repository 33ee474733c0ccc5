"""Quantization settings: frozen, validated on construction, no I/O.

* :class:`QuantConfig` says *how* weights are quantized (solver and format).
* :class:`LayerFilter` and :class:`LayerRule` (from `onnx_gptq.layer_selection`,
  re-exported here) say *which* layers are quantized and which take other
  settings; QuantConfig's `include`, `exclude` and `quantize_head` are a
  shorthand for a LayerFilter (`QuantConfig.layers`).
* :class:`CalibConfig` holds the calibration settings (samples, sequence
  length, batch, providers, sequential mode, memory budget).

Each serialises to a dict (`to_dict`); the report records all three.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
import re
from collections.abc import Callable, Iterable
from typing import Any

from onnx_gptq import contract
from onnx_gptq.errors import ConfigError
from onnx_gptq.layer_selection import LayerFilter, LayerRule, check_patterns

__all__ = ["AUTO", "SUPPORTED_BITS", "Algo", "CalibConfig", "CalibSplit", "Format", "LayerFilter",
           "LayerRule", "QuantConfig"]

SUPPORTED_BITS = contract.GPTQ_BITS


class Algo(str, enum.Enum):
    """Weight solver."""

    GPTQ = "gptq"
    RTN = "rtn"  # round-to-nearest, the baseline


class CalibSplit(str, enum.Enum):
    """How calibration text is cut into sequences."""

    WINDOWS = "windows"  # random windows of one token stream (causal LMs), after the tokenizer's BOS
    SAMPLES = "samples"  # one sample per line / paragraph / string, with the tokenizer's special tokens


class Format(str, enum.Enum):
    """Packed-node format written into the output model."""

    AUTO = "auto"  # ORT when it can express the configuration, else CUSTOM
    ORT = "ort"  # com.microsoft.MatMulNBits
    QDQ = "qdq"  # ONNX DequantizeLinear (blocked) feeding the original MatMul
    CUSTOM = "custom"  # onnx_gptq.GptqMatMul from custom_ops/


def _enum(cls: type[enum.Enum], value: Any, option: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{option}: {value!r} is not one of {choices}") from None


#: The default of `QuantConfig.head_bits` and `embedding_bits`: chosen from `bits` (see there).
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How and which weights are quantized.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale/zero point; -1 means one
            group per output channel (the whole input dimension). The last group
            may be shorter (ragged) when it does not divide K.
        sym: symmetric grid (zero point fixed at 2**(bits-1)) instead of a
            per-group min/max grid.
        act_order: quantize columns in order of decreasing Hessian diagonal (on by
            default: with static groups it costs nothing at inference, and on
            SmolLM2 it cuts the W3 perplexity increase by more than half).
        static_groups: with act_order, fix every group's grid before solving so
            groups stay contiguous in the original column order (no g_idx needed).
            False gives the reference's dynamic groups and a g_idx (custom format).
        damp: damping added to diag(H), as a fraction of mean(diag(H)); or "auto": per layer,
            the candidate of `damp_search.CANDIDATES` whose solve on the fit slice of the
            calibration batches has the lowest error on the held-out slice (every
            `statistics.HOLD_OUT_EVERY`-th batch), then one solve on all of them with it.
        blocksize: columns per lazy-batch update in the solver.
        mse: search a shrunk clipping range per group, minimising the diag(H)-weighted
            |error|^2.4 (the reference's norm).
        algo: "gptq" or "rtn".
        format: "auto", "ort", "qdq" or "custom".
        include: shorthand for ``LayerFilter(include=...)`` (see `layers`).
        exclude: shorthand for ``LayerFilter(exclude=...)``.
        quantize_head: shorthand for ``LayerFilter(quantize_head=...)``.
        accuracy_level: accuracy_level attribute of MatMulNBits and GptqMatMul nodes
            (4, the default: int8 activations and int8 dot products on CPU, what
            onnxruntime-genai's builder writes; on SmolLM2 W4 g128 it costs 0.19
            perplexity and gives 1.7x the decode speed of 0, docs/BENCHMARKS.md;
            0: fp32 math, exact to the dequantized weight).
        layer_rules: other bits / group size / grid for the layers a pattern
            matches (see `LayerRule`, `for_layer`).
        head_bits: code width of the output head (GPTQ on the final hidden state's
            Hessian); None leaves it float unless `quantize_head` (then `bits`).
            "auto" (the default): 4, or `bits` when that is 8 or `quantize_head` is set. On SmolLM2 W4 g128 with
            the embedding shared: 82.8 MB at 30.70 perplexity against 179 MB at 29.23
            with both float, the only variant under the onnxruntime-genai builder
            int4's 86 MB (docs/BENCHMARKS.md).
        embedding_bits: code width of the token embedding table, written as
            com.microsoft.GatherBlockQuantized (4 or 8, round to nearest on the
            `group_size` grid; the head's GPTQ codes when shared); None keeps it float.
            "auto" (the default): the head's bits (4 for a 2- or 3-bit head), so a tied
            table is stored once; float where the head is float, with format "qdq"
            (standard operators only) and where GatherBlockQuantized cannot take
            `group_size`.
        shared_embedding: a tied embedding (the head's weight is the table) is stored
            once, read by both the Gather and the head, when both have one grid
            (bits, block) and the head is a MatMulNBits; else it is stored twice.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    damp: float | str = 0.01
    blocksize: int = 128
    mse: bool = False
    algo: Algo = Algo.GPTQ
    format: Format = Format.AUTO
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_head: bool = False
    accuracy_level: int = 4
    layer_rules: tuple[LayerRule, ...] = ()
    head_bits: int | None | str = AUTO
    embedding_bits: int | None | str = AUTO
    shared_embedding: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("layer_rules", tuple(r if isinstance(r, LayerRule) else LayerRule(**r) for r in self.layer_rules))
        set_("algo", _enum(Algo, self.algo, "algo"))
        set_("format", _enum(Format, self.format, "format"))
        set_("include", tuple(self.include))
        set_("exclude", tuple(self.exclude))
        check_patterns("include", self.include)
        check_patterns("exclude", self.exclude)
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits: {self.bits} is not supported (choose one of 2, 3, 4, 8)")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size: {self.group_size} must be -1 (per channel) or positive")
        self._check_damp()
        if self.blocksize < 1:
            raise ConfigError(f"blocksize: {self.blocksize} must be positive")
        if self.accuracy_level not in contract.MATMULNBITS_ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level: {self.accuracy_level} must be 0..4")
        if self.format is Format.ORT and self.bits not in contract.MATMULNBITS_BITS:
            raise ConfigError(f"bits: {self.bits}-bit weights cannot be written as com.microsoft.MatMulNBits "
                              "(format 'ort'); use --format custom or auto")
        if self.format is Format.ORT and self.group_size != -1:
            pow2 = self.group_size & (self.group_size - 1) == 0
            if not pow2 or self.group_size < contract.MATMULNBITS_MIN_BLOCK:
                raise ConfigError(f"group_size: {self.group_size} cannot be written as com.microsoft.MatMulNBits "
                                  "(format 'ort' takes powers of two >= 16, or -1); use --format custom or auto")
            if self.bits == 2 and self.group_size > contract.MATMULNBITS_MAX_BLOCK_2BIT:
                raise ConfigError(f"group_size: 2-bit MatMulNBits takes groups of at most 256, not "
                                  f"{self.group_size}; use --format custom or auto")
        if self.format is Format.QDQ and self.bits not in contract.QDQ_BITS:
            raise ConfigError(f"bits: {self.bits}-bit weights cannot be written as DequantizeLinear "
                              "(format 'qdq' takes 4 or 8); use --format custom or auto")
        needs_g_idx = self.act_order and not self.static_groups and self.group_size != -1
        if needs_g_idx and self.format in (Format.ORT, Format.QDQ):
            raise ConfigError(f"act_order without static groups needs g_idx, which format "
                              f"'{self.format.value}' cannot express; use --format custom")
        self._resolve_head_and_embedding(set_)
        self._check_head_and_embedding()
        for rule in self.layer_rules:  # each rule must give a valid config on its own
            try:
                dataclasses.replace(self, layer_rules=(), **rule.settings())
            except ConfigError as exc:
                raise ConfigError(f"layer_config {rule.pattern!r}: {exc}") from None

    def _check_damp(self) -> None:
        if isinstance(self.damp, str) and self.damp.lower() == AUTO:
            object.__setattr__(self, "damp", AUTO)
            return
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real):
            raise ConfigError(f"damp: {self.damp!r} is not a number in [0, 1) or {AUTO!r}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp: {self.damp} must be in [0, 1) or {AUTO!r}")
        object.__setattr__(self, "damp", float(self.damp))

    @property
    def damp_auto(self) -> bool:
        """True when each layer's damping is chosen by held-out error (`damp="auto"`)."""
        return self.damp == AUTO

    def _resolve_head_and_embedding(self, set_: Callable[[str, Any], None]) -> None:
        """Replace "auto" head and embedding widths by the defaults the docstring gives."""
        for name in ("head_bits", "embedding_bits"):
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise ConfigError(f"{name}: {value!r} is not a bit width, None (float) or {AUTO!r}")
        if self.head_bits == AUTO:  # quantize_head asks for the head at `bits`
            set_("head_bits", self.bits if self.quantize_head or self.bits == 8 else 4)
        if self.embedding_bits == AUTO:
            bits = None if self.head_bits is None else max(4, self.head_bits)
            fits = self.format is not Format.QDQ and contract.gather_group_problem(self.group_size) is None
            set_("embedding_bits", bits if fits else None)

    def _check_head_and_embedding(self) -> None:
        if self.head_bits is not None and self.head_bits not in SUPPORTED_BITS:
            raise ConfigError(f"head_bits: {self.head_bits} is not supported (choose float or one of 2, 3, 4, 8)")
        if self.head_bits is not None and self.head_bits != self.bits:
            try:
                dataclasses.replace(self, bits=self.head_bits, head_bits=None)
            except ConfigError as exc:
                raise ConfigError(f"head_bits: {exc}") from None
        if self.embedding_bits is None:
            return
        if self.embedding_bits not in contract.GATHER_BITS:
            raise ConfigError(f"embedding_bits: {self.embedding_bits} is not supported (GatherBlockQuantized: "
                              f"float or {' or '.join(map(str, contract.GATHER_BITS))})")
        problem = contract.gather_group_problem(self.group_size)
        if problem is not None:
            raise ConfigError(f"group_size: the embedding cannot be written with {problem}; "
                              "keep it float (--embedding float) or choose another group size")

    def for_layer(self, names: Iterable[str], is_head: bool = False) -> "QuantConfig":
        """The config for a layer known by `names` (initializer, node and module names):
        this one with `head_bits` for the output head (`is_head`), then every matching
        rule's settings applied in order, and no rules."""
        names = list(names)
        settings: dict[str, Any] = {}
        if is_head and self.head_bits is not None and self.head_bits != self.bits:
            settings["bits"] = self.head_bits  # layer rules naming the head still win
        for rule in self.layer_rules:
            if any(re.search(rule.pattern, n) for n in names):
                settings.update(rule.settings())
        if not settings and not self.layer_rules:
            return self
        return dataclasses.replace(self, layer_rules=(), **settings)

    @property
    def layers(self) -> LayerFilter:
        """The layer selection this config's include/exclude/quantize_head stand for."""
        return LayerFilter(include=self.include, exclude=self.exclude,
                           quantize_head=self.quantize_head or self.head_bits is not None)

    @property
    def needs_g_idx(self) -> bool:
        """True when groups are not contiguous in the original column order."""
        return self.act_order and not self.static_groups and self.group_size != -1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["algo"] = self.algo.value
        out["format"] = self.format.value
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        out["layer_rules"] = [r.to_dict() for r in self.layer_rules]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown quantization option(s): {', '.join(unknown)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Calibration settings.

    Args:
        num_samples: sequences drawn from the calibration data.
        seq_len: tokens per sequence (clipped to what the model accepts).
        batch_size: sequences per onnxruntime run. 1 by default: on CPU it
            calibrates SmolLM2 as fast as 4 with 31 % less peak memory
            (docs/BENCHMARKS.md); a GPU may want more.
        providers: onnxruntime execution providers, in order of preference;
            empty means CUDA when this onnxruntime has it, else CPU.
        seed: seed for drawing windows out of long text.
        sequential: True: collect each block's Hessians with all earlier
            blocks already quantized (the reference GPTQ's true-sequential
            mode); False: one pass over the float model; None (or "auto",
            the default): sequential where the graph has cuts between its
            blocks (`calibrate.sequential.choose_mode`), one pass where it has
            none. "on" and "off" are the CLI's words for True and False.
        memory_budget: bytes of Hessian statistics held at once; above it,
            calibration runs in several passes over groups of layers.
            None: a quarter of the machine's RAM.
        split: how text is cut ("windows" or "samples"); None (or "auto") chooses by
            model kind (`calibrate.model_kind`): samples for encoders,
            windows for causal LMs and models of unknown kind.
    """

    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 1
    providers: tuple[str, ...] = ()
    seed: int = 0
    sequential: bool | None = None
    memory_budget: int | None = None
    split: CalibSplit | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        if isinstance(self.sequential, str):  # the CLI's words
            words = {"on": True, "off": False, "auto": None}
            if self.sequential not in words:
                raise ConfigError(f"sequential: {self.sequential!r} is not one of on, off, auto")
            object.__setattr__(self, "sequential", words[self.sequential])
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential: {self.sequential!r} must be True, False or None (auto)")
        if self.split == "auto":  # the CLI's word for None
            object.__setattr__(self, "split", None)
        if self.split is not None:
            object.__setattr__(self, "split", _enum(CalibSplit, self.split, "calib_split"))
        for name in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ConfigError(f"memory_budget: {self.memory_budget} must be positive (bytes)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (providers given with options keep only their names)."""
        out = dataclasses.asdict(self)
        out["providers"] = [p if isinstance(p, str) else p[0] for p in self.providers]
        out["split"] = None if self.split is None else self.split.value
        return out
