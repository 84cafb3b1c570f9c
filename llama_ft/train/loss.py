"""The loss: nats per trained token over a whole optimizer step (DESIGN.md, "The loss"), computed in chunks.

For one optimizer step, with micro-batches m = 1..G on each of the R ranks that reduce gradients:

    L = (1/N) * sum_{m, r} S_{m,r},   S_{m,r} = sum_{b, t : y[b, t+1] != IGNORE} -log softmax(h[b, t] W^T)[y[b, t+1]]
    N = #{(m, r, b, t) : y[b, t+1] != IGNORE}         (every trained token of the step, counted once)

h: final hidden states (B, T, H); W: the LM head (V, H); y: labels (B, T), unshifted (token t predicts
label t+1). Every token weighs the same, whichever micro-batch or rank it lands on; transformers'
per-micro-batch mean (then averaged by DeepSpeed) weighs a token of a short answer as much as a whole
long one.

DeepSpeed reduces gradients as a mean over the R ranks. So micro-batch (m, r) backpropagates
S_{m,r} * R / N with `engine.backward(..., scale_wrt_gas=False)` (no division by G): the reduced
gradient is then exactly dL/dθ. N is counted from the labels on the host before the step's first
forward pass and summed with one all-reduce per step; it stays a device tensor (no host sync).

S itself never holds [tokens x vocab] logits: the model's lm_head is swapped for HiddenStatesHead
(the forward returns h), only the trained positions are gathered (the others skip the head), and
ChunkedLMHeadNLL runs head + cross-entropy over `chunk` of them at a time.

DPO (--objective dpo, DESIGN.md "The loss"; TRL's DPOTrainer conventions). A pair p of the step has a
chosen and a rejected response to one prompt. Per sequence, from the same h, W and y as above:

    logp(seq) = sum_{(b, t) in seq : y[b, t+1] != IGNORE} log softmax(h[b, t] W^T)[y[b, t+1]]   (response tokens)
    n(seq)    = the number of those tokens

pi_c, pi_r come from the policy (LoRA on), ref_c, ref_r from the reference (the same model under
lora.lora_disabled, no gradient). With `sigmoid` each of the four is logp; with `ipo` it is logp / n, the
average over the response (TRL divides the log-probs of policy and reference alike for IPO). Then

    d_p      = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid  l_p = -(1 - eps) log sigmoid(beta d_p) - eps log sigmoid(-beta d_p)    (eps: label smoothing)
    ipo      l_p = (d_p - 1 / (2 beta))^2
    L        = (1/P) * sum_{m, r} sum_{p in (m, r)} l_p,    P = every pair of the step (all micro-batches, ranks)

and the metrics (TRL's names): rewards/chosen = beta (pi_c - ref_c), rewards/rejected = beta (pi_r - ref_r),
rewards/margins = their difference, rewards/accuracies = [rewards/chosen > rewards/rejected], each a mean over
pairs. At B = 0 the policy is the reference: d = 0, so l_p = ln 2 (sigmoid, any eps) and every reward is 0.

The scaling is the SFT one with pairs for tokens: micro-batch (m, r) backpropagates
sum_p l_p * backward_scale(P, R), where P = global_count(this rank's pairs of the step) (one all-reduce).
sequence_logprobs gives logp and n without [tokens x vocab] logits (ChunkedLMHeadNLL: per-token NLLs in
chunks, then a sum per sequence), and dpo_losses the per-pair l_p and rewards.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama_ft.adapters import gathered
from llama_ft.data import IGNORE_INDEX
from llama_ft.flags import DPO_LOSSES


def trained_count(labels: torch.Tensor) -> int:
    """Positions of a (B, T) label tensor that enter the loss: labels[:, 1:] != IGNORE_INDEX. Host tensor."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """y' (B, T) with y'[:, t] = labels[:, t + 1] (what token t is trained to predict), IGNORE_INDEX last."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) of a host (B, T) label tensor: positions = b*T + t (flat, int64, ascending) of
    every token t whose next label y[b, t+1] is trained, and targets = those labels. Both of length N."""
    return next_label_targets(next_token_labels(labels))


def next_label_targets(next_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_targets for labels already shifted (y'[:, t] = y[:, t + 1], as a sequence-parallel shard holds
    them, train/parallel.py): positions b*T + t where y' is trained, and y' there."""
    _, width = next_labels.shape
    b, t = torch.nonzero(next_labels != IGNORE_INDEX, as_tuple=True)
    return b * width + t, next_labels[b, t]


def batch_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) of a micro-batch: its `next_labels` (a sequence-parallel shard) or `labels`."""
    if "next_labels" in batch:
        return next_label_targets(batch["next_labels"])
    return loss_targets(batch["labels"])


def batch_trained_count(batch: dict) -> int:
    """Tokens of a micro-batch (or of this rank's shard of it) that enter the loss. Host tensors."""
    if "next_labels" in batch:
        return int((batch["next_labels"] != IGNORE_INDEX).sum())
    return trained_count(batch["labels"])


class HiddenStatesHead(nn.Module):
    """Stands in for `lm_head` while training: the causal LM's forward returns the final hidden states
    (B, T, H) as its "logits", so [tokens x vocab] logits are never built for the whole batch. The real
    head stays as the child `.head`; it is never called (so ZeRO-3 never gathers it per call), and
    lm_head_nll_sum reads its weight."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def use_chunked_loss(model: nn.Module) -> nn.Parameter:
    """Swap the model's lm_head for HiddenStatesHead (after the checkpoint is loaded: names change);
    return the head weight (V, H), frozen (LoRA never targets the head)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"chunked loss expects a bias-free nn.Linear lm_head, got {type(head).__name__}")
    model.lm_head = HiddenStatesHead(head)
    # the root module is where ZeRO-3 keeps its registry of prefetches in flight (set by deepspeed.initialize)
    head.weight.llama_ft_root = weakref.ref(model)
    return head.weight


@contextlib.contextmanager
def gathered_head(weight: nn.Parameter) -> Iterator[None]:
    """The head weight whole for the block: gathered([weight]), unless ZeRO-3's prefetcher is already gathering
    it. A tied head is also the embedding, which the prefetcher's trace holds; GatheredParameters skips a
    parameter in flight (it gathers only NOT_AVAILABLE ones), so the head matmul would see an empty tensor and
    the exit would try to partition a parameter in flight (seen at a 1B shape with gradient checkpointing, step
    2). Such a prefetch is waited for (a host sync on its all-gather) and left to the coordinator to release."""
    status = getattr(weight, "ds_status", None)
    root = getattr(weight, "llama_ft_root", None)
    registry = getattr(root() if root is not None else None, "ds_inflight_param_registry", None)
    if status is not None and status.name == "INFLIGHT" and registry is not None and weight in registry:
        registry.pop(weight).wait()
        yield
        return
    with gathered([weight]):
        yield


def _chunked_nll(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                 with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(nll (N,), dnll/dx (N, H) or None): nll_i = -log softmax(x_i W^T)[y_i], `chunk` rows at a time.

    Per chunk c: z = x_c W^T (the model's dtype, then fp32; float64 stays float64), nll_c = lse(z) - z[y];
    and with `with_grad`, at once dnll_i/dx_i = (softmax(z_i) - onehot(y_i)) W. logsumexp and softmax are
    computed in place in z, so the largest temporary is one chunk's logits (chunk x V) in fp32 (plus its
    cast to the model's dtype for the last product).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nll = torch.empty(x.shape[0], dtype=acc, device=x.device)
    dx = torch.empty_like(x) if with_grad else None
    for s in range(0, x.shape[0], chunk):
        xc, yc = x[s:s + chunk], targets[s:s + chunk]
        z = torch.mm(xc, weight.t()).to(acc)  # (c, V)
        # logsumexp in place (torch.logsumexp would allocate a second (c, V) buffer): z becomes exp(z - max)
        target = z.gather(1, yc[:, None]).squeeze(1)
        top = z.amax(dim=-1, keepdim=True)
        denom = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
        nll[s:s + chunk] = (top + denom.log()).squeeze(1).sub(target)
        if dx is not None:
            z.div_(denom)  # softmax
            z[torch.arange(len(yc), device=z.device), yc] -= 1.0  # dnll/dz
            dx[s:s + chunk] = torch.mm(z.to(weight.dtype), weight)
        del z  # before the next chunk's product, not after it: one (c, V) buffer at a time
    return nll, dx


class ChunkedLMHeadNLL(torch.autograd.Function):
    """nll (N,) with nll_i = -log softmax(x_i W^T)[y_i] over chunks of `chunk` rows: x (N, H), W (V, H), y (N,);
    nll in fp32 (float64 for float64 x). SFT sums it (S, lm_head_nll_sum); DPO sums it per sequence.

    The per-row NLLs and dnll/dx come from _chunked_nll. W is used only in forward (ZeRO-3 gathers it
    once per micro-batch), and backward only scales the saved dnll/dx by the incoming gradient,
    dx_i = g_i * dnll_i/dx_i: exact, no recompute, and no host sync (DeepSpeed's TiledFusedLogitsLoss, the
    same idea, compares the incoming gradient with 1.0 on the host in its backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        nll, dx = _chunked_nll(x, weight, targets, chunk, ctx.needs_input_grad[0])
        ctx.save_for_backward(dx)
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dx,) = ctx.saved_tensors
        # scale in fp32: the incoming gradient is R/N (SFT), and rounding it to bf16 first would scale every
        # micro-batch by its own systematic error of up to 0.4%
        acc = torch.promote_types(dx.dtype, torch.float32)  # float64 stays float64
        return (dx.to(acc) * grad.to(acc)[:, None]).to(dx.dtype), None, None, None


def lm_head_nll_sum(hidden: torch.Tensor, weight: nn.Parameter, positions: torch.Tensor, targets: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """S of a micro-batch: hidden (B, T, H) from the model, the head weight (V, H) (a ZeRO-3 parameter or
    not), positions/targets from loss_targets (on hidden's device). Returns a () tensor in fp32 (float64
    for float64 inputs) that backpropagates into `hidden`."""
    with gathered_head(weight):  # ZeRO-3: the whole head once per micro-batch (on every rank: it is collective)
        if positions.numel() == 0:
            return hidden.sum() * 0.0  # nothing trained here: a zero that still reaches every parameter
        x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # untrained positions skip the head
        return ChunkedLMHeadNLL.apply(x, weight, targets, chunk).sum()


def sequence_logprobs(hidden: torch.Tensor, weight: nn.Parameter, positions: torch.Tensor, targets: torch.Tensor,
                      chunk: int, segments: torch.Tensor | None = None,
                      num_segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (S,), n (S,)): per sequence, the summed log-probability of its trained tokens and their count.

    hidden (B, T, H) from the model, the head weight (V, H), positions/targets from loss_targets (on
    hidden's device). A sequence is a batch row by default (segments = positions // T, S = B); a packed
    row holding several sequences passes `segments` (N,), the sequence index of each position, and
    `num_segments` S. logp is fp32 (float64 for float64 inputs) and backpropagates into `hidden`; n is int64.
    A sequence without trained tokens has logp = 0 and n = 0.
    """
    if segments is None:
        segments, num_segments = positions // hidden.shape[1], hidden.shape[0]
    if num_segments is None:
        raise ValueError("sequence_logprobs: pass num_segments with segments")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    counts = torch.bincount(segments, minlength=num_segments)
    with gathered_head(weight):  # ZeRO-3: the whole head once per micro-batch (on every rank: it is collective)
        if positions.numel() == 0:  # nothing trained here: zeros that still reach every parameter
            return hidden.sum().to(acc) * 0.0 + torch.zeros(num_segments, dtype=acc, device=hidden.device), counts
        x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # untrained positions skip the head
        nll = ChunkedLMHeadNLL.apply(x, weight, targets, chunk)
    logp = torch.zeros(num_segments, dtype=nll.dtype, device=nll.device).index_add(0, segments, -nll)
    return logp, counts


@dataclass(frozen=True)
class DPOTerms:
    """Per pair (P,): the loss l_p (differentiable) and the rewards beta (pi - ref) of each side (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_logps(logp_sum: torch.Tensor, counts: torch.Tensor, loss: str) -> torch.Tensor:
    """What DPO compares per sequence: the summed log-prob (sigmoid), or its mean over the response (ipo)."""
    if loss == "ipo":
        return logp_sum / counts.clamp(min=1).to(logp_sum.dtype)
    return logp_sum


def dpo_losses(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
               label_smoothing: float = 0.0) -> DPOTerms:
    """l_p and the rewards of P pairs (module doc), each input (P,) from dpo_logps; ref_* carry no gradient.

    The step's loss is sum(l_p) over its pairs scaled as SFT scales S (module doc), not a mean here: a
    micro-batch's mean would weigh a pair by how many pairs share its micro-batch.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r} (expected one of: {', '.join(DPO_LOSSES)})")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5 or (loss == "ipo" and label_smoothing):
        raise ValueError(f"DPO label smoothing must be in [0, 0.5] and applies to sigmoid only, got "
                         f"{label_smoothing} with {loss}")
    chosen_ratio, rejected_ratio = pi_chosen - ref_chosen.detach(), pi_rejected - ref_rejected.detach()
    d = chosen_ratio - rejected_ratio
    if loss == "ipo":
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    else:
        # logsigmoid is stable for large |beta d| (log(sigmoid(.)) would give log(0) = -inf)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * d)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * d)
    return DPOTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: a copy from pinned memory is truly
    asynchronous (from pageable memory the copy would wait for the work queued before it)."""
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def global_count(local: int, device: torch.device) -> torch.Tensor:
    """N: the sum of `local` over all ranks, as an int64 tensor on `device` (one all-reduce)."""
    n = to_device(torch.tensor(local, dtype=torch.int64), device)
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


class PreferenceMeter:
    """Running sums of DPO pair losses and rewards; read (all-reduced over ranks) only when logging.

    `add(terms)` per micro-batch keeps the sums on the device (no sync); `mean()` does one all-reduce and
    one host sync and returns TRL's metric names, each a mean over every pair since the last call.
    """

    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=self.device)  # + the pair count

    def add(self, terms: DPOTerms) -> None:
        c, r = terms.chosen_rewards.to(torch.float64), terms.rejected_rewards.to(torch.float64)
        pairs = torch.full((), c.numel(), dtype=torch.float64, device=c.device)
        loss = terms.losses.detach().to(torch.float64).sum()
        self.sums += torch.stack([loss, c.sum(), r.sum(), (c > r).to(torch.float64).sum(), pairs])

    def mean(self) -> dict[str, float]:
        """{"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "pairs"}."""
        t = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(t)
        *sums, pairs = t.tolist()  # host sync: once per logging step
        self.reset()
        out = {k: v / max(pairs, 1.0) for k, v in zip(self.KEYS, sums, strict=True)}
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {**out, "pairs": int(pairs)}
