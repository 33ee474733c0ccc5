"""devtools.text_assets with a fake apt-get / dpkg-deb (no network): R database parsing, reST sentences."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from devtools import assets, text_assets
from devtools.assets import AssetError

NOVELS = [["EMMA", "By Jane Austen", "", "Emma Woodhouse, handsome, clever, and rich."],
          ["Persuasion", "", "Sir Walter Elliot, of Kellynch Hall."]]
TUTORIAL = """\
An Informal Introduction
========================

In the following examples, input and output are distinguished by the presence
of prompts. You can use the ``len`` function, see :func:`len`, as follows::

   >>> len("abc")
   3

.. note::

   This note is a directive body and never a sentence of prose.

* A list item is not prose and is dropped here.

Short one. The :ref:`tutorial <tut-informal>` then continues with longer sentences like this one!
"""


def _xdr_strings(strings: list[str], version: int = 3) -> bytes:
    """R's XDR serialization of a character vector (what the .rdb records hold)."""
    head = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        head += struct.pack(">i", 5) + b"UTF-8"
    body = struct.pack(">ii", 16, len(strings))  # STRSXP
    for s in strings:
        raw = s.encode()
        body += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return head + body


def _rdb(records: list[bytes]) -> bytes:
    return b"".join(struct.pack(">i", len(r)) + zlib.compress(r) for r in records)


class FakeApt:
    """Stands in for subprocess.run: apt-get download writes a .deb, dpkg-deb -x a tree."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        self.calls.append(list(command))
        if self.fail:
            return subprocess.CompletedProcess(command, 100, "", self.fail)
        if command[:2] == ["apt-get", "download"]:
            Path(str(kwargs["cwd"]), f"{command[2]}_1.0_all.deb").write_bytes(b"!<arch>\n")
        elif command[:2] == ["dpkg-deb", "-x"]:
            tree = Path(command[3])
            if "janeaustenr" in command[2]:
                rdb = tree / text_assets.AUSTEN_RDB
                rdb.parent.mkdir(parents=True)
                other = b"X\n" + struct.pack(">iiii", 2, 0, 0, 13)  # an integer vector: skipped
                rdb.write_bytes(_rdb([_xdr_strings(NOVELS[0]), other, _xdr_strings(NOVELS[1], version=2)]))
            else:
                folder = tree / text_assets.PYDOC_TUTORIAL
                folder.mkdir(parents=True)
                (folder / "introduction.rst.txt").write_text(TUTORIAL)
        else:
            raise AssertionError(f"unexpected command {command}")
        return subprocess.CompletedProcess(command, 0, "", "")


@pytest.fixture
def apt(monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    fake = FakeApt()
    monkeypatch.setattr(assets.subprocess, "run", fake)
    return fake


def test_austen_novels_from_the_r_database(apt: FakeApt, tmp_path: Path) -> None:
    novels = text_assets.austen_novels(tmp_path)

    assert list(novels) == ["EMMA", "Persuasion"]
    assert novels["EMMA"] == "EMMA\nBy Jane Austen\n\nEmma Woodhouse, handsome, clever, and rich."
    path = text_assets.austen_text_file(tmp_path)
    assert path.read_text().endswith("\n\nPersuasion\n\nSir Walter Elliot, of Kellynch Hall.")
    assert text_assets.austen_novels(tmp_path) == novels
    assert [c[0] for c in apt.calls] == ["apt-get", "dpkg-deb"]  # fetched once
    assert not list(tmp_path.glob(".download-*"))


def test_python_doc_sentences_are_prose_only(apt: FakeApt, tmp_path: Path) -> None:
    sentences = text_assets.python_doc_sentences(tmp_path)

    assert sentences == [
        "In the following examples, input and output are distinguished by the presence of prompts.",
        "You can use the len function, see len, as follows:",  # dropped: no end mark
        "The tutorial then continues with longer sentences like this one!",
    ][::2]


def test_bad_database_and_unreachable_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="x.rdb: record at byte 0 is not zlib data"):
        text_assets.read_rdb_strings(b"\x00\x00\x00\x05not zlib", "x.rdb")
    monkeypatch.setattr(assets.subprocess, "run",
                        FakeApt(fail="E: Unable to locate package r-cran-janeaustenr"))
    with pytest.raises(AssetError, match=r"from Debian \(is the registry reachable\?\): E: Unable to locate"):
        text_assets.austen_novels(tmp_path)
    assert not (tmp_path / "deb" / text_assets.AUSTEN_PACKAGE).exists()
