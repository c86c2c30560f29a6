"""Models leave and enter through Hugging Face transformers: export (export.py), import and dense-to-MoE
upcycling (load.py), the sentencepiece -> tokenizers conversion (tokenizer.py), and the one place that knows
which transformers architecture represents which config and how its weight names map to ours (adapter.py).

transformers is an optional extra (`pip install -e ".[hf]"`); only this package imports it.
"""

from __future__ import annotations

from dist_moe.config import ConfigError


def require_transformers():
    """The transformers module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("transformers is not installed: pip install -e '.[hf]' (the hf extra)") from None
    return transformers

