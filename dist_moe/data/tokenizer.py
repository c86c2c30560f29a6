"""sentencepiece BPE tokenizer, trained once per prepared folder on a streamed sample of its sources.

The trainer settings make any text round-trip exactly, source code included: identity normalization (no
NFKC, whitespace kept as is), no dummy prefix, whitespace-only pieces (indentation), and byte fallback
for characters outside the vocabulary. Ids: 0 = <unk> (unused thanks to byte fallback), 1 = EOS (the
shard writer appends it after every document), 2..257 = the 256 byte pieces, then the learned merges.
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from tqdm import tqdm

from dist_moe.atomic import write_bytes_atomic
from dist_moe.data.corpus import DataError

TOKENIZER_FORMAT = 1  # part of the cache key: bump it when the trainer settings below change
_CHUNK_CHARS = 4096  # training "sentences" are runs of whole lines up to this many characters
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9995,  # the rarest characters are left to byte fallback
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    max_sentence_length=4 * _CHUNK_CHARS,  # in bytes: a UTF-8 character is at most 4
    hard_vocab_limit=True,  # exactly vocab_size pieces, or a clear error
    unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
    minloglevel=2,  # otherwise the trainer logs every merge to stderr
)


def num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Tokenizer:
    """A trained sentencepiece model: text <-> token ids.

    `decode(encode(text)) == text` for every string, except that U+2581 ('▁', sentencepiece's own
    space marker) comes back as a plain space.
    """

    def __init__(self, path: Path | str, threads: int = 0):
        self.path = Path(path)
        self.threads = threads or num_threads()  # encode_batch's; one per Ray Data worker
        if not self.path.is_file():
            raise DataError(f"tokenizer '{self.path}': no such file")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents at once, on `threads` cores."""
        return self._sp.encode(list(texts), num_threads=self.threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def heal_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token healing: the prompt's ids without its last token(s), and the ids whose text starts with the
        text those covered. A prompt that ends mid-piece ("def main():" where "():\\n" is one piece) then
        continues from a boundary the tokenizer makes, not one the model never saw in training.

        Backs up token by token while some piece still starts with the removed text."""
        ids = self.encode(prompt)
        pieces = [self._sp.id_to_piece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        ordinary = [i for i in range(self.vocab_size)
                    if not (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_byte(i))]
        keep, allowed = len(ids), []
        while keep > 0 and not self._sp.is_byte(ids[keep - 1]):  # byte pieces: part of a character
            removed = prompt[len(self.decode(ids[:keep - 1])):]
            extending = [i for i in ordinary if pieces[i].startswith(removed)]
            if not extending:
                break
            keep, allowed = keep - 1, extending
        return ids[:keep], allowed


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Runs of whole lines (newlines kept, so pieces like '):\\n' can be learned) of at most _CHUNK_CHARS;
    longer lines are cut. sentencepiece skips sentences over max_sentence_length, so none may be."""
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > _CHUNK_CHARS:
                yield chunk
                chunk = ""
            while len(line) > _CHUNK_CHARS:
                yield line[:_CHUNK_CHARS]
                line = line[_CHUNK_CHARS:]
            chunk += line
        if chunk:
            yield chunk


def train_tokenizer(texts: Iterable[str], vocab_size: int, sample_mb: float, out_path: Path,
                    show_progress: bool = True) -> None:
    """Train a BPE model of exactly `vocab_size` pieces on the first `sample_mb` of `texts` (a stream: only
    the sample is held, by sentencepiece); write it to `out_path`."""
    sample = _first_mb(texts, sample_mb)
    model = io.BytesIO()
    with _spinner(f"training tokenizer (vocab {vocab_size}) on up to {sample_mb:g} MB", show_progress):
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=training_sentences(sample), model_writer=model,
                                           vocab_size=vocab_size, num_threads=num_threads(),
                                           **_TRAINER_OPTIONS)
        except RuntimeError as exc:
            reason = str(exc).rsplit("] ", 1)[-1].strip()
            raise DataError(f"data.vocab_size={vocab_size}: sentencepiece cannot train it on this corpus "
                            f"({reason})") from None
    write_bytes_atomic(out_path, model.getvalue())


def _first_mb(texts: Iterable[str], sample_mb: float) -> Iterator[str]:
    """Whole documents while fewer than `sample_mb` MB have been taken."""
    size, limit = 0, sample_mb * 1e6
    for text in texts:
        if size >= limit:
            return
        yield text
        size += len(text.encode())


@contextmanager
def _spinner(desc: str, enabled: bool) -> Iterator[None]:
    """A progress line with the elapsed time while a blocking call runs (sentencepiece releases the GIL)."""
    if not enabled:
        yield
        return
    bar = tqdm(desc=desc, bar_format="{desc}... {elapsed}")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(max(0.5, bar.mininterval)):  # mininterval: 30 s in a log file (cli.main)
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()
