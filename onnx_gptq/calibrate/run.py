"""Calibration through onnxruntime: the X^T X of every target MatMul/Gemm input.

The graph is augmented (`calibrate.taps`) so that onnxruntime itself computes,
per batch, the float32 product ``X^T X`` of each requested activation ``X``
(reshaped to ``[rows, K]``) and its element count; the host only sums those
small outputs in float64. Activations are never materialised on the host, and
nothing is written next to the user's model: the augmented model is handed to
onnxruntime as bytes, reading external data from the user's directory (or, for
an in-memory model too big for one protobuf, from in-memory "files").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_gptq.calibrate import statistics, taps as taps_mod
from onnx_gptq.calibrate.batching import token_mask
from onnx_gptq.calibrate.masked_taps import TOKEN_MASK
from onnx_gptq.calibrate.statistics import HessianStats
from onnx_gptq.calibrate.taps import Tap
from onnx_gptq.errors import CalibrationError
from onnx_gptq.runtime import sessions
from onnx_gptq.runtime.sessions import Provider

if TYPE_CHECKING:  # sessions are opened by runtime.sessions only
    import onnxruntime as ort

logger = logging.getLogger(__name__)

# What a batch without padding feeds as its token mask: its size matches no
# activation's rows, so every tap takes all its rows (as an unmasked graph does).
_EMPTY_MASK = np.zeros((0, 0), bool)


def collect_hessians(model: onnx.ModelProto, activations: Sequence[str],
                     batches: Iterable[dict[str, np.ndarray]], *, model_dir: str | os.PathLike[str] | None = None,
                     providers: Sequence[Provider] = ("CPUExecutionProvider",),
                     session_options: ort.SessionOptions | None = None, progress: bool = False,
                     memory_budget: int | None = None,
                     token_masks: Sequence[np.ndarray | None] | None = None,
                     hold_out: bool = False) -> dict[str, HessianStats]:
    """Run the calibration batches through onnxruntime and sum X^T X of each activation.

    The caller's `model` is not modified. For each activation ``x`` (any
    leading dims, last dim K; float32/float16/bfloat16) the augmented copy
    computes ``xf = Cast<float32>(Reshape(x, [-1, K]))``, ``MatMul(Transpose(xf), xf)``
    and ``Size(xf)``, and exposes them as its only outputs; nodes they do not
    depend on are dropped from the copy.

    Args:
        model: the model; large initializers may be external data (loaded with
            ``load_external_data=False``), their locations relative to `model_dir`.
        activations: names of tensors in the main graph (duplicates allowed).
        batches: feeds, input name -> array, one dict per onnxruntime run. Read
            once per pass; a one-shot iterator is materialised when several
            passes are needed.
        model_dir: directory the external data locations are relative to.
        providers: onnxruntime execution providers, in order of preference (names,
            or (name, options) pairs; a bare "CUDAExecutionProvider" runs with TF32 off).
        session_options: used when passed (the external-data folder option is
            set on it, and the custom-op library registered once if the graph
            needs it); by default extended graph optimisations, which keep the
            observed tensors (they are consumed by the added nodes).
        progress: show a tqdm progress bar per pass.
        memory_budget: bytes of statistics one pass may hold (12 K^2 per
            activation: `statistics.hessian_bytes`); when the activations need
            more, they are split into several passes over the data (each pass
            one session, pruned to the graph its activations need). None: a
            quarter of the machine's RAM (`statistics.default_memory_budget`).
        token_masks: per batch, bool [B, S] True at real tokens, or None for a
            batch without padding. None: read off each batch's attention_mask
            (`batching.token_mask`). When any batch is padded, the padded
            positions are kept out of every activation whose rows map to
            tokens (`calibrate.masked_taps`), and rows counts only real tokens.
        hold_out: also sum the batches of the held-out slice apart
            (`statistics.is_held_out`; damp "auto"): `HessianStats.held_xtx`.
            The totals are the same sums as without it.

    Returns:
        activation name -> HessianStats (float64 sums), for every requested name.

    Raises:
        ModelError: an activation is not a tensor of the main graph, or its last
            dimension cannot be determined; external data without `model_dir`.
        CalibrationError: no batches; a batch lacks a model input or names an
            unknown one; onnxruntime fails on a batch (its message is kept).
        ConfigError: a requested execution provider is not available.
    """
    providers = sessions.check_providers(providers)
    names = list(dict.fromkeys(activations))
    if not names:
        return {}
    taps = taps_mod.plan_taps(model, names)
    if not isinstance(batches, Sequence):
        batches = list(batches)  # read at least twice: for padding, then per pass
    if hold_out:
        statistics.is_held_out(0, len(batches))  # at least two batches, or a one-line error now
    masks = list(token_masks) if token_masks is not None else [token_mask(b) for b in batches]
    if len(masks) != len(batches):
        raise ValueError(f"token_masks: {len(masks)} masks for {len(batches)} batches")
    masked = any(m is not None for m in masks)
    budget = memory_budget if memory_budget is not None else statistics.default_memory_budget()
    passes = statistics.plan_passes(sorted(taps, key=lambda t: t.order), lambda t: {t.name: t.k}, budget,
                                    held_out=hold_out)
    if len(passes) > 1:
        logger.info("calibration: %d activations need %.2f GB of statistics, over the %.2f GB budget; "
                    "running %d passes over the data", len(taps),
                    sum(statistics.hessian_bytes(t.k, hold_out) for t in taps) / 1e9, budget / 1e9, len(passes))
    folder = taps_mod.external_folder(model, model_dir)

    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    held = _HeldOut(len(batches)) if hold_out else None
    for index, group in enumerate(passes):
        session = _open(model, group, folder, providers, session_options, masked)
        try:
            _run_pass(session, group, batches, masks if masked else None, sums, rows, progress=progress,
                      label=f"calibration pass {index + 1}/{len(passes)}" if len(passes) > 1 else "calibration",
                      held=held)
        finally:
            del session
    out: dict[str, HessianStats] = {}
    for tap in taps:
        out[tap.name] = HessianStats(xtx=_symmetric(sums.pop(tap.name)), rows=rows[tap.name])
        if held is not None:
            out[tap.name].held_xtx = _symmetric(held.sums.pop(tap.name))
            out[tap.name].held_rows = held.rows[tap.name]
    return out


def _symmetric(xtx: np.ndarray) -> np.ndarray:
    """(X^T X + its transpose) / 2, in place: the float32 GEMM need not be bitwise symmetric."""
    np.add(xtx, xtx.T, out=xtx)
    xtx *= 0.5
    return xtx


class _HeldOut:
    """The held-out slice's sums (damp "auto"): which batches are in it, and what they added."""

    def __init__(self, count: int) -> None:
        self.batches = {i for i in range(count) if statistics.is_held_out(i, count)}
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}


def _open(model: onnx.ModelProto, group: list[Tap], folder: Path | None,
          providers: tuple[Provider, ...], session_options: ort.SessionOptions | None,
          masked: bool) -> sessions.Session:
    """A session over the augmented copy for `group`, its big embedded tensors handed over in memory."""
    aug, in_memory = taps_mod.augmented(model, group, masked=masked)
    buffers = {location: taps_mod.tensor_buffer(tensor) for location, tensor in in_memory.items()}
    return sessions.make_session(aug, providers=providers, options=session_options,
                                 what="the augmented calibration model", external_folder=folder,
                                 in_memory=buffers, optimize=session_options is None, full_float32=True,
                                 require_providers=True)


def _run_pass(session: sessions.Session, taps: list[Tap], batches: Sequence[dict[str, np.ndarray]],
              masks: list[np.ndarray | None] | None, sums: dict[str, np.ndarray], rows: dict[str, int], *,
              progress: bool, label: str, held: _HeldOut | None = None) -> None:
    """Run every batch once, adding each tap's float32 X^T X into its float64 sum (in place),
    and, with `held`, the held-out batches' into the held-out sums too.

    With `masks` (a masked session), each batch is fed its token mask (an
    empty one when it has no padding), and activations whose rows did not map
    to tokens in a padded batch are named in the log.
    """
    inputs = set(session.input_names) - {TOKEN_MASK}
    output_names = [n for t in taps for n in (t.xtx_output, t.size_output)]
    if masks is not None:
        output_names += [t.mapped_output for t in taps]
    unmapped: dict[str, None] = {}
    for tap in taps:
        sums.setdefault(tap.name, np.zeros((tap.k, tap.k), np.float64))
        rows.setdefault(tap.name, 0)
        if held is not None:
            held.sums.setdefault(tap.name, np.zeros((tap.k, tap.k), np.float64))
            held.rows.setdefault(tap.name, 0)
    iterator: Iterator[dict[str, np.ndarray]] = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if isinstance(batches, Sequence) else None
        iterator = iter(tqdm(iterator, total=total, desc=label, unit="batch"))
    seen = 0
    for index, feeds in enumerate(iterator):
        unknown = sorted(set(feeds) - inputs)
        if unknown:
            raise CalibrationError(f"calibration batch {index}: '{unknown[0]}' is not an input of the model "
                                   f"(inputs: {', '.join(sorted(inputs))})")
        missing = sorted(inputs - set(feeds))
        if missing:
            raise CalibrationError(f"calibration batch {index}: model input '{missing[0]}' is not fed")
        mask = None if masks is None else masks[index]
        if masks is not None:
            feeds = {**feeds, TOKEN_MASK: _EMPTY_MASK if mask is None else np.asarray(mask, bool)}
        results = session.run(output_names, feeds, context=f"calibration batch {index}")
        in_held = held is not None and index in held.batches
        for j, tap in enumerate(taps):
            xtx, size = results[2 * j], int(results[2 * j + 1])
            sums[tap.name] += xtx
            rows[tap.name] += size // tap.k
            if in_held:
                held.sums[tap.name] += xtx
                held.rows[tap.name] += size // tap.k
            if mask is not None and not bool(results[2 * len(taps) + j]):
                unmapped[tap.name] = None
        seen += 1
    if seen == 0:
        raise CalibrationError("calibration data is empty: no batch was given")
    for name in unmapped:
        logger.info("calibration: the rows of activation '%s' do not map to (batch, sequence) positions "
                    "(e.g. one row per sample, as a pooler reads); all its rows of padded batches are kept",
                    name)
    logger.debug("%s: %d batches", label, seen)


__all__ = ["HessianStats", "collect_hessians"]
