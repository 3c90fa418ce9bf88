"""Files written whole or not at all, their checksums, and text files read strictly.

A write goes to a temp file with a unique name beside its target and is renamed over it, so a reader
never sees half a file and two processes writing the same target never share a temp file. Nothing
here imports torch: the reporting layer uses it too.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, then rename the temp file to ``path``; on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """A text file's content as UTF-8, without a leading byte-order mark (which Windows tools write
    and which would otherwise stick to the first caption or image name).

    A file that is not UTF-8 raises ``ValueError`` naming the file, the line and the byte offset of
    the first bad byte, so the one bad caption can be found and fixed."""
    data = Path(path).read_bytes()
    # Decoding after the mark ourselves (rather than with "utf-8-sig") keeps the byte offset of an
    # error counted from the start of the file.
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"{path} line {line} (byte {offset}) is not UTF-8: {data[offset:start + error.end]!r} "
            "(save the file as UTF-8)"
        ) from None


def read_lines(path: Path) -> list[str]:
    """:func:`read_text` split into lines at ``\\n``, ``\\r\\n`` or ``\\r``, as a file opened in text
    mode splits them (``str.splitlines`` would also split inside a caption at characters such as
    U+2028 or U+0085)."""
    return read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
