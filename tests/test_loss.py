"""train/loss.py against float64 arithmetic written out here."""

from __future__ import annotations

import math

import torch

from llama_ft.data import IGNORE_INDEX
from llama_ft.train.loss import LossMeter, backward_scale, token_nll_sum, trained_count


def test_token_nll_sum_is_the_shifted_sum_of_token_cross_entropies():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.bfloat16)
    labels = torch.tensor([[3, IGNORE_INDEX, 4, 1, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, IGNORE_INDEX, 2]])
    expected, n = 0.0, 0
    z = logits.double()
    for b in range(2):
        for t in range(4):  # token t predicts label t + 1
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            expected += math.log(sum(math.exp(v) for v in z[b, t].tolist())) - z[b, t, y].item()
            n += 1
    got = token_nll_sum(logits, labels)
    assert got.dtype == torch.float32 and abs(got.item() - expected) < 1e-5 * abs(expected)
    assert trained_count(labels) == n == 5  # label 0 of each row never counts


def test_meter_and_scale():
    m = LossMeter(torch.device("cpu"))
    m.add(torch.tensor(6.0), 3, 10)
    m.add(torch.tensor(2.0), 1, 4)
    assert m.mean() == {"loss": 2.0, "trained_tokens": 4, "tokens": 14}
    assert m.mean() == {"loss": 0.0, "trained_tokens": 0, "tokens": 0}  # reset after reading
    assert backward_scale(torch.tensor(8), 2).item() == 0.25
    assert backward_scale(torch.tensor(0), 2).item() == 2.0  # nothing trained: S = 0, so no NaN gradient
