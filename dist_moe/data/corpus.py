"""Corpus discovery: turn `data.corpus` into an ordered list of UTF-8 documents.

Five sources: `stdlib` (the running interpreter's standard library sources: tens of MB of real text on
every machine, no download), `site-packages` (the Python sources of every installed package: hundreds of
MB where torch and its peers are installed, for runs that would repeat the stdlib), a text file (documents
separated by blank lines), a folder (every text-like file, recursively) or a `.jsonl` file (one document
per line, in its `text` field). The order is deterministic (sorted paths, then file order), reading stops
at `max_corpus_mb`, symlinked folders are followed (each real folder once), and files that are not UTF-8
text are skipped and named. `\\r\\n` line ends are read as `\\n`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import site
import sysconfig
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a relative path, `book.txt#12` (paragraph), `data.jsonl:7` (line)
    text: str


@dataclass
class Corpus:
    """The documents read from `source`, in a deterministic order, plus the files skipped on the way."""

    source: str
    documents: list[Document]
    num_bytes: int  # UTF-8 size of all document texts
    skipped: list[str] = field(default_factory=list)  # files that are not UTF-8 text

    def content_hash(self) -> str:
        """sha256 over names and texts: the cache key of everything derived from this corpus."""
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
        return h.hexdigest()

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} file(s) skipped, not UTF-8 text: {_some(self.skipped)}" if self.skipped else ""
        return f"corpus {self.source}: {len(self.documents)} documents, {self.num_bytes / 1e6:.1f} MB{skipped}"


def _some(names: list[str], shown: int = 3) -> str:
    """The first few names, then how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class _Budget:
    """Bytes of text still allowed under max_corpus_mb (unlimited when max_mb <= 0)."""

    def __init__(self, max_mb: float):
        self.left: Optional[int] = int(max_mb * 1e6) if max_mb > 0 else None

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0

    @property
    def read_limit(self) -> int:
        return -1 if self.left is None else self.left

    def take(self, text: str) -> str:
        """`text`, cut to the bytes left (never inside a character), and charged to the budget."""
        if self.left is None:
            return text
        data = text.encode()
        if len(data) > self.left:
            data = data[: self.left]
            text = data.decode("utf-8", errors="ignore")  # drops only a cut trailing character
        self.left -= len(data)
        return text


def load_corpus(spec: str, max_mb: float = 0.0) -> Corpus:
    """Read the corpus named by `data.corpus`: 'stdlib', 'site-packages', a text file, a folder or a .jsonl file."""
    budget = _Budget(max_mb)
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs, skipped = _read_tree(root, STDLIB_SUFFIXES, _stdlib_skips_dir, budget)
        source = f"stdlib ({root})"
    elif spec == "site-packages":
        docs, skipped = [], []
        for root in site_packages_dirs():
            more_docs, more_skipped = _read_tree(root, (".py",), _is_hidden_dir, budget)
            docs += [Document(f"{root.name}/{d.name}", d.text) for d in more_docs]
            skipped += [f"{root.name}/{name}" for name in more_skipped]
        source = f"site-packages ({', '.join(map(str, site_packages_dirs()))})"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"corpus '{spec}': no such file or folder (expected 'stdlib', 'site-packages', "
                            "a text file, a folder or a .jsonl file)")
        if path.is_dir():
            if next(_walk(path, path, TEXT_SUFFIXES, _is_hidden_dir), None) is None:
                raise DataError(f"corpus '{spec}': folder has no text files ({', '.join(TEXT_SUFFIXES[:6])}, ...)")
            docs, skipped = _read_tree(path, TEXT_SUFFIXES, _is_hidden_dir, budget)
        elif path.suffix == ".jsonl":
            docs, skipped = list(_read_jsonl(path, budget)), []
        else:
            docs, skipped = _read_text_file(path, budget), []
        source = str(path)
    if not docs:
        reason = f"not UTF-8 text: {_some(skipped)}; the rest are empty" if skipped else "empty"
        raise DataError(f"corpus '{spec}': no usable text ({reason})")
    num_bytes = sum(len(d.text.encode()) for d in docs)
    return Corpus(source=source, documents=docs, num_bytes=num_bytes, skipped=skipped)


def site_packages_dirs() -> list[Path]:
    """The interpreter's package folders, those that exist: a venv's own, then the system's when the venv
    sees them (`site.getsitepackages()`; purelib and platlib where site does not know them)."""
    paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return [Path(p) for p in dict.fromkeys(paths) if Path(p).is_dir()]


def _stdlib_skips_dir(rel: Path) -> bool:
    in_tests = any(part in ("test", "tests") for part in rel.parts[:-1])
    return (rel.name in _STDLIB_SKIP_DIRS or rel.name.startswith("config-")
            or (in_tests and "data" in rel.name))


def _is_hidden_dir(rel: Path) -> bool:
    return rel.name.startswith(".") or rel.name == "__pycache__"


def _read_tree(root: Path, suffixes: tuple[str, ...], skip_dir: Callable[[Path], bool],
               budget: _Budget) -> tuple[list[Document], list[str]]:
    """Every file under `root` with one of `suffixes`, in sorted path order, until the budget is spent."""
    docs, skipped = [], []
    for path in sorted(_walk(root, root, suffixes, skip_dir)):
        if budget.exhausted:
            break
        text = _read_text(path, budget.read_limit)
        rel = path.relative_to(root).as_posix()
        if text is None:
            skipped.append(rel)
        elif text.strip():
            docs.append(Document(rel, budget.take(text)))
    return docs, skipped


def _walk(root: Path, folder: Path, suffixes: tuple[str, ...], skip_dir: Callable[[Path], bool],
          seen: Optional[set[Path]] = None) -> Iterator[Path]:
    """Files under `folder`, symlinked folders followed; each real folder is read once, which ends link cycles
    (sorted entries, so which of two links to one folder is read does not depend on the file system)."""
    seen = set() if seen is None else seen
    if folder.resolve() in seen:
        return
    seen.add(folder.resolve())
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if not skip_dir(entry.relative_to(root)):
                yield from _walk(root, entry, suffixes, skip_dir, seen)
        elif entry.is_file() and entry.suffix in suffixes:
            yield entry


def _read_text(path: Path, limit: int) -> Optional[str]:
    """The file's text (at most `limit` bytes, -1 = all), or None if it is not UTF-8 text."""
    with open(path, "rb") as f:
        raw = f.read(limit)
        cut = limit >= 0 and len(raw) == limit and f.read(1) != b""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)  # a cut char is dropped
    except UnicodeDecodeError:
        return None
    if "\0" in text:  # decodes, but binary
        return None
    return text.replace("\r\n", "\n")


def _read_text_file(path: Path, budget: _Budget) -> list[Document]:
    text = _read_text(path, budget.read_limit)
    if text is None:
        raise DataError(f"corpus '{path}': not UTF-8 text")
    paragraphs = re.split(r"\n(?:[ \t]*\n)+", text)
    return [Document(f"{path.name}#{i}", p) for i, p in enumerate(paragraphs) if p.strip()]


def _read_jsonl(path: Path, budget: _Budget) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if budget.exhausted:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"corpus '{path}' line {lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"corpus '{path}' line {lineno}: not valid JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"corpus '{path}' line {lineno}: expected a JSON object with a string "
                                "'text' field")
            if text.strip():
                yield Document(f"{path.name}:{lineno}", budget.take(text.replace("\r\n", "\n")))
