"""The embedded corpora and the folder walk every source uses.

`stdlib` (the running interpreter's standard library sources: tens of MB of real text on every machine, no
download) and `site-packages` (the Python sources of every installed package: hundreds of MB where torch
and its peers are installed). `walk` lists a folder's files in sorted order, following symlinked folders
(each real folder once); `read_text` reads one file as UTF-8 text, or None when it is not text.
"""

from __future__ import annotations

import codecs
import site
import sysconfig
from pathlib import Path
from typing import Callable, Iterator, Optional

from dist_moe.errors import UserError

STDLIB_SUFFIXES = (".py", ".txt", ".rst")
TEXT_SUFFIXES = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".html", ".css", ".json", ".yaml", ".yml", ".toml", ".ini", ".csv",
)
# stdlib folders that hold no prose or code worth learning from: third-party packages, bytecode, C
# extensions, build config, and the test suite's data folders (legacy encodings, binary fixtures).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "cjkencodings",
                     "encoded_modules"}


class DataError(UserError, ValueError):
    """A user-facing data problem; the message is one line naming the path and what was expected."""


def embedded_roots(spec: str) -> list[tuple[Path, tuple[str, ...], Callable[[Path], bool]]]:
    """(folder, suffixes, skip_dir) for 'stdlib' or 'site-packages'; [] for anything else."""
    if spec == "stdlib":
        return [(Path(sysconfig.get_paths()["stdlib"]), STDLIB_SUFFIXES, _stdlib_skips_dir)]
    if spec == "site-packages":
        return [(root, (".py",), is_hidden_dir) for root in site_packages_dirs()]
    return []


def site_packages_dirs() -> list[Path]:
    """The interpreter's package folders, those that exist: a venv's own, then the system's when the venv
    sees them (`site.getsitepackages()`; purelib and platlib where site does not know them)."""
    paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [Path(p) for p in dict.fromkeys(paths) if Path(p).is_dir()]


def _stdlib_skips_dir(rel: Path) -> bool:
    in_tests = any(part in ("test", "tests") for part in rel.parts[:-1])
    return (rel.name in _STDLIB_SKIP_DIRS or rel.name.startswith("config-")
            or (in_tests and "data" in rel.name))


def is_hidden_dir(rel: Path) -> bool:
    return rel.name.startswith(".") or rel.name == "__pycache__"


def walk(root: Path, folder: Path, keep: Callable[[Path], bool], skip_dir: Callable[[Path], bool],
         seen: Optional[set[Path]] = None) -> Iterator[Path]:
    """Files under `folder` that `keep`, symlinked folders followed; each real folder is read once, which ends
    link cycles (sorted entries, so which of two links to one folder is read does not depend on the file system)."""
    seen = set() if seen is None else seen
    if folder.resolve() in seen:
        return
    seen.add(folder.resolve())
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if not skip_dir(entry.relative_to(root)):
                yield from walk(root, entry, keep, skip_dir, seen)
        elif entry.is_file() and keep(entry):
            yield entry


def read_text(path: Path, limit: int = -1) -> Optional[str]:
    """The file's text (at most `limit` bytes, -1 = all; a character cut at the limit is dropped), or None if
    it is not UTF-8 text. `\\r\\n` line ends are read as `\\n`."""
    with open(path, "rb") as f:
        raw = f.read(limit)
        cut = limit >= 0 and len(raw) == limit and f.read(1) != b""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError:
        return None
    if "\0" in text:  # decodes, but binary
        return None
    return text.replace("\r\n", "\n")
