"""Packing: best-fit rows, the packed stream, collation, and packed logits/eval against unpacked ones."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_ft.data import IGNORE_INDEX, MicroBatches, collate_packed
from llama_ft.data.batches import epoch_rows
from llama_ft.data.packing import pack_best_fit
from llama_ft.errors import UserError
from llama_ft.train.evaluate import evaluate
from llama_ft.train.loss import use_chunked_loss


def _brute_best_fit(lengths, order, cap):
    """The textbook algorithm, O(n * rows): longest first, into the fullest row that still fits."""
    rows, rooms = [], []
    for i in sorted(order, key=lambda j: -lengths[j]):
        fits = [r for r in range(len(rows)) if rooms[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (rooms[r], -r))  # least room; among equals the newest row (our stack)
            rows[r].append(i)
            rooms[r] -= lengths[i]
        else:
            rows.append([i])
            rooms.append(cap - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_textbook_and_never_splits(seed):
    rng = random.Random(seed)
    lengths = [min(int(rng.lognormvariate(4.5, 0.8)) + 1, 512) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    rows = pack_best_fit(lengths, order, 512)
    assert sorted(i for r in rows for i in r) == list(range(300))  # every example once, whole
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert [sorted(r) for r in rows] == [sorted(r) for r in _brute_best_fit(lengths, order, 512)]
    lower = -(-sum(lengths) // 512)
    assert len(rows) <= lower + 2  # best-fit decreasing is close to the bound on this data
    with pytest.raises(ValueError):
        pack_best_fit([600], [0], 512)


def test_packed_stream_each_example_once_per_epoch_deterministic_and_resumable():
    rng = random.Random(0)
    examples = [{"input_ids": [k] * n, "labels": [k] * n} for k, n in enumerate(rng.randint(1, 60) for _ in range(97))]
    world, batch = 2, 3
    lengths = [len(e["input_ids"]) for e in examples]
    for epoch in range(3):
        rows = epoch_rows(lengths, 7, epoch, 64)
        assert Counter(i for r in rows for i in r) == Counter(range(97))
        assert rows == epoch_rows(lengths, 7, epoch, 64)  # deterministic in (seed, epoch)
    assert epoch_rows(lengths, 7, 0, 64) != epoch_rows(lengths, 7, 1, 64)  # a new epoch packs anew

    def seen(stream, steps):
        out = []
        for _ in range(steps):
            b = next(stream)
            ids = b["input_ids"][b["attention_mask"].bool()]
            starts = (b["position_ids"] == 0) & b["attention_mask"].bool()
            out.append(ids[starts[b["attention_mask"].bool()]].tolist())  # first token of each example = its id
        return out

    streams = [MicroBatches(examples, world, r, batch, 7, pad_id=999, pack_len=64) for r in range(world)]
    per_epoch = streams[0].per_epoch
    got = [k for s in streams for step in seen(s, per_epoch) for k in step]
    assert len(got) == len(set(got))  # no example twice in an epoch, none split
    rows = epoch_rows(lengths, 7, 0, 64)
    kept = rows[:per_epoch * world * batch]  # an incomplete last global batch is dropped
    assert sorted(got) == sorted(i for r in kept for i in r)
    # resume from (epoch, index) continues exactly, across an epoch boundary
    full = seen(MicroBatches(examples, world, 1, batch, 7, pad_id=999, pack_len=64), per_epoch + 3)
    head_stream = MicroBatches(examples, world, 1, batch, 7, pad_id=999, pack_len=64)
    head = seen(head_stream, per_epoch - 1)
    tail = seen(MicroBatches(examples, world, 1, batch, 7, 999, head_stream.epoch, head_stream.index, 64), 4)
    assert head + tail == full
    with pytest.raises(UserError, match="packed rows"):
        MicroBatches(examples[:3], 2, 0, 2, 0, 0, pack_len=64)


def test_collate_packed_positions_labels_and_padding():
    rows = [[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, IGNORE_INDEX]}],
            [{"input_ids": [1], "labels": [1]}]]
    b = collate_packed(rows, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding is its own block
    # each example's first label is dropped: the last token of one example never predicts the next one
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def _examples(tok, n=7):
    rng = random.Random(3)
    words = ["silver", "castle", "quiet", "apple", "meadow"]
    out = []
    for _ in range(n):
        ids = tok(" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))))["input_ids"]
        labels = [IGNORE_INDEX] * (len(ids) // 2) + ids[len(ids) // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(fp32_model, attn):
    model, tok = fp32_model
    model.config._attn_implementation = attn
    examples = _examples(tok)
    b = collate_packed([examples[:4], examples[4:]], tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        at = {0: 0, 1: 0}
        for k, e in enumerate(examples):
            r = 0 if k < 4 else 1
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            got = packed[r, at[r]:at[r] + len(e["input_ids"])]
            assert ((got - alone).abs().max() / alone.abs().max()).item() <= 1e-5, (attn, k)
            at[r] += len(e["input_ids"])
        # the trap: an attention mask (even all ones) or a cache turns the packed mask off
        mask = torch.ones_like(b["input_ids"])
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask,
                      use_cache=False).logits
        n0 = len(examples[0]["input_ids"])
        assert (leaky[0, n0:] - packed[0, n0:]).abs().max() > 1e-3


def test_flash_inputs_are_one_sequence_with_host_boundaries():
    """Packed rows under flash_attention_2: one (1, B*T) sequence and cu_seq_lens where position_ids restart."""
    from llama_ft.train.evaluate import model_inputs

    b = collate_packed([[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
                        [{"input_ids": [1], "labels": [1]}]], pad_token_id=0)
    got = model_inputs(b, packed=True, flash=True, device=torch.device("cpu"))
    assert got["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 0, 0, 0, 0]]
    assert got["cu_seq_lens_q"].tolist() == got["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 10]  # + the padding block
    assert got["cu_seq_lens_q"].dtype == torch.int32 and got["max_length_q"] == got["max_length_k"] == 4
    assert "attention_mask" not in got
    plain = model_inputs(b, True, False, "cpu")  # sdpa/eager: the rows' sequences for segment_sdpa, no mask
    assert set(plain) == {"input_ids", "position_ids", "llama_ft_segments"}
    assert plain["llama_ft_segments"].bounds == (((0, 3), (3, 5)), ((0, 1), (1, 5)))


def test_eval_ranks_run_as_many_forwards_and_count_only_their_rows(fp32_model):
    """3 examples on 2 ranks, batch 1: rank 1 has one row and repeats it once without counting it."""
    _, tok = fp32_model
    calls = []

    class Counting(_Engine):
        def __call__(self, **kw):
            calls.append(kw["input_ids"].shape)
            return super().__call__(**kw)

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    head = use_chunked_loss(model)
    examples = _examples(tok, 3)
    for rank in (0, 1):
        calls.clear()
        loss = evaluate(Counting(model), head, examples, 1, tok.pad_token_id, 2, rank, None, 16)["loss"]
        assert len(calls) == 2  # the same number of forwards on every rank: ZeRO-3 gathers are collective
        mine = examples[rank::2]
        alone = evaluate(_Engine(model), head, mine, 1, tok.pad_token_id, 1, 0, None, 16)["loss"]
        assert abs(loss - alone) < 1e-6  # the repeated row is not counted


class _Engine:
    """What evaluate() needs of a DeepSpeed engine, around a plain module (one process, no ZeRO)."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)

    @property
    def training(self):
        return self.module.training

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def test_eval_loss_is_the_same_packed_or_not(tiny_model_dir, fp32_model):
    _, tok = fp32_model
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    examples = _examples(tok, 9)
    nll, n = 0.0, 0
    with torch.no_grad():
        for e in examples:  # float64 reference, one example at a time
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            y = torch.tensor(e["labels"][1:])
            nll += torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += int((y != IGNORE_INDEX).sum())
    head = use_chunked_loss(model)
    engine = _Engine(model)
    unpacked = evaluate(engine, head, examples, 2, tok.pad_token_id, 1, 0, None, 16)["loss"]
    packed = evaluate(engine, head, examples, 2, tok.pad_token_id, 1, 0, 256, 16)["loss"]
    assert abs(unpacked - nll / n) < 1e-10 and abs(packed - nll / n) < 1e-10
