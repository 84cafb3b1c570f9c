"""segment_sdpa (model/segment_attention.py): packed rows with each sequence's attention computed apart, against
the same transformers Llama (float64, grouped KV heads) running each sequence alone as its own batch of one."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ft.data import collate_packed
from llama_ft.model.segment_attention import NAME, register, restarts, runs, segment_kwargs
from llama_ft.train.evaluate import model_inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def test_bounds_from_positions_and_groups():
    assert restarts(torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]])) == (((0, 3), (3, 4), (4, 6)), ((0, 6),))
    assert runs(torch.tensor([[0, 0, 1, 1, 1, -1]])) == (((0, 2), (2, 5), (5, 6)),)


def test_packed_rows_equal_each_sequence_alone(model, monkeypatch):
    """Two packed rows (3 sequences, one of them a single token, then padding; 2 sequences) through the model
    switched to segment_sdpa with the segments model_inputs names: each sequence's logits and the gradient of
    the summed logits with respect to every weight equal those of the sequences run one at a time."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (7, 1, 5, 9, 4)]
    examples = [{"input_ids": s, "labels": s} for s in seqs]
    batch = collate_packed([examples[:3], examples[3:]], pad_token_id=0)
    inputs = model_inputs(batch, packed=True, flash=False, device="cpu")
    assert inputs["llama_ft_segments"].bounds[0][:3] == ((0, 7), (7, 8), (8, 13))

    register()
    monkeypatch.setattr(model.config, "_attn_implementation", NAME)
    model.zero_grad()
    got = model(**inputs).logits
    got_parts = [got[0, 0:7], got[0, 7:8], got[0, 8:13], got[1, 0:9], got[1, 9:13]]
    torch.stack([p.sum() for p in got_parts]).sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")  # the reference: one at a time
    model.zero_grad()
    want_parts = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    torch.stack([p.sum() for p in want_parts]).sum().backward()
    for a, b in zip(got_parts, want_parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for p, want in zip(model.parameters(), got_grads, strict=True):
        torch.testing.assert_close(want, p.grad, rtol=1e-9, atol=1e-9)
    # the whole-row masked call would give the same; a segment boundary off by one would not
    model.zero_grad()
    monkeypatch.setattr(model.config, "_attn_implementation", NAME)
    wrong = ((0, 6), (6, 8), (8, got.shape[1])), inputs["llama_ft_segments"].bounds[1]
    bad = model(**{**inputs, **segment_kwargs(wrong, True)}).logits
    assert (bad[0, 0:7] - got_parts[0]).abs().max() > 1e-3


def test_segments_must_cover_the_rows(model, monkeypatch):
    register()
    monkeypatch.setattr(model.config, "_attn_implementation", NAME)
    with pytest.raises(ValueError, match="llama_ft_segments cover"):
        model(input_ids=torch.ones(1, 5, dtype=torch.int64), **segment_kwargs([((0, 4),)], causal=True))
