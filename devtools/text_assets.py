"""Text from other domains than the State of the Union, from Debian packages.

Calibration studies need text from a domain unlike the evaluation text:

* Jane Austen's six novels (public domain), in Debian's ``r-cran-janeaustenr``:
  each novel is one character vector in R's lazy-load database
  ``data/Rdata.rdb`` (zlib-compressed records of R's XDR serialization), read
  here by :func:`read_rdb_strings` without R;
* the Python 3.11 tutorial's reStructuredText sources, in Debian's
  ``python3.11-doc`` (``html/_sources/tutorial/*.rst.txt``; PSF licence), cut
  into prose sentences by :func:`rst_sentences`.

Packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb
-x`` into the asset cache (:func:`devtools.assets.cache_root`); every function
is idempotent and fetches nothing once its files are there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from devtools.assets import AssetError, cache_root, run_fetch

logger = logging.getLogger(__name__)

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_TUTORIAL = "usr/share/doc/python3.11/html/_sources/tutorial"
#: Sentences shorter or longer than this (in words) are left out of :func:`rst_sentences`.
SENTENCE_WORDS = (6, 60)

_R_STRSXP = 16
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``|`([^`<]*?)(?:\s*<[^>]*>)?`_*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_UNDERLINE = re.compile(r"^([=\-~^*#+\"'])\1{2,}\s*$")


def _deb_tree(package: str, root: Path) -> Path:
    """``<cache>/deb/<package>/``: the package unpacked, fetched once with apt-get download."""
    target = root / "deb" / package
    if target.is_dir() and any(target.iterdir()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as scratch:
        run_fetch(["apt-get", "download", package], package, "Debian", cwd=scratch)
        debs = sorted(Path(scratch).glob("*.deb"))
        if len(debs) != 1:
            raise AssetError(f"apt-get download {package} produced {len(debs)} .deb files, expected one")
        unpacked = Path(scratch) / "tree"
        run_fetch(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], debs[0].name, "the .deb file")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    logger.info("%s unpacked at %s", package, target)
    return target


def read_rdb_strings(data: bytes, origin: str) -> list[list[str]]:
    """The character vectors of an R lazy-load database, in file order.

    Args:
        data: the ``.rdb`` file's bytes: records of a 4-byte big-endian length and
            a zlib stream of R's XDR serialization (format 2 or 3).
        origin: the file's name, for messages.

    Returns:
        One list of strings per record that is a character vector (NA as "");
        other records are skipped.

    Raises:
        AssetError: a record is not zlib data or not XDR serialization.
    """
    vectors: list[list[str]] = []
    pos = 0
    while pos + 4 < len(data):
        inflate = zlib.decompressobj()
        try:
            blob = inflate.decompress(data[pos + 4:])
        except zlib.error as exc:
            raise AssetError(f"{origin}: record at byte {pos} is not zlib data ({exc})") from exc
        pos = len(data) - len(inflate.unused_data)
        if blob[:2] != b"X\n":
            raise AssetError(f"{origin}: record is not R's XDR serialization")
        version, at = struct.unpack(">i", blob[2:6])[0], 14  # format, writer, min reader
        if version == 3:
            at += 4 + struct.unpack(">i", blob[at:at + 4])[0]  # native encoding name
        if len(blob) < at + 8 or blob[at + 3] != _R_STRSXP:  # the low byte of the flags is the type
            continue
        count = struct.unpack(">i", blob[at + 4:at + 8])[0]
        at += 8
        strings: list[str] = []
        for _ in range(count):  # each a CHARSXP: flags, length (-1 for NA), bytes
            length = struct.unpack(">i", blob[at + 4:at + 8])[0]
            at += 8
            strings.append(blob[at:at + length].decode("utf-8", "replace") if length >= 0 else "")
            at += max(length, 0)
        vectors.append(strings)
    return vectors


def austen_novels(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Jane Austen's six novels, fetched once from Debian.

    Args:
        cache_dir: see :func:`devtools.assets.cache_root`.

    Returns:
        Title (the novel's first line, e.g. "EMMA") -> its text, lines joined by
        newlines (paragraphs separated by blank lines).

    Raises:
        AssetError: apt-get/dpkg-deb fail or the package holds no novels.
    """
    rdb = _deb_tree(AUSTEN_PACKAGE, cache_root(cache_dir)) / AUSTEN_RDB
    if not rdb.is_file():
        raise AssetError(f"{AUSTEN_PACKAGE} has no {AUSTEN_RDB}")
    novels = {}
    for lines in read_rdb_strings(rdb.read_bytes(), rdb.name):
        title = next((ln.strip() for ln in lines if ln.strip()), "")
        if title:
            novels[title] = "\n".join(lines).strip()
    if not novels:
        raise AssetError(f"{rdb} holds no character vectors")
    return novels


def austen_text_file(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """:func:`austen_novels` joined by blank lines into ``<cache>/austen/austen.txt`` (for command lines)."""
    text = "\n\n".join(austen_novels(cache_dir).values())
    path = cache_root(cache_dir) / "austen" / "austen.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _prose_paragraphs(rst: str) -> list[str]:
    """The prose paragraphs of a reST file: no directives, code, headings, tables or prompts."""
    paragraphs, current, in_block = [], [], False
    for line in rst.splitlines() + [""]:
        stripped = line.strip()
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        indented = line[:1].isspace()
        if in_block and indented:
            continue  # body of a directive or literal block
        in_block = False
        if stripped.startswith(".. ") or stripped.endswith("::"):
            in_block = True  # the indented lines after it are not prose
            if stripped.endswith("::") and not stripped.startswith(".."):
                current.append(stripped[:-1])  # "as follows::" reads "as follows:"
            continue
        if indented or _UNDERLINE.match(stripped) or stripped.startswith((">>>", "...", "|", "+-", "* ", "- ")):
            current = [] if _UNDERLINE.match(stripped) else current
            continue
        current.append(stripped)
    return paragraphs


def rst_sentences(rst: str) -> list[str]:
    """The prose sentences of a reST text, markup removed.

    Args:
        rst: reStructuredText source.

    Returns:
        Sentences of SENTENCE_WORDS words, in order: roles (``:func:`len```)
        and literals (````x````) reduced to their text, directives, code blocks,
        headings, lists and tables dropped.
    """
    out = []
    for paragraph in _prose_paragraphs(rst):
        text = _ROLE.sub(r"\1", paragraph)
        text = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1] and sentence.rstrip()[-1:] in ".!?":
                out.append(" ".join(words))
    return out


def python_doc_sentences(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Prose sentences of the Python 3.11 tutorial, fetched once from Debian.

    Args:
        cache_dir: see :func:`devtools.assets.cache_root`.

    Returns:
        The distinct sentences of ``tutorial/*.rst.txt`` (files in name order),
        see :func:`rst_sentences`.

    Raises:
        AssetError: apt-get/dpkg-deb fail or the package has no tutorial sources.
    """
    folder = _deb_tree(PYDOC_PACKAGE, cache_root(cache_dir)) / PYDOC_TUTORIAL
    files = sorted(folder.glob("*.rst.txt"))
    if not files:
        raise AssetError(f"{PYDOC_PACKAGE} has no {PYDOC_TUTORIAL}/*.rst.txt")
    sentences = (s for path in files for s in rst_sentences(path.read_text(encoding="utf-8")))
    return list(dict.fromkeys(sentences))


__all__ = ["austen_novels", "austen_text_file", "python_doc_sentences", "read_rdb_strings", "rst_sentences"]
