"""The shared-prompt layout of packed DPO pairs (data/shared_prompt.py, --dpo_shared_prompt) against
transformers + PEFT in float64 running each side as its own unpadded sequence.

Pairs of random token ids share a prompt of 1 to 9 tokens; responses of 1 to 12 tokens, some opening with an
untrained token (a template header), one pair whose responses start with the same trained token (the shared
prompt stops before it), one whose sides have different lengths. They are laid out two and three to a row.
Checked, with llama-ft's own model (LoRA with random A and B, float64, sdpa and eager) against PEFT's model
with the same adapters on HF's own loading of the same checkpoint:
- each side's summed response log-prob, policy (adapters on) and reference (lora_disabled);
- the DPO loss (mean over pairs) and its gradient with respect to every LoRA A and B;
- the layout itself: P, tokens per row, the mask on a hand-written pair.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_token_loss import ALPHA, R, peft_float64

from llama_ft.adapters import gather_lora_state, lora_named_parameters, peft_key
from llama_ft.data import IGNORE_INDEX
from llama_ft.data.batches import MicroBatches
from llama_ft.data.shared_prompt import collate_shared_pairs, shared_prefix_lengths, shared_prompt_mask
from llama_ft.lora import LoraSpec, lora_disabled, lora_modules
from llama_ft.model.build import build_lora_model
from llama_ft.model.segment_attention import NAME, register
from llama_ft.train.loss import dpo_losses, sequence_logprobs, use_chunked_loss
from llama_ft.train.objectives import shared_prompt_inputs

BETA = 0.5
IGN = IGNORE_INDEX


def _pairs(vocab: int) -> list[dict[str, list[int]]]:
    """Random pairs (module doc): prompt ids + response ids per side; labels on the response, except a first
    header token where `header`."""
    g = torch.Generator().manual_seed(7)
    out = []
    shapes = [(5, 4, 7, True), (1, 3, 1, False), (9, 12, 2, True), (3, 6, 6, False), (4, 2, 9, True)]
    for k, (p, nc, nr, header) in enumerate(shapes):
        prompt = torch.randint(0, vocab, (p,), generator=g).tolist()
        sides = {}
        first = torch.randint(0, vocab, (1,), generator=g).tolist()
        for side, n in (("chosen", nc), ("rejected", nr)):
            resp = torch.randint(0, vocab, (n,), generator=g).tolist()
            if k == 3:  # both responses open with the same trained token: not part of the shared prompt
                resp[0] = first[0]
            labels = list(resp)
            if header:
                labels[0] = IGN
            sides[f"{side}_input_ids"] = prompt + resp
            sides[f"{side}_labels"] = [IGN] * p + labels
        out.append(sides)
    return out


def _reference(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi (2P,), ref (2P,)) in [chosen .., rejected ..] order: each side alone, unpadded, its logits from the
    PEFT model (reference: under disable_adapter)."""

    def logp(ids: list[int], labels: list[int]) -> torch.Tensor:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        y = torch.tensor(labels[1:])
        keep = y != IGN
        return F.log_softmax(logits[keep], dim=-1).gather(1, y[keep, None]).sum()

    sides = [(p[f"{s}_input_ids"], p[f"{s}_labels"]) for s in ("chosen", "rejected") for p in pairs]
    with torch.no_grad(), model.disable_adapter():
        ref = torch.stack([logp(*s) for s in sides])
    return torch.stack([logp(*s) for s in sides]), ref


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """llama-ft's LoRA model per attention implementation (random A and B, float64) and the PEFT reference with
    the same adapters."""
    torch.manual_seed(0)
    ours = {}
    for attn in ("sdpa", "eager"):
        model, _ = build_lora_model(tiny_model_dir, LoraSpec(R, ALPHA), ds_config=None, dtype=torch.float64,
                                    attn_implementation=attn)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in lora_named_parameters(model):
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        ours[attn] = (model, use_chunked_loss(model))
    state = gather_lora_state(ours["sdpa"][0])
    reference, params = peft_float64(tiny_model_dir, state, zero_b=False)
    return ours, reference, params


@pytest.mark.parametrize("attn", ["sdpa", "eager", "segments"])
def test_logprobs_loss_and_lora_gradients_equal_float64_peft_per_side(models, attn, monkeypatch):
    """`segments`: the sdpa model switched to segment_sdpa (model/segment_attention.py, what training with
    --packing uses), each pair's attention computed apart under its part of the mask."""
    ours, reference, params = models
    model, head = ours["sdpa" if attn == "segments" else attn]
    if attn == "segments":
        register()
        monkeypatch.setattr(model.config, "_attn_implementation", NAME)  # what use_segment_attention sets
    pairs = _pairs(head.shape[0])
    rows = [pairs[:2], pairs[2:]]  # two pairs in one row, three in the other
    batch = collate_shared_pairs(rows, pad_token_id=0)
    n = len(pairs)

    reference.zero_grad()
    pi_want, ref_want = _reference(reference, pairs)
    loss_want = dpo_losses(pi_want[:n], pi_want[n:], ref_want[:n], ref_want[n:], BETA).losses.mean()
    loss_want.backward()

    model.zero_grad()
    inputs = shared_prompt_inputs(batch, "cpu", "eager" if attn == "eager" else "sdpa", torch.float64)
    args = (batch["target_positions"], batch["target_ids"], head, batch["target_sequences"], 2 * n)
    with torch.no_grad(), lora_disabled(model):
        ref, _ = _logps(model(**inputs, use_cache=False).logits, *args)
    pi, counts = _logps(model(**inputs, use_cache=False).logits, *args)
    loss = dpo_losses(pi[:n], pi[n:], ref[:n], ref[n:], BETA).losses.mean()
    loss.backward()

    # float64 throughout, except where transformers' Llama computes in fp32 whatever the dtype: RMSNorm (its
    # input and the gradient through it are rounded to fp32 per element) and eager's softmax. A shared prompt
    # token gets dy_chosen + dy_rejected rounded once, where the reference rounds each: fp32-sized differences
    # in the gradient, none in sdpa's forward (each token's inputs are the reference's, bit for bit)
    # (the reference runs sdpa: eager's fp32 softmax differs from it in the forward too)
    tol = 1e-7 if attn == "eager" else 1e-10
    torch.testing.assert_close(ref, ref_want, rtol=tol, atol=tol)
    torch.testing.assert_close(pi, pi_want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(loss, loss_want.detach(), rtol=tol, atol=tol)
    assert (pi_want - ref_want).abs().min() > 1e-3  # the adapters move the policy: pi and ref can disagree
    trained = [sum(1 for y in p[f"{s}_labels"][1:] if y != IGN) for s in ("chosen", "rejected") for p in pairs]
    assert counts.tolist() == trained
    got, want = [], []
    for path, m in lora_modules(model).items():
        for which, p in (("A", m.lora_A), ("B", m.lora_B)):
            got.append(p.grad.reshape(-1))
            want.append(params[peft_key(path, which)].grad.reshape(-1))
    got, want = torch.cat(got), torch.cat(want)
    scale = want.abs().max()
    assert scale > 0.1 and want.abs().gt(1e-3 * scale).float().mean() > 0.5  # a gradient everywhere to compare
    torch.testing.assert_close(got, want, rtol=0, atol=(2e-6 if attn == "eager" else 2e-7) * float(scale))


def _logps(hidden, positions, targets, head, segments, num):
    return sequence_logprobs(hidden, head, positions, targets, 3, segments, num)


def test_layout_of_a_hand_written_pair():
    """P stops before the first trained label; the rejected response continues x's positions; the mask lets
    it see x and itself only; the first rejected token is predicted from x's last position."""
    pair = {"chosen_input_ids": [10, 11, 12, 20, 21], "chosen_labels": [IGN, IGN, IGN, 20, 21],
            "rejected_input_ids": [10, 11, 12, 30, 31, 32], "rejected_labels": [IGN, IGN, IGN, 30, 31, 32]}
    other = {"chosen_input_ids": [5, 6], "chosen_labels": [IGN, 6],
             "rejected_input_ids": [5, 7], "rejected_labels": [IGN, 7]}
    assert shared_prefix_lengths([pair, other]) == [3, 1]
    b = collate_shared_pairs([[pair, other]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 5, 6, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]]
    assert b["labels"].tolist() == [[IGN, IGN, IGN, 20, 21, 30, 31, 32, IGN, 6, 7]]
    assert b["target_positions"].tolist() == [2, 3, 8, 2, 5, 6, 8]
    assert b["target_ids"].tolist() == [20, 21, 6, 30, 31, 32, 7]
    assert b["target_sequences"].tolist() == [0, 0, 1, 2, 2, 2, 3]
    mask = shared_prompt_mask(b["group_ids"], b["branch_ids"])[0, 0]
    assert mask[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # r_0: x and itself, not c
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # c_1: x, c_0, itself
    assert mask[10].tolist() == [0] * 8 + [1, 0, 1]  # the other pair's rejected token: its prompt and itself


def test_micro_batches_pack_pairs_by_their_shared_length(tiny_model_dir):
    """With shared_prompt a pair takes P + |c| + |r| tokens of a row's 2 x pack_len: more pairs fit per row."""
    import datasets

    pairs = _pairs(300) * 4
    table = datasets.Dataset.from_list(pairs).select(list(range(len(pairs)))[::-1])  # an index view, as the split
    # the prompts' lengths, but pair 3's responses share their first (trained) token: P stops before it
    want = ([5, 1, 9, 3, 4] * 4)[::-1]
    assert shared_prefix_lengths(table) == shared_prefix_lengths(list(table)) == want
    plain = MicroBatches(table, 1, 0, 1, 0, 0, pack_len=16)
    shared = MicroBatches(table, 1, 0, 1, 0, 0, pack_len=16, shared_prompt=True)
    assert shared.rows_per_epoch(0) < plain.rows_per_epoch(0)
    seen = []
    for _ in range(shared.per_epoch):
        b = next(shared)
        assert b["input_ids"].shape[1] <= 32 and b["pairs"] == len(shared.last_examples)
        seen += shared.last_examples
    assert sorted(seen) == list(range(len(pairs)))
