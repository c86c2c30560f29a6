import random

import pytest
import sentencepiece as spm
from synthetic_corpus import CODE_DOC, UNICODE_DOC, make_documents

from dist_moe.data.corpus import DataError
from dist_moe.data.tokenizer import Tokenizer, train_tokenizer, training_sentences

ROUND_TRIP = [
    CODE_DOC,
    UNICODE_DOC,
    "",
    " leading and trailing spaces  ",
    "\n\n\ttabs\tand\r\nCRLF\rlone CR\x0bVT\x0cFF\n",
    "    " * 10 + "deep indent\n" + "x" * 5000 + "\n",  # a line longer than any training sentence
    "控制字符 \x01\x02\x7f and combining e\u0301 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(make_documents(), 400, 8.0, path, show_progress=False)
    return Tokenizer(path)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_of_encode_is_the_identity(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 < i < tokenizer.vocab_size and i != tokenizer.eos_id for i in ids)  # no <unk>, no EOS


def test_encode_batch_equals_encode_one_by_one(tokenizer):
    assert tokenizer.encode_batch(ROUND_TRIP) == [tokenizer.encode(t) for t in ROUND_TRIP]


def test_vocab_is_exactly_the_requested_size_with_eos_and_learned_merges(tokenizer):
    assert tokenizer.vocab_size == 400 and tokenizer.eos_id == 1
    text = make_documents()[3]
    assert len(tokenizer.encode(text)) < 0.5 * len(text.encode())  # merges, not byte fallback


def test_training_is_deterministic(tmp_path, tokenizer):
    path = tmp_path / "again.model"
    train_tokenizer(make_documents(), 400, 8.0, path, show_progress=False)
    assert path.read_bytes() == tokenizer.path.read_bytes()


def test_training_takes_whole_documents_up_to_the_sample_size_from_a_stream(tmp_path, monkeypatch):
    taken = []
    docs = (taken.append(i) or make_documents(n=1, seed=i)[0] for i in range(10_000))  # an endless-ish stream
    train_tokenizer(docs, 300, 0.01, tmp_path / "t.model", show_progress=False)
    used = [len(make_documents(n=1, seed=i)[0].encode()) for i in taken[:-1]]  # the last one pulled is not used
    assert sum(used) - used[-1] < 10_000 <= sum(used)  # whole documents until 0.01 MB is reached


def test_training_sentences_keep_every_character_and_stay_under_the_length_limit():
    docs = ["short\nlines\n" * 1000, "y" * 10_000 + "\nend", ""]
    sentences = list(training_sentences(docs))
    assert "".join(sentences) == "".join(docs)
    assert max(len(s) for s in sentences) <= 4096


def test_vocab_too_large_for_the_corpus_is_a_data_error_naming_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.vocab_size=5000: .*Vocabulary size too high"):
        train_tokenizer(["tiny corpus"] * 3, 5000, 8.0, tmp_path / "t.model", show_progress=False)
    assert not (tmp_path / "t.model").exists()


def test_missing_model_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        Tokenizer(tmp_path / "missing.model")


def test_prompt_ending_mid_piece_is_healed_back_to_a_boundary_the_tokenizer_makes(tmp_path):
    """A corpus where "():\\n" is learned whole, but "def main():" (no newline) encodes as "()" + ":": healing
    backs up both tokens and allows exactly the pieces that spell "():" and more."""
    rng = random.Random(0)
    names = ["main", "run", "setup", "close", "read", "write", "parse", "load"]
    docs = ["".join(f"def {rng.choice(names)}_{j}():\n    return {rng.randint(0, 99)}\n\n" for j in range(50))
            for _ in range(40)]
    train_tokenizer(docs, 320, 8.0, tmp_path / "tok.model", show_progress=False)
    tokenizer = Tokenizer(tmp_path / "tok.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    ids = tokenizer.encode("def main():")
    assert [sp.id_to_piece(i) for i in ids[-2:]] == ["()", ":"]  # what this corpus teaches, checked

    kept, allowed = tokenizer.heal_prompt("def main():")
    assert kept == ids[:-2]
    assert sorted(sp.id_to_piece(i) for i in allowed) == ["():\n"]
    text = tokenizer.decode(kept + allowed[:1])
    assert text.startswith("def main():") and tokenizer.encode(text) == kept + allowed[:1]

    assert tokenizer.heal_prompt("é") == (tokenizer.encode("é"), [])  # byte fallback: bytes are never split
    assert tokenizer.heal_prompt("") == ([], [])
