"""What a quantization run did: per-layer rows, skipped nodes, phase times, sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class PhaseTimer:
    """Adds wall seconds per phase name into a dict (or nowhere, given None)."""

    def __init__(self, phases: dict[str, float] | None) -> None:
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.phases is not None:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class LayerRow:
    """One quantized weight.

    `error` and `rtn_error` are relative output errors tr(dW H dW^T) / tr(W H W^T)
    of the solver's result and of round-to-nearest on the same grid (H from
    calibration; weight-space errors when there was none). `damp` is the damping
    the solve used; with damp "auto", `damp_held_errors` gives each candidate's
    relative held-out error (`damp_search`), else it is None.
    """

    name: str
    module: str
    nodes: list[str]
    shape: tuple[int, int]  # (K, N)
    bits: int
    group_size: int
    format: str
    damp: float
    error: float
    rtn_error: float
    seconds: float
    calibration_rows: int
    damp_held_errors: dict[str, float] | None = None


@dataclasses.dataclass
class Report:
    """What one run did, with every setting it ran under.

    Attributes:
        config: the QuantConfig (`QuantConfig.to_dict`).
        layers: nodes of each quantized weight, its error, format and time.
        skipped: every MatMul/Gemm left float, with its reason.
        format_notes: weights written in another format than asked, and why.
        phases: wall seconds per phase.
        size_before, size_after: bytes on disk (path in, path out).
        verified_tensors: packed tensors read back from the written file and
            found bit-identical to the solver's (None when no file was written).
        calib: the CalibConfig (`CalibConfig.to_dict`); None when not calibrated (rtn).
        selection: the LayerFilter that chose the layers (`LayerFilter.to_dict`).
        run: execution settings (jobs, device).
        embeddings: each embedding table written as GatherBlockQuantized: name, nodes,
            shape [V, H], bits, block_size, shared (reads the head's codes), storage
            (why shared or not), error (relative weight error of its own codes; None when shared).
    """

    config: dict[str, Any]
    layers: list[LayerRow] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    format_notes: list[str] = dataclasses.field(default_factory=list)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    size_before: int | None = None
    size_after: int | None = None
    #: packed tensors read back from the written file and found bit-identical to the
    #: solver's (None when nothing was written to a file).
    verified_tensors: int | None = None
    calib: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    embeddings: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few lines for the end of a CLI run."""
        lines = [f"quantized {len(self.layers)} weight(s); left {len(self.skipped)} MatMul/Gemm node(s) float"]
        if self.calib and self.calib.get("split"):
            lines.append(f"calibration text split: {self.calib['split']} ({self.calib.get('split_reason', '')})")
        if self.calib and "sequential_reason" in self.calib:
            mode = "sequential" if self.calib["sequential"] else "one pass"
            lines.append(f"calibration: {mode} ({self.calib['sequential_reason']})")
        if self.layers:
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            lines.append(
                f"mean relative output error: {mean([r.error for r in self.layers]):.3e} "
                f"(round-to-nearest: {mean([r.rtn_error for r in self.layers]):.3e})")
            formats: dict[str, int] = {}
            for r in self.layers:
                formats[r.format] = formats.get(r.format, 0) + 1
            if self.verified_tensors is not None:
                lines.append(f"written file read back: {self.verified_tensors} packed tensors bit-identical "
                             "to the solver's (the errors above are the file's)")
            lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(formats.items())))
            grids: dict[str, int] = {}
            for r in self.layers:
                key = f"{r.bits}-bit g{r.group_size}"
                grids[key] = grids.get(key, 0) + 1
            if len(grids) > 1:
                lines.append("mixed precision: " + ", ".join(f"{k} x{v}" for k, v in sorted(grids.items())))
        for e in self.embeddings:
            lines.append(f"embedding {e['name']} {e['shape'][0]}x{e['shape'][1]}: {e['bits']}-bit block "
                         f"{e['block_size']} (GatherBlockQuantized), {e['storage']}")
        if self.size_before and self.size_after:
            lines.append(f"size: {_mib(self.size_before)} -> {_mib(self.size_after)} "
                         f"({100.0 * (1 - self.size_after / self.size_before):.1f}% smaller)")
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items()))
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
