"""Models leave and enter through Hugging Face transformers: export (export.py), import and dense-to-MoE
upcycling (load.py), the sentencepiece -> tokenizers conversion (tokenizer.py), and the one place that knows
which transformers architecture represents which config and how its weight names map to ours (adapter.py).

transformers is an optional extra (`pip install -e ".[hf]"`); only this package imports it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from dist_moe.config import ConfigError


def _import_installed_kernels() -> None:
    """The repository's top-level kernels/ folder (installed as dist_moe.kernels) shadows the `kernels`
    package that transformers imports when Python runs from the repository root (`python -m pytest` puts
    the working directory first on sys.path); import the installed one first, where there is one."""
    if "kernels" in sys.modules:
        return
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


def require_transformers():
    """The transformers module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("transformers is not installed: pip install -e '.[hf]' (the hf extra)") from None
    return transformers


_import_installed_kernels()
