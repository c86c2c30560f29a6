"""Sources: the files one `data.sources` entry names, and the documents streamed out of one of them.

A source path is `stdlib`, `site-packages`, a file, a folder or a glob. Formats, by file name: text and code
files (one document per file; a text file named directly holds documents separated by blank lines),
`.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one document per line, in its `text_key` field), `.parquet` (the
`text_key` column, read row group by row group) and `.arrow` (the files of a Hugging Face `save_to_disk`
folder, read batch by batch). Nothing reads a whole file into memory except a text file that is one document.
Files are listed in sorted order; `max_mb` keeps the first files up to that many MB on disk (the last one cut
where its format allows: text, plain `.jsonl`, Parquet by row group).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from dist_moe.data.corpus import DataError, TEXT_SUFFIXES, embedded_roots, is_hidden_dir, read_text, walk

_BATCH_ROWS = 1024  # Parquet / Arrow rows read at a time
_HF_META = ("state.json", "dataset_info.json", "dataset_dict.json")  # save_to_disk's own files, not documents


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0
    text_key: str = "text"


def sources_of(cfg) -> list[Source]:
    """`data.sources`, or `data.corpus` as the one source when that list is empty."""
    if cfg.sources:
        return [Source(str(s.path), float(s.weight), str(s.text_key)) for s in cfg.sources]
    return [Source(cfg.corpus)]


def source_names(sources: list[Source]) -> list[str]:
    """Short distinct names for logs and metrics: the last path component before any glob, without its
    suffixes (`/data/web/*.jsonl.zst` -> web, `wiki.parquet` -> wiki); a repeated name gets `-<index>`."""
    names = []
    for index, source in enumerate(sources):
        parts = Path(source.path).parts
        plain = parts[:next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]
        name = (plain[-1] if plain else "source").split(".")[0] or "source"
        names.append(f"{name}-{index}" if name in names else name)
    return names


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute
    kind: str  # text | paragraphs | jsonl | parquet | arrow
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of a file: the documents that begin there (text, plain .jsonl and Parquet, by the
    offset of each row group, can be cut; any other part is the whole file)."""

    file: SourceFile
    start: int
    end: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end >= self.file.size


def file_kind(path: Path) -> Optional[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "text" if path.suffix in TEXT_SUFFIXES else None


def list_parts(source: Source, max_mb: float = 0.0) -> list[Part]:
    """The source's files in sorted order, as parts, the first `max_mb` MB of them (0 = all)."""
    files = [_stat(p, kind) for p, kind in _list_paths(source)]
    if not files:
        raise DataError(f"source '{source.path}': no readable files (text, .jsonl(.gz/.zst), .parquet, .arrow)")
    left = int(max_mb * 1e6) if max_mb > 0 else None
    parts = []
    for f in files:
        if left is not None and left <= 0:
            break
        cuttable = f.kind in ("text", "paragraphs", "parquet") or f.path.endswith(".jsonl")
        end = min(f.size, left) if left is not None and cuttable else f.size
        parts.append(Part(f, 0, end))
        left = None if left is None else left - end
    return parts


def _stat(path: Path, kind: str) -> SourceFile:
    st = path.stat()
    return SourceFile(str(path.resolve()), kind, st.st_size, st.st_mtime_ns)


def _list_paths(source: Source) -> list[tuple[Path, str]]:
    roots = embedded_roots(source.path)
    if roots:
        return [(p, "text") for root, suffixes, skip in roots
                for p in walk(root, root, lambda p, s=suffixes: p.suffix in s, skip)]
    path = Path(source.path).expanduser()
    if glob.has_magic(source.path):
        matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        if not matches:
            raise DataError(f"source '{source.path}': the pattern matches no file")
        return [item for m in matches for item in _paths_under(m, named=False)]
    if not path.exists():
        raise DataError(f"source '{source.path}': no such file or folder (expected 'stdlib', 'site-packages', "
                        "a file, a folder or a glob)")
    return _paths_under(path, named=True)


def _paths_under(path: Path, named: bool) -> list[tuple[Path, str]]:
    """A folder's document files, or the file itself; a text file `named` directly holds paragraphs."""
    if path.is_dir():
        keep = lambda p: file_kind(p) is not None and not _is_hf_meta(p)  # noqa: E731
        return [(p, file_kind(p)) for p in walk(path, path, keep, is_hidden_dir)]
    kind = file_kind(path)
    if kind is None and not named:
        return []
    return [(path, "paragraphs" if kind in (None, "text") and named else kind)]


def _is_hf_meta(path: Path) -> bool:
    return path.name in _HF_META and any((path.parent / name).is_file() for name in ("state.json", "dataset_dict.json"))


def read_documents(part: Part, text_key: str, skipped: Optional[list[str]] = None) -> Iterator[str]:
    """The non-empty documents of `part`, in file order, `\\r\\n` read as `\\n`. A text file that is not UTF-8
    is appended to `skipped`; any other malformed input raises a DataError naming the file (and line)."""
    f = part.file
    if f.kind == "text":
        text = read_text(Path(f.path), -1 if part.whole else part.end)
        if text is None:
            if skipped is not None:
                skipped.append(f.path)
        elif text.strip():
            yield text
        return
    reader = {"paragraphs": _paragraphs, "jsonl": _jsonl_lines, "parquet": _parquet, "arrow": _arrow}[f.kind]
    for text in reader(part, text_key):
        if text.strip():
            yield text.replace("\r\n", "\n")


def _paragraphs(part: Part, text_key: str) -> Iterator[str]:
    """Runs of lines separated by blank lines (only spaces or tabs), streamed line by line."""
    lines: list[str] = []
    with open(part.file.path, "rb") as fh:
        for lineno, raw in enumerate(_lines_until(fh, part.end, cut=True), start=1):
            line = _decode(raw, part.file.path, lineno)
            if line.strip(" \t\r\n"):
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\r\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n")


def _lines_until(fh, end: int, cut: bool) -> Iterator[bytes]:
    """Lines of a binary file from its position while they start before byte `end`; with `cut`, the last
    one ends at `end` (a budget), else it is whole (a range: the next part starts after it)."""
    pos = fh.tell()
    for raw in fh:
        if pos >= end:
            return
        yield raw[: end - pos] if cut else raw
        pos += len(raw)


def _jsonl_lines(part: Part, text_key: str) -> Iterator[str]:
    """Each line's `text_key`. A part that starts inside the file begins at the first line starting at or
    after `start` (errors then name the byte offset, as the line number is unknown)."""
    path = part.file.path
    with _open_binary(path) as fh:
        if part.start > 0:
            fh.seek(part.start - 1)
            fh.readline()  # the rest of the line that holds byte start - 1: it belongs to the part before
        first = fh.tell()
        ranged = part.end < part.file.size and path.endswith(".jsonl")
        lines = _lines_until(fh, part.end, cut=False) if ranged else fh
        for lineno, raw in enumerate(lines, start=1):
            where = f"line {lineno}" if part.start == 0 else f"line {lineno} after byte {first}"
            line = _decode(raw, path, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"source file '{path}' {where}: not valid JSON ({exc.msg})") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"source file '{path}' {where}: expected a JSON object with a string "
                                f"'{text_key}' field (set text_key in data.sources)")
            yield text


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decode(raw: bytes, path: str, where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        where = f"line {where}" if isinstance(where, int) else where
        raise DataError(f"source file '{path}' {where}: not UTF-8 text") from None


def _parquet(part: Part, text_key: str) -> Iterator[str]:
    """The row groups whose data begins in [start, end), batch by batch."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(part.file.path)
    _check_column(table.schema_arrow.names, text_key, part.file.path)
    groups = [i for i in range(table.metadata.num_row_groups)
              if part.start <= _row_group_offset(table.metadata.row_group(i)) < part.end]
    if not groups:
        return
    for batch in table.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=[text_key]):
        yield from _strings(batch.column(0).to_pylist())


def _row_group_offset(row_group) -> int:
    column = row_group.column(0)
    offsets = [o for o in (column.dictionary_page_offset, column.data_page_offset) if o]
    return min(offsets) if offsets else column.file_offset


def _arrow(part: Part, text_key: str) -> Iterator[str]:
    """An Arrow IPC stream (what `datasets` writes) or file, batch by batch, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(part.file.path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        file_reader = pa.ipc.open_file(source)
        reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        _check_column(file_reader.schema.names, text_key, part.file.path)
    else:
        _check_column(reader.schema.names, text_key, part.file.path)
    for batch in reader:
        yield from _strings(batch.column(batch.schema.get_field_index(text_key)).to_pylist())


def _check_column(names: list[str], text_key: str, path: str) -> None:
    if text_key not in names:
        raise DataError(f"source file '{path}': no column '{text_key}' (columns: {', '.join(names)}; "
                        "set text_key in data.sources)")


def _strings(values: list) -> Iterator[str]:
    return (v for v in values if isinstance(v, str))


def iter_source(path: str, max_mb: float = 0.0, text_key: str = "text") -> Iterator[tuple[str, str]]:
    """(file path, document) for every document of one source, in order: for scripts and tests that want
    texts (the DPO demo, tokenizer parity), not token shards."""
    for part in list_parts(Source(path, 1.0, text_key), max_mb):
        for text in read_documents(part, text_key):
            yield part.file.path, text
