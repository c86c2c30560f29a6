import gzip
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dist_moe.data.corpus import DataError, site_packages_dirs
from dist_moe.data.sources import Part, Source, list_parts, read_documents

TEXTS = ["first document\nwith two lines\n", "zweite: Grüße 🙂", "third\r\nwith CRLF\r\n", "  indented code\n"]
EXPECTED = [t.replace("\r\n", "\n") for t in TEXTS]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def documents(path, text_key="text", max_mb=0.0) -> list[str]:
    source = Source(str(path), 1.0, text_key)
    return [d for part in list_parts(source, max_mb) for d in read_documents(part, text_key)]


def jsonl(key="text") -> bytes:
    return "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(TEXTS)).encode()


def test_jsonl_plain_gzip_and_zstd_give_the_same_documents(tmp_path):
    write(tmp_path / "a.jsonl", jsonl())
    write(tmp_path / "b.jsonl.gz", gzip.compress(jsonl()))
    write(tmp_path / "c.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl()))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        assert documents(tmp_path / name) == EXPECTED
    assert documents(tmp_path) == EXPECTED * 3  # a folder: every file, sorted
    assert documents(tmp_path / "*.jsonl*") == EXPECTED * 3  # a glob


def test_jsonl_text_key_picks_the_field(tmp_path):
    assert documents(write(tmp_path / "a.jsonl", jsonl("content")), text_key="content") == EXPECTED


def test_parquet_file_and_folder_read_the_text_key_column_across_row_groups(tmp_path):
    table = pa.table({"id": list(range(len(TEXTS))), "body": TEXTS})
    (tmp_path / "p").mkdir()
    pq.write_table(table, tmp_path / "p" / "x.parquet", row_group_size=1)
    assert pq.ParquetFile(tmp_path / "p" / "x.parquet").num_row_groups == len(TEXTS)
    assert documents(tmp_path / "p" / "x.parquet", text_key="body") == EXPECTED
    assert documents(tmp_path / "p", text_key="body") == EXPECTED


def test_hugging_face_save_to_disk_folders_read_their_arrow_files_only(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS, "n": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "ds"))
    assert documents(tmp_path / "ds") == EXPECTED  # not state.json / dataset_info.json
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
                                   "test": datasets.Dataset.from_dict({"text": TEXTS[2:]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert documents(tmp_path / "dd") == EXPECTED[2:] + EXPECTED[:2]  # sorted: test/ then train/


def test_text_folder_has_one_document_per_file_and_a_named_text_file_has_paragraphs(tmp_path):
    write(tmp_path / "d" / "b.py", TEXTS[3])
    write(tmp_path / "d" / "a.md", TEXTS[0])
    write(tmp_path / "d" / "blank.txt", "\n \n")
    write(tmp_path / "d" / ".hidden" / "x.txt", "hidden")
    write(tmp_path / "d" / "image.png", b"\x89PNG")
    write(tmp_path / "d" / "latin1.txt", "caf\xe9".encode("latin-1"))
    assert documents(tmp_path / "d") == [EXPECTED[0], EXPECTED[3]]
    skipped = []
    parts = list_parts(Source(str(tmp_path / "d")))
    list(d for p in parts for d in read_documents(p, "text", skipped))
    assert [Path(s).name for s in skipped] == ["latin1.txt"]
    book = write(tmp_path / "book.txt", "one\nstill one\n\n \t\ntwo\r\n\n\n\nthree\n")
    assert documents(book) == ["one\nstill one", "two", "three"]


def test_max_mb_keeps_the_first_files_and_cuts_the_last_inside_a_character(tmp_path):
    for i in range(3):
        write(tmp_path / f"f{i}.txt", "é" * 500)  # 1000 bytes each
    docs = documents(tmp_path, max_mb=0.0015)  # f0 whole, f1 cut after 500 bytes, f2 not read
    assert docs == ["é" * 500, "é" * 250]
    assert documents(tmp_path, max_mb=0.0010001) == ["é" * 500]  # 1 byte of f1: half a character, dropped


def test_jsonl_byte_ranges_read_each_line_exactly_once(tmp_path):
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) + "\n" for i in range(50)]
    path = write(tmp_path / "big.jsonl", "".join(lines))
    whole = list_parts(Source(str(path)))[0]
    expected = [json.loads(line)["text"] for line in lines]
    for step in (1, 13, 64, 500, whole.end):
        parts = [Part(whole.file, s, min(s + step, whole.end)) for s in range(0, whole.end, step)]
        assert [d for p in parts for d in read_documents(p, "text")] == expected, step


def test_stdlib_lists_the_interpreters_sources_sorted_without_site_packages():
    parts = list_parts(Source("stdlib"), max_mb=2)
    paths = [p.file.path for p in parts]
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert all(p.endswith((".py", ".txt", ".rst")) and "site-packages" not in p for p in paths)
    assert 1.99e6 < sum(p.end for p in parts) <= 2e6 and Path(paths[0]).is_relative_to(root)
    assert documents("stdlib", max_mb=2)[0] == Path(paths[0]).read_text(encoding="utf-8").replace("\r\n", "\n")


def test_site_packages_lists_the_installed_packages_python_files():
    parts = list_parts(Source("site-packages"), max_mb=1.0)
    assert site_packages_dirs() and all(p.file.path.endswith(".py") for p in parts)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "no such file or folder"),
    (lambda p: p / "*.nothing", "the pattern matches no file"),
    (lambda p: p, "no readable files"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n{"body": "no text"}\n'), "line 2: expected a JSON object"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n\n{"text": 3}\n'), "line 3: expected a JSON object"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n{oops\n'), "line 2: not valid JSON"),
    (lambda p: write(p / "d.jsonl", b'{"text": "ok"}\n\xff\n'), "line 2: not UTF-8 text"),
    (lambda p: write(p / "bin.txt", b"\xff\xfe"), "line 1: not UTF-8 text"),
    (lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "t.parquet") or p / "t.parquet", "no column 'text'"),
])
def test_source_errors_are_one_line_naming_the_file(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError) as info:
        documents(path)
    text = str(info.value)
    assert message in text and "\n" not in text and (path.name in text or "nope" in text or str(tmp_path) in text)


def test_data_sources_from_the_command_line_and_data_corpus_as_the_one_source():
    from dist_moe.config import ConfigError, load_config
    from dist_moe.data.sources import sources_of

    cfg = load_config("tiny", ["data.sources=[{path: /d/*.jsonl.zst, weight: 3}, "
                               "{path: /c, weight: 0, text_key: body}]"])
    assert sources_of(cfg.data) == [Source("/d/*.jsonl.zst", 3.0, "text"), Source("/c", 0.0, "body")]
    assert sources_of(load_config("tiny", ["data.corpus=site-packages"]).data) == [Source("site-packages", 1.0, "text")]
    with pytest.raises(ConfigError, match="data.sources.*at least one weight > 0"):
        load_config("tiny", ["data.sources=[{path: /c, weight: 0}]"])
    with pytest.raises(ConfigError, match="data.sources.*weights >= 0"):
        load_config("tiny", ["data.sources=[{path: /c, weight: -1}]"])


def test_source_names_are_short_and_distinct():
    from dist_moe.data.sources import source_names

    paths = ["/data/web/*.jsonl.zst", "/data/wiki.parquet", "stdlib", "/other/web/**/*.jsonl", "*.txt", "/x/.hidden"]
    assert source_names([Source(p) for p in paths]) == ["web", "wiki", "stdlib", "web-3", "source", "source-5"]


def test_parquet_byte_ranges_read_each_row_group_exactly_once(tmp_path):
    texts = [f"row {i} " + "y" * (i % 11) for i in range(100)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=9)
    whole = list_parts(Source(str(tmp_path / "t.parquet")))[0]
    for step in (1, 100, 333, whole.end):
        parts = [Part(whole.file, s, min(s + step, whole.end)) for s in range(0, whole.end, step)]
        assert [d for p in parts for d in read_documents(p, "text")] == texts, step
