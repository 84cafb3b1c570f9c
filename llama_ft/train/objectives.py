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
(data/collate.collate_pairs), or with --packing rows of whole pairs, each side its own sequence
(collate_packed_pairs: position_ids restart, `sequence_ids` say which side of which pair a token is), or with
--packing --dpo_shared_prompt rows of [prompt | chosen response | rejected response] per pair
(data/shared_prompt.py: the prompt runs once; the model gets that layout's 4-D mask, and the batch names each
trained token's predicting position, `target_positions`, since the prompt's last position predicts both sides).
The reference pass runs first, under torch.no_grad() and
lora.lora_disabled (the frozen base, FP8 included), then the policy pass with the adapters on; both are
collective under ZeRO-3, so every rank runs both on every micro-batch. Per sequence, logp and n come from
loss.sequence_logprobs on the hidden states (the model's head returns them: loss.use_chunked_loss), and
s = sum_p l_p from loss.dpo_losses. The reference goes first so that the policy forward is followed
directly by its backward, as in SFT (ZeRO-3 traces and prefetches parameters in the order it runs them).
With gradient checkpointing the policy pass is recomputed in backward with the adapters on (the block has
exited), as it must be; the reference pass saves nothing for backward. With --precompute_ref_logprobs the
reference log-probs come with the batch instead (attach; train/reference.py) and a step runs the policy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llama_ft.data.collate import collate_pairs
from llama_ft.data.shared_prompt import shared_prompt_mask
from llama_ft.lora import lora_disabled
from llama_ft.model.segment_attention import runs, segment_kwargs
from llama_ft.train.activation_memory import activation_offload
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

    def attach(self, batch: dict[str, torch.Tensor], examples: Sequence[int]) -> dict[str, torch.Tensor]:
        return batch

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
        self.flash = cfg.attn_implementation == "flash_attention_2"
        self.meter, self.t_window = PreferenceMeter(engine.device), time.time()
        # --precompute_ref_logprobs: (n, 2) reference log-prob sums [chosen, rejected] per training / eval pair
        self.train_refs: torch.Tensor | None = None
        self.eval_refs: torch.Tensor | None = None

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["pairs"])

    def terms(self, batch: dict[str, Any]) -> DPOTerms:
        """l_p and the rewards of the micro-batch's P pairs (train/loss.py), from its 2P sequences: padded rows
        (collate_pairs) or packed ones (collate_packed_pairs, `sequence_ids`). The reference log-probs come
        from the batch's `ref_logps` (2P,) when they were precomputed (attach), else from a reference pass."""
        cfg = self.cfg
        p = self.count(batch)
        inputs, positions, targets, segments, counts = self._sequences(batch)
        if "ref_logps" in batch:
            ref = to_device(batch["ref_logps"], self.engine.device)
        else:
            ref = self.reference_logps(inputs, positions, targets, segments, 2 * p)
        with activation_offload(cfg.activation_offload, pin_memory=torch.device(self.engine.device).type == "cuda"):
            hidden = self.engine(**inputs, use_cache=False).logits
        pi, _ = sequence_logprobs(hidden, self.head_weight, positions, targets, cfg.loss_chunk_size, segments, 2 * p)
        pi, ref = dpo_logps(pi, counts, cfg.dpo_loss), dpo_logps(ref.to(pi.dtype), counts, cfg.dpo_loss)
        return dpo_losses(pi[:p], pi[p:], ref[:p], ref[p:], cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing)

    def _sequences(self, batch: dict[str, Any]):
        """(model inputs, positions, targets, segments, counts) of a pair batch, on the device: the trained
        positions (loss.batch_targets), the sequence s in [0, 2P) each belongs to, and each sequence's token count.
        Found on the host (no device sync)."""
        device = self.engine.device
        if "target_positions" in batch:  # shared-prompt rows: the layout names them (data/shared_prompt.py)
            positions, targets, segments = (batch[k] for k in ("target_positions", "target_ids", "target_sequences"))
            counts = torch.bincount(segments, minlength=2 * self.count(batch))
            inputs = shared_prompt_inputs(batch, device, self.cfg.attn_implementation,
                                          torch.bfloat16 if self.cfg.bf16 else torch.float32)
            return (inputs, *(to_device(t, device) for t in (positions, targets, segments, counts)))
        positions, targets = batch_targets(batch)
        if "sequence_ids" in batch:  # packed: the sequence each trained position belongs to
            segments = batch["sequence_ids"].reshape(-1)[positions]
        else:  # padded: sequence = row
            segments = positions // batch["input_ids"].shape[1]
        counts = torch.bincount(segments, minlength=2 * self.count(batch))
        inputs = model_inputs(batch, "sequence_ids" in batch, self.flash, device)
        return (inputs, *(to_device(t, device) for t in (positions, targets, segments, counts)))

    def reference(self, batch: dict[str, Any]) -> torch.Tensor:
        """logp (2P,) of a pair batch's sequences under the frozen base (reference_logps); collective."""
        inputs, positions, targets, segments, _ = self._sequences(batch)
        return self.reference_logps(inputs, positions, targets, segments, 2 * self.count(batch))

    @torch.no_grad()
    def reference_logps(self, inputs: dict[str, Any], positions: torch.Tensor, targets: torch.Tensor,
                        segments: torch.Tensor, sequences: int) -> torch.Tensor:
        """logp (S,) of each sequence under the frozen base: the model with its adapters off (lora_disabled),
        no gradient, nothing saved for backward. Collective under ZeRO-3."""
        with lora_disabled(self.engine.module):
            hidden = self.engine(**inputs, use_cache=False).logits
            ref, _ = sequence_logprobs(hidden, self.head_weight, positions, targets, self.cfg.loss_chunk_size,
                                       segments, sequences)
        return ref

    def attach(self, batch: dict[str, Any], examples: Sequence[int]) -> dict[str, Any]:
        """The batch with the precomputed reference log-probs of its pairs (`examples`: their indices in the
        training split, in batch order) as `ref_logps` (2P,) = [chosen .., rejected ..]; unchanged without
        --precompute_ref_logprobs."""
        if self.train_refs is None:
            return batch
        return {**batch, "ref_logps": side_columns(self.train_refs[list(examples)])}

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
        for picked in rank_batches(len(pairs), self.world, self.rank, batch):
            micro = collate_pairs([pairs[i] for i in picked or [0]], self.pad_id)
            if self.eval_refs is not None:
                micro["ref_logps"] = side_columns(self.eval_refs[picked or [0]])
            terms = self.terms(micro)
            if picked:
                meter.add(terms)
        engine.train(was_training)
        w = meter.mean()
        return {f"eval_{k}": v for k, v in w.items()}


def shared_prompt_inputs(batch: dict[str, Any], device, attn_implementation: str,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model inputs of shared-prompt rows: input_ids, position_ids and the layout's (B, 1, T, T) mask
    (data/shared_prompt.shared_prompt_mask), built on the device from the (B, T) group and branch ids.
    transformers passes a 4-D mask through as it is (masking_utils): sdpa takes it boolean (True: attend),
    eager adds it to the scores, so eager gets it additive (0 or the dtype's lowest value). Each pair (a run of
    one group id) is also named as a segment: segment_sdpa computes each pair's attention apart, under its
    part of the mask (model/segment_attention.py)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"the shared-prompt layout needs a 4-D mask: sdpa or eager, not {attn_implementation}")
    groups, branches = (to_device(batch[k], device) for k in ("group_ids", "branch_ids"))
    mask = shared_prompt_mask(groups, branches)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return {**{k: to_device(batch[k], device) for k in ("input_ids", "position_ids")}, "attention_mask": mask,
            **segment_kwargs(runs(batch["group_ids"]), causal=False)}


def rank_batches(n: int, world: int, rank: int, batch: int) -> Iterator[list[int]]:
    """This rank's batches of up to `batch` of n items, item i on rank i mod `world`. Every rank gets the same
    number of batches (ZeRO-3 forward passes are collective): a rank with nothing left gets [] (the caller runs
    item 0 and does not count it)."""
    mine = list(range(n))[rank::world]
    for k in range(math.ceil(math.ceil(n / world) / batch)):
        yield mine[k * batch:(k + 1) * batch]


def side_columns(refs: torch.Tensor) -> torch.Tensor:
    """(P, 2) per-pair [chosen, rejected] values as the (2P,) sequence order of a pair batch: chosen first."""
    return torch.cat([refs[:, 0], refs[:, 1]])


def make_objective(cfg: Any, engine, head_weight, pad_id: int, world: int, rank: int, eval_args: dict[str, Any]):
    """SFT or DPO for `cfg.objective`; `world`/`rank` are the data-parallel ones; `eval_args` are the SFT eval's
    settings (evaluate.evaluate's keyword arguments after the examples)."""
    if cfg.objective == "dpo":
        return DPO(engine, head_weight, pad_id, cfg, world, rank)
    return SFT(engine, head_weight, pad_id, cfg, eval_args)

