"""The DPO loss (train/loss.py) against float64 autograd of the whole chain written out here:
hidden states -> LM head -> log-softmax -> gathered targets -> sums per response -> TRL's DPO/IPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from llama_ft.adapters import lora_named_parameters
from llama_ft.data import IGNORE_INDEX
from llama_ft.lora import LoraSpec, lora_disabled
from llama_ft.model.build import build_lora_model
from llama_ft.train.loss import (
    PreferenceMeter,
    backward_scale,
    dpo_logps,
    dpo_losses,
    global_count,
    loss_targets,
    sequence_logprobs,
    use_chunked_loss,
)

P, T, H, V = 3, 9, 6, 11


def _labels() -> torch.Tensor:
    """(2P, T): rows 0..P-1 chosen, P..2P-1 rejected; prompt tokens and right padding are IGNORE_INDEX."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    starts, ends = [2, 3, 1, 2, 4, 1], [9, 6, 8, 5, 9, 3]  # response [start, end) of each row
    for row, (s, e) in enumerate(zip(starts, ends, strict=True)):
        labels[row, :s] = IGNORE_INDEX
        labels[row, e:] = IGNORE_INDEX
    return labels


def _reference(hidden: torch.Tensor, ref_hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, beta: float,
               loss: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, rewards chosen (P,), rewards rejected (P,)) by full logits in float64, TRL's formulas."""

    def logps(h: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(h.double() @ w.double().T, dim=-1)[:, :-1]  # token t predicts label t+1
        nxt = labels[:, 1:]
        mask = (nxt != IGNORE_INDEX).double()
        per_token = logp.gather(2, nxt.clamp(min=0)[..., None]).squeeze(2) * mask
        out = per_token.sum(1)
        return out / mask.sum(1) if loss == "ipo" else out  # TRL: IPO on the average over the response

    pi, ref = logps(hidden), logps(ref_hidden).detach()
    h = (pi[:P] - ref[:P]) - (pi[P:] - ref[P:])
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h))
    return losses.mean(), beta * (pi[:P] - ref[:P]).detach(), beta * (pi[P:] - ref[P:]).detach()


def _ours(hidden, ref_hidden, w, labels, beta, loss, eps, chunk):
    positions, targets = loss_targets(labels)
    logp, n = sequence_logprobs(hidden, w, positions, targets, chunk)
    with torch.no_grad():
        ref_logp, ref_n = sequence_logprobs(ref_hidden, w, positions, targets, chunk)
    pi, ref = dpo_logps(logp, n, loss), dpo_logps(ref_logp, ref_n, loss)
    return dpo_losses(pi[:P], pi[P:], ref[:P], ref[P:], beta, loss, eps)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_loss_rewards_and_gradient_equal_float64_autograd(loss, eps, chunk):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = hidden.detach() + 0.5 * torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    labels, beta = _labels(), 0.3

    want, want_c, want_r = _reference(hidden, ref_hidden, w, labels, beta, loss, eps)
    (want_grad,) = torch.autograd.grad(want, hidden)

    terms = _ours(hidden, ref_hidden, w, labels, beta, loss, eps, chunk)
    scale = backward_scale(global_count(P, torch.device("cpu")), 1)  # R / P, P = pairs of the step
    got = terms.losses.sum() * scale
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert terms.losses.dtype == torch.float64 and terms.losses.shape == (P,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)  # the scale is fp32: 1/3 to 6e-8
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(terms.chosen_rewards, want_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.rejected_rewards, want_r, rtol=1e-12, atol=1e-12)
    assert (want_c - want_r).abs().min() > 1e-3  # rewards differ, so the comparisons above can fail
    assert not terms.chosen_rewards.requires_grad


def test_chunk_size_does_not_change_results_in_fp32():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, H, generator=g)
    hidden = torch.randn(2 * P, T, H, generator=g, requires_grad=True)
    ref_hidden = hidden.detach() + 0.5 * torch.randn(2 * P, T, H, generator=g)
    results = []
    for chunk in (1, 3, 1000):
        terms = _ours(hidden, ref_hidden, w, _labels(), 0.1, "sigmoid", 0.0, chunk)
        (grad,) = torch.autograd.grad(terms.losses.sum(), hidden)
        results.append((terms.losses.detach(), terms.chosen_rewards, grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_accumulated_micro_batches_give_the_mean_over_all_pairs():
    """Pairs split 2 + 1 over two micro-batches, each backpropagating sum(l_p) * backward_scale(P): the
    accumulated gradient is that of the mean over all P pairs, not the mean of the two micro-batch means."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = hidden.detach() + 0.5 * torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    labels, beta = _labels(), 0.5
    want, _, _ = _reference(hidden, ref_hidden, w, labels, beta, "sigmoid", 0.0)
    (want_grad,) = torch.autograd.grad(want, hidden)

    scale = backward_scale(global_count(P, torch.device("cpu")), 1)
    total = torch.zeros((), dtype=torch.float64)
    for pairs in ([0, 1], [2]):
        rows = pairs + [p + P for p in pairs]  # chosen then rejected rows of these pairs
        positions, targets = loss_targets(labels[rows])
        logp, _ = sequence_logprobs(hidden[rows], w, positions, targets, chunk=2)
        ref, _ = sequence_logprobs(ref_hidden[rows], w, positions, targets, chunk=2)
        k = len(pairs)
        terms = dpo_losses(logp[:k], logp[k:], ref[:k], ref[k:], beta)
        (terms.losses.sum() * scale).backward()
        total += terms.losses.detach().sum() * scale
    torch.testing.assert_close(total, want.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(hidden.grad, want_grad, rtol=1e-6, atol=1e-12)


def test_packed_sequences_sum_per_segment():
    """Two sequences packed into one row (segments given) give the sums and counts of the two rows apart."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = _labels()[:2]
    hidden = torch.randn(2, T, H, generator=g, dtype=torch.float64)
    positions, targets = loss_targets(labels)
    apart, n_apart = sequence_logprobs(hidden, w, positions, targets, chunk=3)
    packed = hidden.reshape(1, 2 * T, H)  # row 1 continues at position T of the packed row
    segments = positions // T
    together, n_together = sequence_logprobs(packed, w, positions, targets, chunk=3, segments=segments,
                                             num_segments=2)
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-12)
    assert n_apart.tolist() == n_together.tolist() == [7, 3]  # the trained labels 2..8 and 3..5


def test_empty_micro_batch_gives_zero_logps_that_reach_hidden():
    w = torch.randn(V, H, dtype=torch.float64)
    hidden = torch.randn(2, T, H, dtype=torch.float64, requires_grad=True)
    logp, n = sequence_logprobs(hidden, w, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 4)
    assert logp.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
    logp.sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tiny_model_dir):
    """The first step of a real run: LoRA with B = 0, policy = the model, reference = the same model under
    lora_disabled. Each pair's sigmoid loss is exactly ln 2 and every reward 0; IPO's is 1 / (4 beta^2)."""
    torch.manual_seed(0)
    model, _ = build_lora_model(tiny_model_dir, LoraSpec(4, 8), ds_config=None, dtype=torch.float32)
    head = use_chunked_loss(model)
    ids = torch.randint(0, head.shape[0], (2 * P, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    positions, targets = loss_targets(labels)
    logp, n = sequence_logprobs(model(input_ids=ids).logits, head, positions, targets, chunk=5)
    with lora_disabled(model), torch.no_grad():
        ref, _ = sequence_logprobs(model(input_ids=ids).logits, head, positions, targets, chunk=5)
    assert logp.requires_grad and (logp < -1).all()
    for loss, eps, per_pair in (("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.1, math.log(2)),
                                ("ipo", 0.0, 1 / (4 * 0.1 ** 2))):
        pi, rf = dpo_logps(logp, n, loss), dpo_logps(ref, n, loss)
        terms = dpo_losses(pi[:P], pi[P:], rf[:P], rf[P:], beta=0.1, loss=loss, label_smoothing=eps)
        assert terms.losses.tolist() == pytest.approx([per_pair] * P, rel=1e-7, abs=0)
        assert terms.chosen_rewards.tolist() == terms.rejected_rewards.tolist() == [0.0] * P
    meter = PreferenceMeter(torch.device("cpu"))
    meter.add(dpo_losses(logp[:P], logp[P:], ref[:P], ref[P:], beta=0.1))
    stats = meter.mean()
    assert stats["loss"] == pytest.approx(math.log(2), rel=1e-7)
    assert [stats[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")] == \
        [0.0, 0.0, 0.0, 0.0]
    # with trained adapters the policy moves away from the reference (so the equalities above can fail)
    for _, p in lora_named_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    logp2, _ = sequence_logprobs(model(input_ids=ids).logits, head, positions, targets, chunk=5)
    assert (dpo_losses(logp2[:P], logp2[P:], ref[:P], ref[P:], 0.1).losses - math.log(2)).abs().max() > 1e-4


def test_preference_meter_is_a_mean_over_pairs():
    meter = PreferenceMeter(torch.device("cpu"))
    c1, r1 = torch.tensor([0.5, -0.2]), torch.tensor([0.1, 0.3])
    c2, r2 = torch.tensor([1.0]), torch.tensor([-1.0])
    for c, r in ((c1, r1), (c2, r2)):  # rewards given as beta * (pi - ref) with ref = 0, beta = 1
        meter.add(dpo_losses(c, r, torch.zeros_like(c), torch.zeros_like(r), beta=1.0))
    stats = meter.mean()
    c, r = torch.cat([c1, c2]).double(), torch.cat([r1, r2]).double()
    want_loss = float(torch.log1p(torch.exp(-(c - r))).mean())
    assert stats["pairs"] == 3
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(float(c.mean()), rel=1e-6)
    assert stats["rewards/rejected"] == pytest.approx(float(r.mean()), rel=1e-6)
    assert stats["rewards/margins"] == pytest.approx(float((c - r).mean()), rel=1e-6)
    assert stats["rewards/accuracies"] == pytest.approx(2 / 3)
    assert meter.mean()["pairs"] == 0  # reset after reading


@pytest.mark.parametrize("kw,match", [({"loss": "hinge"}, "unknown DPO loss"), ({"beta": 0.0}, "beta"),
                                      ({"loss": "ipo", "label_smoothing": 0.1}, "sigmoid only"),
                                      ({"label_smoothing": 0.6}, r"\[0, 0.5\]")])
def test_bad_settings_are_refused(kw, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_losses(x, x, x, x, **{"beta": 0.1, **kw})
