"""Our sentencepiece BPE model as a `tokenizers` BPE that encodes every text to the same ids.

sentencepiece (with data/tokenizer.py's settings) replaces ' ' by U+2581, splits the text into words that
each start at a run of U+2581 (whitespace-only pieces are allowed, so the run stays with the word after it),
and merges adjacent symbols by the score of the merged piece (a lower id is a higher score), falling back to
byte pieces <0xNN> for characters outside the vocabulary. The same, in tokenizers' terms: a Replace
normalizer, a Split pre-tokenizer on `▁+[^▁]*|[^▁]+`, and a byte-fallback BPE whose merges are ranked by the
merged piece's id.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

SPACE = "\u2581"


def _merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split (left, right) of every learned piece into two pieces, ranked by the merged piece's id."""
    merges = []
    for piece in sorted(mergeable, key=vocab.__getitem__):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        merges += sorted(((a, b) for a, b in splits if a in mergeable and b in mergeable),
                         key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return merges


def convert(model_path: Path | str):
    """sentencepiece model file -> transformers PreTrainedTokenizerFast (eos = our EOS, unk = <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    mergeable = {p for p, i in vocab.items() if sp.is_unknown(i) + sp.is_control(i) + sp.is_byte(i) == 0}
    bpe = BPE(vocab=vocab, merges=_merges(vocab, mergeable), unk_token=sp.id_to_piece(sp.unk_id()),
              byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=sp.id_to_piece(sp.eos_id()),
                                   unk_token=sp.id_to_piece(sp.unk_id()), clean_up_tokenization_spaces=False)
