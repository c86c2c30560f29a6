import json
import sysconfig
from pathlib import Path

import pytest

from dist_moe.data.corpus import DataError, load_corpus, site_packages_dirs


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_folder_is_read_recursively_in_sorted_order_with_text_suffixes_only(tmp_path):
    write(tmp_path / "b.txt", "bee\n")
    write(tmp_path / "a" / "z.py", "print('z')\n")
    write(tmp_path / "a" / "y.md", "# why\n")
    write(tmp_path / "image.png", b"\x89PNG\r\n")
    write(tmp_path / ".git" / "HEAD.txt", "ref: main\n")
    write(tmp_path / "c.txt", "  \n\n")  # whitespace only: not a document
    corpus = load_corpus(str(tmp_path))
    assert [d.name for d in corpus.documents] == ["a/y.md", "a/z.py", "b.txt"]
    assert [d.text for d in corpus.documents] == ["# why\n", "print('z')\n", "bee\n"]
    assert corpus.num_bytes == len("# why\nprint('z')\nbee\n")
    assert corpus.skipped == []


def test_text_file_documents_are_separated_by_blank_lines_and_crlf_becomes_lf(tmp_path):
    path = write(tmp_path / "book.txt", b"first para\r\nline two\r\n\r\n\n  \nsecond\n\nthird\n")
    corpus = load_corpus(str(path))
    assert [d.text for d in corpus.documents] == ["first para\nline two", "second", "third\n"]
    assert [d.name for d in corpus.documents] == ["book.txt#0", "book.txt#1", "book.txt#2"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    lines = [json.dumps({"text": "alpha", "id": 1}), "", json.dumps({"text": "béta\r\n"})]
    corpus = load_corpus(str(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")))
    assert [(d.name, d.text) for d in corpus.documents] == [("d.jsonl:1", "alpha"), ("d.jsonl:3", "béta\n")]


def test_max_corpus_mb_caps_the_bytes_read_without_splitting_a_character(tmp_path):
    for i in range(5):
        write(tmp_path / f"f{i}.txt", "é" * 300)  # 600 bytes each
    corpus = load_corpus(str(tmp_path), max_mb=0.001)  # 1000 bytes: f0 whole, f1 cut inside its 200th 'é'
    assert [d.name for d in corpus.documents] == ["f0.txt", "f1.txt"]
    assert corpus.documents[1].text == "é" * 200
    assert corpus.num_bytes == 1000
    single = load_corpus(str(tmp_path / "f2.txt"), max_mb=0.000101)  # 101 bytes: 50 chars, half a char dropped
    assert single.documents[0].text == "é" * 50


def test_undecodable_and_binary_files_are_skipped_and_named(tmp_path):
    write(tmp_path / "good.txt", "fine text\n")
    write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    write(tmp_path / "nul.py", b"abc\x00def")
    corpus = load_corpus(str(tmp_path))
    assert [d.name for d in corpus.documents] == ["good.txt"]
    assert corpus.skipped == ["latin1.txt", "nul.py"]
    assert corpus.describe().endswith("2 file(s) skipped, not UTF-8 text: latin1.txt, nul.py")
    for i in range(4):
        write(tmp_path / f"z{i}.txt", b"\xff")
    assert load_corpus(str(tmp_path)).describe().endswith("latin1.txt, nul.py, z0.txt and 3 more")


def test_symlinked_folders_are_followed_once_and_a_link_cycle_ends(tmp_path):
    corpus_dir, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    write(elsewhere / "shared.txt", "linked text\n")
    write(corpus_dir / "own.txt", "own text\n")
    (corpus_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus_dir / "linked_again").symlink_to(elsewhere, target_is_directory=True)  # read once, as linked/
    (elsewhere / "loop").symlink_to(corpus_dir, target_is_directory=True)  # back to the root: a cycle
    corpus = load_corpus(str(corpus_dir))
    assert [(d.name, d.text) for d in corpus.documents] == [("linked/shared.txt", "linked text\n"),
                                                             ("own.txt", "own text\n")]


def test_content_hash_depends_on_text_and_names(tmp_path):
    write(tmp_path / "a" / "x.txt", "one\n")
    write(tmp_path / "b" / "x.txt", "one\n")
    write(tmp_path / "c" / "y.txt", "one\n")
    hashes = {load_corpus(str(tmp_path / d)).content_hash() for d in "abc"}
    assert len(hashes) == 2  # a == b (same name and text), c differs by name
    write(tmp_path / "b" / "x.txt", "one!\n")
    assert load_corpus(str(tmp_path / "b")).content_hash() != load_corpus(str(tmp_path / "a")).content_hash()


def test_stdlib_corpus_is_the_interpreters_sources_without_site_packages():
    corpus = load_corpus("stdlib", max_mb=2)
    names = [d.name for d in corpus.documents]
    assert names == sorted(names, key=lambda n: Path(n).parts)
    assert all(n.endswith((".py", ".txt", ".rst")) for n in names)
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert 1.9e6 < corpus.num_bytes <= 2e6
    root = Path(sysconfig.get_paths()["stdlib"])
    assert corpus.documents[0].text == (root / names[0]).read_text(encoding="utf-8").replace("\r\n", "\n")


def test_site_packages_corpus_reads_the_installed_packages_python_sources():
    corpus = load_corpus("site-packages", max_mb=2.0)
    roots = site_packages_dirs()
    assert roots and all(root.name in ("site-packages", "dist-packages") for root in roots)
    assert 1.9e6 < corpus.num_bytes <= 2e6 and all(doc.name.endswith(".py") for doc in corpus.documents)
    first = corpus.documents[0]  # sorted order: the first .py file under the first folder, read whole
    expected = min(p for p in roots[0].rglob("*.py") if "__pycache__" not in p.parts
                   and not any(part.startswith(".") for part in p.relative_to(roots[0]).parts[:-1]))
    assert first.name == f"{roots[0].name}/{expected.relative_to(roots[0]).as_posix()}"
    assert first.text == expected.read_text().replace("\r\n", "\n")


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "no such file or folder"),
    (lambda p: p, "folder has no text files"),
    (lambda p: write(p / "empty.txt", ""), "no usable text (empty)"),
    (lambda p: write(p / "sub" / "blank.md", "\n \n") and p / "sub", "no usable text (empty)"),
    (lambda p: write(p / "bin.txt", b"\xff\xfe\x00") and p,
     "no usable text (not UTF-8 text: bin.txt; the rest are empty)"),
    (lambda p: write(p / "bin.txt", b"\xff\xfe"), "not UTF-8 text"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n{"body": "no text"}\n'), "line 2: expected a JSON object"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n\n{"text": 3}\n'), "line 3: expected a JSON object"),
    (lambda p: write(p / "d.jsonl", '{"text": "ok"}\n{oops\n'), "line 2: not valid JSON"),
    (lambda p: write(p / "d.jsonl", ""), "no usable text (empty)"),
])
def test_corpus_errors_are_one_line_naming_the_path(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError) as info:
        load_corpus(str(path))
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(path) in text or path.name in text
