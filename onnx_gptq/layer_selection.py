"""Which layers are quantized, and which take other settings (validated on construction, no I/O).

* :class:`LayerFilter` says *which* MatMul/Gemm weights are quantized
  (include/exclude patterns, the output head); `targets.find_targets` takes it.
* :class:`LayerRule` gives the layers a pattern matches other bits, group size
  or grid (mixed precision: `QuantConfig.layer_rules`, `QuantConfig.for_layer`),
  from the command line's ``REGEX=bits:8`` or a JSON map.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from onnx_gptq.errors import ConfigError


def check_patterns(option: str, patterns: tuple[str, ...]) -> None:
    """ConfigError naming `option` for the first pattern that is no valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{option}: {pattern!r} is not a valid regular expression ({exc})") from None


@dataclasses.dataclass(frozen=True)
class LayerFilter:
    """Which MatMul/Gemm weights are quantized.

    A weight is matched by the names of its initializer, its consuming nodes
    and their torch module paths (`re.search`).

    Args:
        include: regexes; when given, only matching layers are quantized (a
            matching output head too).
        exclude: regexes; matching layers stay float (exclude wins).
        quantize_head: also quantize the output head (at `bits`; `QuantConfig.head_bits` otherwise decides).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_head: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        check_patterns("include", self.include)
        check_patterns("exclude", self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return {"include": list(self.include), "exclude": list(self.exclude), "quantize_head": self.quantize_head}


#: The settings a LayerRule may change, with the type each takes.
LAYER_RULE_FIELDS = {"bits": int, "group_size": int, "sym": bool}


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Other quantization settings for the layers `pattern` matches (mixed precision).

    A layer is matched by the names of its initializer, its nodes and their torch
    module paths (`re.search`), as LayerFilter matches. Rules apply in order: a
    later matching rule overrides the settings it names. Rules never select layers:
    which layers are quantized stays LayerFilter's choice.

    Args:
        pattern: regular expression.
        bits: code width for the matched layers (None: the config's).
        group_size: group size for them (None: the config's).
        sym: symmetric grid or not (None: the config's).
    """

    pattern: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None

    def __post_init__(self) -> None:
        check_patterns("layer_config", (self.pattern,))
        if not self.settings():
            raise ConfigError(f"layer_config: rule for {self.pattern!r} changes nothing (give bits, group_size "
                              "or sym)")

    def settings(self) -> dict[str, Any]:
        """The settings this rule changes."""
        return {name: getattr(self, name) for name in LAYER_RULE_FIELDS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, **self.settings()}

    @classmethod
    def parse(cls, text: str) -> "LayerRule":
        """A rule from the command line's ``REGEX=bits:8,group_size:32,sym:true``.

        Raises:
            ConfigError: the text is malformed; the message quotes it.
        """
        pattern, sep, spec = text.rpartition("=")
        if not sep or not pattern or not spec:
            raise ConfigError(f"layer_config: {text!r} is not REGEX=SETTING:VALUE[,...] "
                              "(e.g. 'down_proj=bits:8' or 'lm_head=bits:8,group_size:32')")
        settings: dict[str, Any] = {}
        for item in spec.split(","):
            name, colon, value = (part.strip() for part in item.partition(":"))
            name = {"group": "group_size", "g": "group_size"}.get(name, name)
            if not colon or name not in LAYER_RULE_FIELDS:
                raise ConfigError(f"layer_config: {item.strip()!r} in {text!r} is not one of "
                                  f"{', '.join(f'{n}:VALUE' for n in LAYER_RULE_FIELDS)}")
            settings[name] = _rule_value(name, value, text)
        return cls(pattern, **settings)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> tuple["LayerRule", ...]:
        """Rules from JSON: ``{"REGEX": {"bits": 8, "group_size": 32}, ...}`` or a list of
        ``{"pattern": "REGEX", "bits": 8}`` objects (`source` names the file in errors).

        Raises:
            ConfigError: the data has another shape, or a setting is unknown or mistyped.
        """
        if isinstance(data, dict):
            items = [{"pattern": k, **v} if isinstance(v, dict) else None for k, v in data.items()]
        elif isinstance(data, list):
            items = [item if isinstance(item, dict) else None for item in data]
        else:
            items = [None]
        rules = []
        for item in items:
            if item is None:
                raise ConfigError(f"layer_config: {source} must map REGEX -> {{\"bits\": N, ...}} "
                                  "or list {\"pattern\": REGEX, \"bits\": N, ...} objects")
            unknown = sorted(set(item) - set(LAYER_RULE_FIELDS) - {"pattern"})
            if unknown:
                raise ConfigError(f"layer_config: {source}: unknown setting(s) {', '.join(unknown)} for "
                                  f"{item.get('pattern')!r} (known: {', '.join(LAYER_RULE_FIELDS)})")
            for name, value in item.items():
                expected = str if name == "pattern" else LAYER_RULE_FIELDS[name]
                if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                    raise ConfigError(f"layer_config: {source}: {name} of {item.get('pattern')!r} must be "
                                      f"{expected.__name__}, not {value!r}")
            rules.append(cls(**item))
        return tuple(rules)


def _rule_value(name: str, value: str, text: str) -> Any:
    if LAYER_RULE_FIELDS[name] is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
    else:
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"layer_config: {name}:{value} in {text!r} is not a valid "
                      f"{LAYER_RULE_FIELDS[name].__name__}")
