"""Tokenize once per node: a content key for the tokenized examples, and where they are cached.

The key hashes everything the token ids depend on: the rows (the sha256 of a local file's bytes, or
datasets' fingerprint of a Hub revision), the tokenizer's vocabulary, merges, special tokens,
pre/post-processing, Python-side settings and chat template, the versions of the libraries that
tokenize and render, the data options, and ENCODING_VERSION (bumped whenever this package changes how
rows become ids). Same key, same ids.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENCODING_VERSION = 1


def default_cache_dir() -> Path:
    """$LLAMA_FT_CACHE, else ~/.cache/llama-ft (run-llama.sh sets LLAMA_FT_CACHE): checked rows in rows/,
    tokenized examples in tokenized/."""
    return Path(os.environ.get("LLAMA_FT_CACHE") or Path.home() / ".cache" / "llama-ft")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids and chat rendering (not its file paths)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # per-call settings that tokenizer(...) changes as it runs; they do not change the ids we ask for
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"special": tokenizer.special_tokens_map, "chat_template": getattr(tokenizer, "chat_template", None),
             # Python-side settings that change ids (truncation keeps the left or the right end, ...)
             **{k: getattr(tokenizer, k, None) for k in ("truncation_side", "padding_side", "split_special_tokens",
                                                         "add_bos_token", "add_eos_token", "add_prefix_space")}}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def examples_key(rows_key: str, tokenizer: Any, options: dict[str, Any]) -> str:
    """The cache key of the tokenized examples (module doc)."""
    import jinja2
    import tokenizers
    import transformers

    template = str(getattr(tokenizer, "chat_template", None))
    blob = {"v": ENCODING_VERSION, "rows": rows_key, "tokenizer": tokenizer_fingerprint(tokenizer), "options": options,
            # the libraries that tokenize and render templates; a template that prints today's date renders anew daily
            "libs": [transformers.__version__, tokenizers.__version__, jinja2.__version__],
            "date": datetime.date.today().isoformat() if "strftime_now" in template else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]
