"""A user's path: train a small run on 2 ranks with experts split over them, export it, load it with
transformers, and get the same greedy text as `dist-moe generate`; the exported tokenizer encodes the corpus
to the same ids as ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_moe.config import from_yaml_file
from dist_moe.data import Tokenizer
from dist_moe.data.sources import iter_source
from dist_moe.hf.load import generate_from_hf

transformers = pytest.importorskip("transformers")

SMALL = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=64",
         "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "moe.num_experts=4", "moe.d_expert=128", "train.micro_batch_size=8", "train.warmup_steps=2",
         "train.precision=fp32", "train.max_steps=3", "train.eval_every=3", "train.eval_batches=1"]


def dist_moe(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dist_moe.cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("hf_run")
    run_dir, out_dir = tmp / "run", tmp / "hf"
    dist_moe("train", "tiny", *SMALL, "moe.ep_size=2", f"run_dir={run_dir}", f"data.cache_dir={tmp / 'cache'}",
             "--nproc", "2")
    dist_moe("export", str(run_dir), str(out_dir))
    return run_dir, out_dir


@pytest.mark.slow
def test_exported_run_generates_the_same_greedy_text(exported):
    """transformers on the exported folder, fed what `dist-moe generate` feeds our model (EOS, as documents start
    in training, then the healed prompt, its first new token drawn from the healing set), writes the same text;
    and `generate --from-hf` equals transformers on the raw prompt."""
    run_dir, out_dir = exported
    prompt = "def main():"
    ours = dist_moe("generate", str(run_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    healed, first_allowed = Tokenizer(run_dir / "tokenizer.model").heal_prompt(prompt)
    ids = torch.tensor([[tokenizer.eos_token_id, *healed]])
    everything = list(range(model.config.vocab_size))

    def allowed(batch_id, sequence):
        return first_allowed if len(sequence) == ids.shape[1] and first_allowed else everything

    out = model.generate(ids, max_new_tokens=32, do_sample=False, top_k=None, temperature=None, eos_token_id=None,
                         prefix_allowed_tokens_fn=allowed)
    assert out.shape[1] == ids.shape[1] + 32
    text = tokenizer.decode(out[0, 1:])
    assert text.startswith(prompt) and ours == text + "\n"  # stdout holds the sample alone
    raw = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    plain = model.generate(raw, max_new_tokens=32, do_sample=False, top_k=None, temperature=None, eos_token_id=None)
    assert generate_from_hf(out_dir, prompt, 32, temperature=0, top_k=0, seed=0) == tokenizer.decode(plain[0])


@pytest.mark.slow
def test_training_starts_from_the_exported_folder_with_its_tokenizer(exported, tmp_path):
    _, out_dir = exported
    run_dir = tmp_path / "from_hf"
    stdout = dist_moe("train", *SMALL, "train.max_steps=1", f"init.from_hf={out_dir}", f"run_dir={run_dir}",
                      f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=256")
    assert f"initialised from {out_dir}" in stdout
    assert (run_dir / "tokenizer.model").read_bytes() == (out_dir / "tokenizer.model").read_bytes()
    saved = from_yaml_file(run_dir / "config.yaml")
    assert saved.model.vocab_size == 512 and saved.moe.num_experts == 4 and saved.init.from_hf == str(out_dir)


@pytest.mark.slow
def test_exported_tokenizer_encodes_the_corpus_to_our_ids(exported):
    run_dir, out_dir = exported
    ours = Tokenizer(run_dir / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(out_dir)
    documents = [text for _, text in iter_source("stdlib", 1.0)][:200]
    assert sum(map(len, documents)) > 500_000
    for text in documents + ["  indented\n\tand tabs ", "naïve ✓ 日本語 \u2581 <0x41>", ""]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))
