"""The encoder benchmark's retrieval measures on small hand-made embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_encoder  # noqa: E402


def _unit(angles_deg: list[float]) -> np.ndarray:
    """Unit vectors in the plane at the given angles: cosine similarity orders by angle difference."""
    radians = np.deg2rad(np.array(angles_deg))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_neighbours_exclude_self_and_sort_nearest_first() -> None:
    neighbours = bench_encoder._neighbours(_unit([0, 10, 30, 90]), 2)
    assert neighbours.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]


def test_neighbour_agreement_counts_rows_whose_nearest_other_row_moved() -> None:
    reference = _unit([0, 10, 30, 90])          # nearest others: 1, 0, 1, 2
    quantized = _unit([0, 19, 30, 90])          # nearest others: 1, 2, 1, 2 -> row 1 moved
    assert bench_encoder.neighbour_agreement(reference, reference) == 1.0
    assert bench_encoder.neighbour_agreement(quantized, reference) == 0.75


def test_neighbour_agreement_ignores_self_retrieval_which_saturates() -> None:
    reference = _unit([0, 10, 30, 90])
    quantized = _unit([0, 19, 30, 90])
    _, top1 = bench_encoder.fidelity(quantized, reference)
    assert top1 == 1.0  # each row still nearest its own reference: the old measure cannot see the move
    assert bench_encoder.neighbour_agreement(quantized, reference) < 1.0


def test_recall_at_k_is_the_mean_overlap_of_the_k_nearest() -> None:
    reference = _unit([0, 10, 30, 90, 100])  # 2 nearest others: {1,2} {0,2} {1,0} {4,2} {3,2}
    quantized = _unit([0, 10, 30, 90, 200])  # 2 nearest others: {1,2} {0,2} {1,0} {2,1} {3,0}
    assert bench_encoder.recall_at_k(quantized, reference, k=2) == 0.8  # (1 + 1 + 1 + 0.5 + 0.5) / 5
    assert bench_encoder.recall_at_k(reference, reference, k=2) == 1.0
    assert bench_encoder.recall_at_k(quantized, reference, k=1) == 0.8  # only row 3 loses its nearest (4 -> 2)
