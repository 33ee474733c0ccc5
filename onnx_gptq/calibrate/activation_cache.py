"""The crossing tensors of sequential calibration, cached per batch (spilling to disk)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np


class ActivationCache:
    """Crossing tensors of every calibration batch: name -> one array per batch.

    Arrays stay in memory until their total passes `spill_bytes`; later ones
    are written to `directory` and read back memory-mapped.
    """

    def __init__(self, num_batches: int, spill_bytes: int, directory: Path | None) -> None:
        self.num_batches = num_batches
        self.spill_bytes = spill_bytes
        self._directory = directory
        self._owns_directory = False
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._files: dict[str, list[Path]] = {}
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_bytes = 0
        self._counter = 0

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def add(self, name: str, batch: int, array: np.ndarray) -> None:
        """Store tensor `name` of batch `batch` (batches are added in order)."""
        arrays = self._arrays.setdefault(name, [])
        if len(arrays) != batch:
            raise ValueError(f"activation cache: batch {batch} of '{name}' added out of order")
        if self.memory_bytes + array.nbytes > self.spill_bytes and array.nbytes > 0:
            path = self._next_path()
            np.save(path, np.ascontiguousarray(array))
            self._files.setdefault(name, []).append(path)
            self.spilled_bytes += array.nbytes
            arrays.append(np.load(path, mmap_mode="r"))
        else:
            self.memory_bytes += array.nbytes
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            arrays.append(array)

    def get(self, name: str, batch: int) -> np.ndarray:
        return self._arrays[name][batch]

    def drop(self, name: str) -> None:
        """Forget `name` (its last reader has run); spilled files are deleted."""
        for array in self._arrays.pop(name, []):
            if not isinstance(array, np.memmap):
                self.memory_bytes -= array.nbytes
        for path in self._files.pop(name, []):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self._arrays):
            self.drop(name)
        if self._owns_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def _next_path(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="onnx-gptq-seq-"))
            self._owns_directory = True
        self._directory.mkdir(parents=True, exist_ok=True)
        self._counter += 1
        return self._directory / f"act_{self._counter:06d}.npy"


__all__ = ["ActivationCache"]
