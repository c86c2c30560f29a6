"""Two small sources of real text in the formats big corpora come in, for the README's mixture tour and its
test: `web.jsonl.zst` (one JSON document per line, zstd-compressed: the standard library's modules) and
`books/` (a Parquet folder whose `body` column holds the paragraphs of the standard library's .txt and .rst
files, in row groups).

    python tests/data/example_sources.py DIR [--mb 2]
"""

import argparse
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard


def stdlib_files(suffixes: tuple[str, ...]) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and "site-packages" not in p.parts
                  and "test" not in p.parts and p.is_file())


def write_example_sources(out: Path, mb: float = 2.0) -> tuple[Path, Path]:
    """DIR/web.jsonl.zst and DIR/books/ (Parquet), about `mb` MB of text each; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    lines, size = [], 0
    for path in stdlib_files((".py",)):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if size >= mb * 1e6:
            break
        lines.append(json.dumps({"text": text, "url": path.name}))
        size += len(text)
    web = out / "web.jsonl.zst"
    web.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    paragraphs, size = [], 0
    for path in stdlib_files((".txt", ".rst")):
        for paragraph in path.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
            if paragraph.strip() and size < mb * 1e6:
                paragraphs.append(paragraph)
                size += len(paragraph)
    books = out / "books"
    books.mkdir(exist_ok=True)
    half = len(paragraphs) // 2
    for i, part in enumerate((paragraphs[:half], paragraphs[half:])):
        pq.write_table(pa.table({"body": part}), books / f"part-{i}.parquet", row_group_size=2000)
    return web, books


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text in each source")
    args = parser.parse_args()
    for path in write_example_sources(args.out_dir, args.mb):
        print(path)
