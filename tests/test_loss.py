"""train/loss.py against float64 arithmetic and autograd written out here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llama_ft.data import IGNORE_INDEX
from llama_ft.train.loss import (
    ChunkedLMHeadNLL,
    HiddenStatesHead,
    LossMeter,
    backward_scale,
    lm_head_nll_sum,
    loss_targets,
    trained_count,
    use_chunked_loss,
)

LABELS = torch.tensor([[3, IGNORE_INDEX, 4, 1, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, IGNORE_INDEX, 2]])


def test_targets_are_the_shifted_trained_labels():
    positions, targets = loss_targets(LABELS)
    # row 0: t=1 -> 4, t=2 -> 1; row 1: t=0 -> 6, t=1 -> 0, t=3 -> 2 (flat index b*5 + t)
    assert positions.tolist() == [1, 2, 5, 6, 8] and targets.tolist() == [4, 1, 6, 0, 2]
    assert trained_count(LABELS) == 5  # label 0 of each row never counts


def _reference_sum(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
    """Token by token in float64: sum over t of logsumexp(h_t W^T) - (h_t W^T)[y_{t+1}]."""
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            z = (hidden[b, t].double() @ w.double().T).tolist()
            total += math.log(sum(math.exp(v) for v in z)) - z[y]
    return total


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
def test_chunked_loss_and_gradient_equal_the_full_loss_in_float64(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    positions, targets = loss_targets(LABELS)
    got = lm_head_nll_sum(hidden, w, positions, targets, chunk)
    (got * 0.5).backward()  # a scaled loss, as the training step backpropagates S * R / N
    # the full-logits path, by autograd
    h2 = hidden.detach().clone().requires_grad_(True)
    logits = h2 @ w.T
    full = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), LABELS[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
    (full * 0.5).backward()
    assert got.dtype == torch.float64
    assert abs(got.item() - full.item()) < 1e-12 * abs(full.item())
    assert abs(got.item() - _reference_sum(hidden, w, LABELS)) < 1e-12 * abs(full.item())
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-12, atol=1e-14)
    assert torch.all(hidden.grad[0, 0] == 0) and torch.all(hidden.grad[0, 3] == 0)  # untrained: no head, no grad


def test_chunked_loss_in_bf16_sums_in_fp32_and_scales_the_gradient_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(11, 8, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 11, (9,), generator=g)
    s = ChunkedLMHeadNLL.apply(x, w, y, 4).sum()
    x64 = x.detach().double().requires_grad_(True)
    ref = nn.functional.cross_entropy(x64 @ w.double().T, y, reduction="sum")
    assert s.dtype == torch.float32 and abs(s.item() - ref.item()) < 1e-2 * ref.item()  # bf16 logits
    scale = 1 / 203  # R/N: not a bf16 number
    (s * scale).backward()
    (ref * scale).backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=1e-4)
    # the scale enters in fp32: the gradient is not off by bf16(1/203) / (1/203) = 0.9974 as a whole
    ratio = (x.grad.double() * x64.grad).sum() / (x64.grad * x64.grad).sum()
    assert abs(ratio.item() - 1) < 2e-3
    with torch.no_grad():
        assert not ChunkedLMHeadNLL.apply(x, w, y, 4).sum().requires_grad  # eval: no gradient work


def test_nothing_trained_gives_zero_that_reaches_the_graph():
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    none = torch.zeros(0, dtype=torch.int64)
    s = lm_head_nll_sum(hidden, torch.randn(5, 4), none, none, 8)
    s.backward()
    assert s.item() == 0.0 and torch.all(hidden.grad == 0)


def test_hidden_states_head_swap():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.tensor([[1, 2, 3, 4]])
    full = model(input_ids=ids).logits
    w = use_chunked_loss(model)
    assert isinstance(model.lm_head, HiddenStatesHead) and w is model.lm_head.head.weight
    hidden = model(input_ids=ids).logits
    assert hidden.shape == (1, 4, 16)
    torch.testing.assert_close(hidden @ w.T, full)


def test_meter_and_scale():
    m = LossMeter(torch.device("cpu"))
    m.add(torch.tensor(6.0), 3, 10)
    m.add(torch.tensor(2.0), 1, 4)
    assert m.mean() == {"loss": 2.0, "trained_tokens": 4, "tokens": 14}
    assert m.mean() == {"loss": 0.0, "trained_tokens": 0, "tokens": 0}  # reset after reading
    assert backward_scale(torch.tensor(8), 2).item() == 0.25
    assert backward_scale(torch.tensor(0), 2).item() == 2.0  # nothing trained: S = 0, so no NaN gradient


def test_a_head_weight_in_flight_is_waited_for_not_gathered_again(monkeypatch):
    """ZeRO-3's prefetcher gathering the (tied) head when the loss needs it: the loss waits for that all-gather
    (the handle in the root module's ds_inflight_param_registry) and leaves the parameter to the coordinator,
    instead of GatheredParameters, which would skip it (an empty weight) and then try to partition it in flight."""
    import enum

    from llama_ft.train import loss as loss_mod

    class Status(enum.Enum):
        INFLIGHT = 3
        AVAILABLE = 2

    torch.manual_seed(0)
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 11, bias=False, dtype=torch.float64)

        def get_output_embeddings(self):
            return self.lm_head

    model = Model()
    full = model.lm_head.weight.detach().clone()
    weight = loss_mod.use_chunked_loss(model)
    weight.data = torch.empty(0)  # a ZeRO-3 partition's placeholder while the gather is in flight
    weight.ds_status = Status.INFLIGHT

    class Handle:
        def wait(self):
            weight.data, weight.ds_status = full.clone(), Status.AVAILABLE

    model.ds_inflight_param_registry = {weight: Handle()}
    monkeypatch.setattr(loss_mod, "gathered", lambda params: pytest.fail("gathered a parameter in flight"))
    hidden = torch.randn(1, 5, 8, dtype=torch.float64)
    targets = torch.tensor([1, 4, 7])
    got = loss_mod.lm_head_nll_sum(hidden, weight, torch.tensor([0, 2, 3]), targets, chunk=2)
    want = nn.functional.cross_entropy(hidden[0, [0, 2, 3]] @ full.double().T, targets, reduction="sum")
    assert weight.ds_status is Status.AVAILABLE and not model.ds_inflight_param_registry
    torch.testing.assert_close(got, want)
