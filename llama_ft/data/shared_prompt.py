"""Packed preference pairs with the prompt once per pair (--packing --dpo_shared_prompt).

A pair's two sides are the same prompt tokens followed by different responses: chosen = x + c, rejected =
x + r, with x the longest common prefix of the two sides' ids that no label of either side trains (P = |x|:
the shared prompt, the chat template's assistant header included). In a packed row the pair takes
P + |c| + |r| tokens instead of 2P + |c| + |r|:

    tokens      x_0 .. x_{P-1} | c_0 .. c_{|c|-1} | r_0 .. r_{|r|-1}
    positions   0 .. P-1       | P .. P+|c|-1     | P .. P+|r|-1         (r continues from x's end, as if c
                                                                           were not there)
    branch      0 (prompt)     | 1 (chosen)       | 2 (rejected)
    group       k (the pair's number in the micro-batch) on all three; -1 on padding

Token i attends token j (j at or before i in the row) iff both have the same group and branch_j is 0 or
branch_i: the prompt sees itself causally, each response sees the prompt and itself causally, and the
rejected response never sees the chosen one. With these positions and this mask every token computes
exactly what it computes in its own side as a separate sequence, so the per-token log-probs are the same.

Targets. Side token t is trained when its label y_t is (labels unshifted: token t - 1 predicts y_t); its
predicting position in the row is where side token t - 1 sits: in x for t - 1 < P, else in that side's
response. So the first rejected token is predicted from x's last position, the same position that predicts
the first chosen token, and never from the chosen response's last token. collate_shared_pairs returns these
(position, target, sequence) triples explicitly (a (B, T) label tensor cannot say that one position predicts
two tokens); `labels` there is the row layout of the labels, for counting only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from llama_ft.data.formats import IGNORE_INDEX

SIDES = ("chosen", "rejected")
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_prefix_length(chosen_ids: Sequence[int], chosen_labels: Sequence[int], rejected_ids: Sequence[int],
                         rejected_labels: Sequence[int]) -> int:
    """P: the longest common prefix of both sides' ids in which neither side has a trained label (module doc)."""
    n = min(len(chosen_ids), len(rejected_ids))
    p = 0
    while (p < n and chosen_ids[p] == rejected_ids[p] and chosen_labels[p] == IGNORE_INDEX
           and rejected_labels[p] == IGNORE_INDEX):
        p += 1
    return p


def shared_prefix_lengths(examples: Any, block: int = 4096) -> list[int]:
    """P of every pair of `examples` (a datasets.Dataset of data/pairs.py columns, or a list of dicts). For a
    Dataset, blocks of `block` pairs at a time as numpy arrays (one comparison per token, no Python loop over
    tokens)."""
    if not hasattr(examples, "with_format"):
        return [shared_prefix_length(e["chosen_input_ids"], e["chosen_labels"], e["rejected_input_ids"],
                                     e["rejected_labels"]) for e in examples]
    import numpy as np

    out: list[int] = []
    view = examples.with_format("arrow")
    for s in range(0, len(examples), block):
        table = view[s:s + block]
        cols = {}
        for name in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            col = table.column(name).combine_chunks()
            cols[name] = (col.offsets.to_numpy(), col.values.to_numpy())
        (oc, ic), (_, lc) = cols["chosen_input_ids"], cols["chosen_labels"]
        (orj, ir), (_, lr) = cols["rejected_input_ids"], cols["rejected_labels"]
        m = np.minimum(np.diff(oc), np.diff(orj))  # comparable tokens per pair
        pair = np.repeat(np.arange(len(m)), m)
        k = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)  # token index within the pair
        a, b = oc[:-1][pair] + k, orj[:-1][pair] + k
        same = (ic[a] == ir[b]) & (lc[a] == IGNORE_INDEX) & (lr[b] == IGNORE_INDEX)
        # P = index of the first mismatch, or m where there is none
        bad = np.nonzero(~same)[0]
        first_bad = np.full(len(m), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first_bad, pair[bad], k[bad])
        out.extend(np.minimum(first_bad, m).tolist())
    return out


def shared_pair_length(pair: Mapping[str, Sequence[int]], prefix: int) -> int:
    """Tokens the pair takes in a row: P + |c| + |r| (module doc)."""
    return len(pair["chosen_input_ids"]) + len(pair["rejected_input_ids"]) - prefix


def collate_shared_pairs(rows: Sequence[Sequence[Mapping[str, Sequence[int]]]], pad_token_id: int,
                         prefixes: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Packed rows of whole pairs in the shared-prompt layout (module doc) -> tensors of shape (rows, width):

        input_ids       x | c | r of each pair one after the other, then `pad_token_id`
        position_ids    as in the module doc; the padding counts 0, 1, ... as its own block
        group_ids       pair k (0..P-1, numbered in row order, then within a row) on its tokens, -1 on padding
        branch_ids      0 on a prompt, 1 on a chosen response, 2 on a rejected one, 0 on padding
        labels          each token's own label in that layout (IGNORE_INDEX on the prompt and the padding):
                        for counting trained tokens only, NOT for the loss
        attention_mask  1 on real tokens, 0 on padding: for counting only (the model gets shared_prompt_mask)

    and the loss's (N,) int64 triples, in the order chosen sides of every pair, then rejected sides:

        target_positions   flat index row * width + column of the predicting token
        target_ids         the token it is trained to predict
        target_sequences   the sequence: k for pair k's chosen side, P + k for its rejected side

    plus "pairs": P. `prefixes` gives each pair's P (shared_prefix_length) where already known.
    """
    if not rows or not all(rows):
        raise ValueError("collate_shared_pairs needs rows of at least one pair each")
    if prefixes is None:
        prefixes = [[shared_prefix_length(p["chosen_input_ids"], p["chosen_labels"], p["rejected_input_ids"],
                                          p["rejected_labels"]) for p in row] for row in rows]
    lengths = [sum(shared_pair_length(p, k) for p, k in zip(row, ks, strict=True))
               for row, ks in zip(rows, prefixes, strict=True)]
    width, total = max(lengths), sum(len(row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    group_ids = torch.full(shape, -1, dtype=torch.int64)
    branch_ids = torch.zeros(shape, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    triples: dict[str, list[list[torch.Tensor]]] = {side: [[], [], []] for side in SIDES}
    k = 0
    for row_index, (row, ks) in enumerate(zip(rows, prefixes, strict=True)):
        base, at = row_index * width, 0
        for pair, p in zip(row, ks, strict=True):
            ids = {side: torch.as_tensor(pair[f"{side}_input_ids"], dtype=torch.int64) for side in SIDES}
            lab = {side: torch.as_tensor(pair[f"{side}_labels"], dtype=torch.int64) for side in SIDES}
            input_ids[row_index, at:at + p] = ids["chosen"][:p]
            position_ids[row_index, at:at + p] = torch.arange(p)
            group_ids[row_index, at:at + p] = k
            prompt_at, at = at, at + p
            for s, side in enumerate(SIDES):
                n = len(ids[side]) - p  # the response
                if len(lab[side]) != len(ids[side]):
                    raise ValueError(f"pair {k}: {len(lab[side])} {side} labels for {len(ids[side])} input_ids")
                input_ids[row_index, at:at + n] = ids[side][p:]
                labels[row_index, at:at + n] = lab[side][p:]
                position_ids[row_index, at:at + n] = torch.arange(p, p + n)
                group_ids[row_index, at:at + n] = k
                branch_ids[row_index, at:at + n] = CHOSEN + s
                # side token t sits at prompt_at + t (t < P) or at + t - P (t >= P); token t - 1 predicts y_t
                where = torch.cat([torch.arange(prompt_at, prompt_at + p), torch.arange(at, at + n)])
                t = torch.nonzero(lab[side][1:] != IGNORE_INDEX).squeeze(1) + 1
                triples[side][0].append(base + where[t - 1])
                triples[side][1].append(lab[side][t])
                triples[side][2].append(torch.full((len(t),), k + s * total, dtype=torch.int64))
                at += n
            k += 1
        attention_mask[row_index, :at] = 1
        position_ids[row_index, at:] = torch.arange(width - at)
    positions, targets, sequences = (torch.cat([*triples["chosen"][i], *triples["rejected"][i]]) for i in range(3))
    return {"input_ids": input_ids, "position_ids": position_ids, "group_ids": group_ids, "branch_ids": branch_ids,
            "labels": labels, "attention_mask": attention_mask, "target_positions": positions,
            "target_ids": targets, "target_sequences": sequences, "pairs": total}


def shared_prompt_mask(group_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of shared-prompt rows (module doc): bool (B, 1, T, T), True where query i may attend
    key j: j <= i, the same group, and branch_j in (0, branch_i). Every query attends at least itself. Built
    on group_ids' device from the (B, T) ids, so only those travel to the device."""
    t = group_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=group_ids.device).tril_()
    same = group_ids[:, :, None] == group_ids[:, None, :]
    branch_ok = (branch_ids[:, None, :] == PROMPT) | (branch_ids[:, None, :] == branch_ids[:, :, None])
    return (same & branch_ok & causal)[:, None]
