"""The training objectives: what one micro-batch contributes to the step's loss, and what is logged of it.

    objective = make_objective(cfg, engine, head_weight, pad_id)     SFT or DPO, from --objective
    n = objective.count(batch)          what the step loss is a mean over: trained tokens (SFT) or pairs (DPO)
    s = objective.loss(batch)           the micro-batch's SUM of that loss (a scalar with a gradient)
    engine.backward(s * backward_scale(global_count(sum of n over the step), R))

so either step loss is sum(s) / N over every micro-batch and rank of the step (train/loss.py, DESIGN.md
"The loss"). `loss` also adds the micro-batch to the objective's meter; `window()` reads the meter once per
logging step (one all-reduce) and `evaluate(examples)` scores held-out examples on all ranks together.

SFT: s = S, the summed token cross-entropy (evaluate.micro_batch_nll).

DPO: a micro-batch of B pairs is one batch of 2B right-padded rows [c_1 .. c_B, r_1 .. r_B]
(data/collate.collate_pairs). The reference pass runs first, under torch.no_grad() and
lora.lora_disabled (the frozen base, FP8 included), then the policy pass with the adapters on; both are
collective under ZeRO-3, so every rank runs both on every micro-batch. Per sequence, logp and n come from
loss.sequence_logprobs on the hidden states (the model's head returns them: loss.use_chunked_loss), and
s = sum_p l_p from loss.dpo_losses. The reference goes first so that the policy forward is followed
directly by its backward, as in SFT (ZeRO-3 traces and prefetches parameters in the order it runs them).
With gradient checkpointing the policy pass is recomputed in backward with the adapters on (the block has
exited), as it must be; the reference pass saves nothing for backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from llama_ft.data.collate import collate_pairs
from llama_ft.lora import lora_disabled
from llama_ft.train.evaluate import evaluate, micro_batch_nll, model_inputs
from llama_ft.train.loss import (
    DPOTerms,
    LossMeter,
    PreferenceMeter,
    batch_targets,
    batch_trained_count,
    dpo_logps,
    dpo_losses,
    sequence_logprobs,
    to_device,
)


class SFT:
    """Token cross-entropy (train/loss.py): the step loss is nats per trained token."""

    def __init__(self, engine, head_weight, pad_id: int, cfg: Any, eval_args: dict[str, Any]) -> None:
        self.engine, self.head_weight, self.cfg, self.eval_args = engine, head_weight, cfg, eval_args
        self.meter, self.t_window = LossMeter(engine.device), time.time()

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch_trained_count(batch)  # host tensors: no device sync

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        nll = micro_batch_nll(self.engine, self.head_weight, batch, cfg.packing, cfg.loss_chunk_size,
                              cfg.attn_implementation == "flash_attention_2", cfg.activation_offload)
        self.meter.add(nll, self.count(batch), int(batch["attention_mask"].sum()))
        return nll

    def window(self) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics since the last call, the progress bar's part of them); one all-reduce."""
        w = self.meter.mean()
        elapsed, self.t_window = max(time.time() - self.t_window, 1e-9), time.time()
        record = {"loss": w["loss"], "trained_tokens": w["trained_tokens"], "tokens_per_s": w["tokens"] / elapsed,
                  "trained_tokens_per_s": w["trained_tokens"] / elapsed}
        return record, {"tok_s": f"{record['tokens_per_s']:.0f}",
                        "trained_tok_s": f"{record['trained_tokens_per_s']:.0f}"}

    def evaluate(self, examples) -> dict[str, float]:
        """{"eval_loss"}: nats per trained token over `examples` (evaluate.evaluate)."""
        return {"eval_loss": evaluate(self.engine, self.head_weight, examples, **self.eval_args)["loss"]}


class DPO:
    """Direct preference optimization on pairs against the adapters-off reference (module doc)."""

    def __init__(self, engine, head_weight, pad_id: int, cfg: Any, world: int, rank: int) -> None:
        self.engine, self.head_weight, self.pad_id, self.cfg = engine, head_weight, pad_id, cfg
        self.world, self.rank = world, rank
        self.meter, self.t_window = PreferenceMeter(engine.device), time.time()

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["pairs"])

    def terms(self, batch: dict[str, Any]) -> DPOTerms:
        """l_p and the rewards of the micro-batch's B pairs (train/loss.py), from its 2B rows."""
        engine, cfg, device = self.engine, self.cfg, self.engine.device
        positions, targets = batch_targets(batch)  # host: no sync to find the response tokens
        positions, targets = to_device(positions, device), to_device(targets, device)
        inputs = model_inputs(batch, False, False, device)
        with torch.no_grad(), lora_disabled(engine.module):
            hidden = engine(**inputs, use_cache=False).logits  # (2B, T, H)
            ref, counts = sequence_logprobs(hidden, self.head_weight, positions, targets, cfg.loss_chunk_size)
        del hidden
        hidden = engine(**inputs, use_cache=False).logits
        pi, _ = sequence_logprobs(hidden, self.head_weight, positions, targets, cfg.loss_chunk_size)
        pi, ref = dpo_logps(pi, counts, cfg.dpo_loss), dpo_logps(ref, counts, cfg.dpo_loss)
        b = self.count(batch)
        return dpo_losses(pi[:b], pi[b:], ref[:b], ref[b:], cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        terms = self.terms(batch)
        self.meter.add(terms)
        return terms.losses.sum()

    def window(self) -> tuple[dict[str, float], dict[str, str]]:
        """(metrics since the last call, TRL's names; the progress bar's part); one all-reduce."""
        w = self.meter.mean()
        elapsed, self.t_window = max(time.time() - self.t_window, 1e-9), time.time()
        record = {**w, "pairs_per_s": w["pairs"] / elapsed}
        return record, {"margin": f"{w['rewards/margins']:.3f}", "acc": f"{w['rewards/accuracies']:.2f}"}

    @torch.no_grad()
    def evaluate(self, pairs: Sequence[Any]) -> dict[str, float]:
        """{"eval_loss", "eval_rewards/chosen", ...}: the DPO loss and rewards over every held-out pair, on all
        data-parallel ranks together (pair i on rank i mod W). Every rank runs the same number of forward
        passes (ZeRO-3 gathers are collective): a rank with nothing left repeats pair 0 and does not count it."""
        engine, batch = self.engine, self.cfg.per_device_train_batch_size
        was_training = engine.training
        engine.eval()
        meter = PreferenceMeter(engine.device)
        mine = list(range(len(pairs)))[self.rank::self.world]
        for k in range(math.ceil(math.ceil(len(pairs) / self.world) / batch)):
            picked = mine[k * batch:(k + 1) * batch]
            terms = self.terms(collate_pairs([pairs[i] for i in picked or [0]], self.pad_id))
            if picked:
                meter.add(terms)
        engine.train(was_training)
        w = meter.mean()
        return {f"eval_{k}": v for k, v in w.items()}


def make_objective(cfg: Any, engine, head_weight, pad_id: int, world: int, rank: int, eval_args: dict[str, Any]):
    """SFT or DPO for `cfg.objective`; `world`/`rank` are the data-parallel ones; `eval_args` are the SFT eval's
    settings (evaluate.evaluate's keyword arguments after the examples)."""
    if cfg.objective == "dpo":
        return DPO(engine, head_weight, pad_id, cfg, world, rank)
    return SFT(engine, head_weight, pad_id, cfg, eval_args)

