"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined."""

from __future__ import annotations

import os

import torch  # noqa: E402,I001

if not torch.cuda.is_available():
    # Kernels run on CPU tensors through the interpreter; on a GPU the same tests compile them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Llama checkpoint (bf16, several shards + index, tokenizer)."""
    from llama_ft.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
