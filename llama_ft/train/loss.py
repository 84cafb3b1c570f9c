"""The loss: nats per trained token over a whole optimizer step (DESIGN.md, "The loss").

For one optimizer step, with micro-batches m = 1..G on each of the R ranks that reduce gradients:

    L = (1/N) * sum_{m, r} S_{m,r},   S_{m,r} = sum_{b, t : y[b, t+1] != IGNORE} -log softmax(z[b, t])[y[b, t+1]]
    N = #{(m, r, b, t) : y[b, t+1] != IGNORE}         (every trained token of the step, counted once)

z: logits (B, T, V); y: labels (B, T), unshifted (token t predicts label t+1). Every token weighs the
same, whichever micro-batch or rank it lands on; transformers' per-micro-batch mean (then averaged by
DeepSpeed) weighs a token of a short answer as much as a whole long one.

DeepSpeed reduces gradients as a mean over the R ranks. So micro-batch (m, r) backpropagates
S_{m,r} * R / N with `engine.backward(..., scale_wrt_gas=False)` (no division by G): the reduced
gradient is then exactly dL/dθ. N is counted from the labels on the host before the step's first
forward pass and summed with one all-reduce per step; it stays a device tensor (no host sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_ft.data import IGNORE_INDEX


def trained_count(labels: torch.Tensor) -> int:
    """Positions of a (B, T) label tensor that enter the loss: labels[:, 1:] != IGNORE_INDEX. Host tensor."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S = sum of the token cross-entropies of a micro-batch, in fp32: logits (B, T, V), labels (B, T) -> ()."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def global_count(local: int, device: torch.device) -> torch.Tensor:
    """N: the sum of `local` over all ranks, as an int64 tensor on `device` (one all-reduce)."""
    n = torch.tensor(local, dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
    return n


def backward_scale(n_global: torch.Tensor, reduce_world: int) -> torch.Tensor:
    """R / N as fp32 on N's device; N == 0 (nothing trained this step) gives a zero gradient, not NaN."""
    return reduce_world / n_global.clamp(min=1).to(torch.float32)


class LossMeter:
    """Running sums of token losses and token counts; read (all-reduced over ranks) only when logging.

    `add(S, trained, seen)` per micro-batch keeps S on the device and the counts on the host: no sync.
    `mean()` does one all-reduce and one host sync.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self.trained, self.seen = 0, 0

    def add(self, nll_sum: torch.Tensor, trained: int, seen: int = 0) -> None:
        self.nll += nll_sum.detach().to(torch.float64)
        self.trained += trained
        self.seen += seen

    def mean(self) -> dict[str, float]:
        """{"loss": sum S / trained tokens, "trained_tokens", "tokens"} over all ranks since the last call."""
        counts = torch.tensor([self.trained, self.seen], dtype=torch.float64, device=self.device)
        t = torch.cat([self.nll.reshape(1), counts])
        if dist.is_initialized():
            dist.all_reduce(t)
        nll, trained, seen = t.tolist()  # host sync: once per logging step
        self.reset()
        return {"loss": nll / max(trained, 1.0), "trained_tokens": int(trained), "tokens": int(seen)}
