"""Long context: Ulysses sequence parallelism, tiled MLP and activation offload (issue 13).

- The split of a micro-batch (train/parallel.py) against hand-built shards: labels shifted before the split,
  widths and short batches padded, packed rows made one varlen row for flash.
- The tiled MLP's and the offloaded forward's gradients against the plain model's (single process, float64
  for bf16-style layers, fp32 for FP8 ones); the chunked ("tiled") loss is checked against float64 in
  tests/test_loss.py.
- 5 optimizer steps on CPU ranks, fp32, dropout 0: SP=2 on 2 ranks against SP=1 on 1 rank with the same global
  batch (per-step losses, gradient norms, eval loss, final adapters); the same with --quantize, where the SP=2
  run also tiles its MLPs and offloads its checkpoints. tests/test_token_loss.py checks an SP=2 step against a
  float64 reference and resumes it exactly.
- Each refused combination is one line before any work; one whose heads cannot be split names both head counts
  and the sizes that would work, and stops run-llama.sh before it launches (through `llama-ft plan`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_e2e import _metrics, run_llama
from test_plan import _fake_launch

from llama_ft.data import IGNORE_INDEX, collate, collate_packed
from llama_ft.errors import UserError
from llama_ft.lora import LLAMA_LINEAR_NAMES, LoraSpec
from llama_ft.train.activation_memory import activation_offload, use_tiled_mlp
from llama_ft.train.parallel import shard_micro_batch
from llama_ft.train.recipe import main as train_main
from llama_ft.train.sp_layout import LayoutError, SequenceParallel, check_sequence_parallel, mlp_tiles, working_sizes

PAD = 0


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_unpacked_batch_is_split_after_the_shift_and_padded():
    ex = _examples([7, 4])
    batch = collate(ex, PAD)  # (2, 7)
    shards = [shard_micro_batch(batch, SequenceParallel.of(r, 2, 2), rows=3, multiple=4, pad_id=PAD, packed=False,
                                flash=False) for r in range(2)]
    whole = {k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "position_ids", "next_labels",
                                                                   "attention_mask")}
    # width 7 -> 8 (a multiple of 4), rows 2 -> 3 (Ulysses checks the micro-batch size)
    assert all(s["input_ids"].shape == (3, 4) for s in shards)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert whole["input_ids"][i].tolist() == e["input_ids"] + [PAD] * (8 - n)
        assert whole["next_labels"][i].tolist() == e["labels"][1:] + [IGNORE_INDEX] * (9 - n)
        assert whole["attention_mask"][i].tolist() == [1] * n + [0] * (8 - n)
        assert whole["position_ids"][i].tolist() == list(range(8))
    assert whole["input_ids"][2].tolist() == [PAD] * 8 and (whole["next_labels"][2] == IGNORE_INDEX).all()
    # the label of rank 0's last token is rank 1's first: it crosses the split, as the shift demands
    assert shards[0]["next_labels"][0, -1].item() == ex[0]["labels"][4]
    trained = sum(int((s["next_labels"] != IGNORE_INDEX).sum()) for s in shards)
    assert trained == sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in ex)


def test_packed_rows_for_flash_become_one_varlen_row():
    ex = _examples([5, 3, 6, 2])
    batch = collate_packed([[ex[0], ex[1]], [ex[2], ex[3]]], PAD)  # 2 rows of 8
    shards = [shard_micro_batch(batch, SequenceParallel.of(r, 4, 2), rows=1, multiple=6, pad_id=PAD, packed=True,
                                flash=True) for r in range(2)]
    assert shards[0]["input_ids"].shape == (1, 9)  # 16 tokens -> 18, a multiple of 6; 9 each
    positions = torch.cat([s["position_ids"] for s in shards], dim=1)[0].tolist()
    assert positions == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1]  # examples, then the padding block
    for s in shards:  # the boundaries of the WHOLE row: the core attention runs on the gathered sequence
        assert s["cu_seq_lens"].tolist() == [0, 5, 8, 14, 16, 18] and s["max_length"] == 6
    labels = torch.cat([s["next_labels"] for s in shards], dim=1)[0]
    assert labels[4] == IGNORE_INDEX and labels[7] == IGNORE_INDEX  # no label crosses an example or a row
    assert SequenceParallel.of(3, 4, 2) == SequenceParallel(2, 1, 1, 2)  # DeepSpeed's groups: consecutive ranks


HEADS_9_3 = ("--sequence_parallel_size 2: the model's 9 query heads and 3 KV heads (M/config.json num_attention_heads, "
             "num_key_value_heads) cannot be split over 2 ranks (each rank takes query heads / 2; the KV heads must "
             "divide or be divisible by 2); sizes that work with these heads: 3, 9 (with 2 ranks: none)")


@pytest.mark.parametrize("args,needle", [
    ((3, 4, 32, 8, "sdpa", False), "does not divide the 4 ranks (data-parallel size = ranks / sequence-parallel size); "
                                   "sizes that work with 4 ranks and the model's heads: 2, 4"),
    ((8, 8, 12, 4, "sdpa", False), "the model's 12 query heads and 4 KV heads (M/config.json"),
    ((8, 8, 12, 4, "sdpa", False), "sizes that work with these heads: 2, 4, 12 (with 8 ranks: 2, 4)"),
    ((4, 8, 32, 6, "sdpa", False), "the model's 32 query heads and 6 KV heads"),
    ((4, 8, 32, 6, "sdpa", False), "sizes that work with these heads: 2 (with 8 ranks: 2)"),
    ((2, 2, 9, 3, "sdpa", False), HEADS_9_3),  # SmolLM2-135M's heads (issue 20)
    ((2, 2, 32, 8, "eager", False), "--attn_implementation eager"),
    ((2, 2, 32, 8, "sdpa", True), "--packing with --sequence_parallel_size 2 needs --attn_implementation flash"),
])
def test_refused_sequence_parallel_layouts(args, needle):
    with pytest.raises(LayoutError) as e:  # a UserError: one line, exit 2, in training
        check_sequence_parallel(*args, model="M")
    assert isinstance(e.value, UserError) and needle in str(e.value), str(e.value)
    check_sequence_parallel(8, 8, 32, 8, "sdpa", False, "M")  # Llama 3.1 8B on 8 ranks: 4 heads, 1 KV head each
    check_sequence_parallel(16, 16, 128, 8, "flash_attention_2", True, "M")  # 405B: KV heads replicated 2x


def _lora_model(model_dir, quantize: bool, dtype):
    from llama_ft.model.build import build_lora_model
    from llama_ft.train.loss import use_chunked_loss

    torch.manual_seed(0)  # the same LoRA A in every model built here
    model, _ = build_lora_model(model_dir, LoraSpec(8, 16, 0.0, tuple(LLAMA_LINEAR_NAMES)), None, dtype,
                                gradient_checkpointing=True, quantize=quantize)
    with torch.no_grad():  # B = 0 at init: give every LoRA product a value so its gradient is not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    model.train()
    return model, use_chunked_loss(model)


def _loss_and_grads(model, head, batch, offload=False):
    from llama_ft.train.loss import lm_head_nll_sum, loss_targets

    model.zero_grad()
    positions, targets = loss_targets(batch["labels"])
    with activation_offload(offload, pin_memory=False):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll = lm_head_nll_sum(hidden, head, positions, targets, 16)
    nll.backward()
    return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantize,dtype,rtol", [(False, torch.float64, 1e-10), (True, torch.float32, 1e-5)])
def test_tiled_mlp_and_offload_give_the_plain_gradients(tiny_model_dir, quantize, dtype, rtol, monkeypatch):
    batch = collate(_examples([24, 17, 9], seed=1), PAD)  # width 24: 3 slices of 8
    plain, head = _lora_model(tiny_model_dir, quantize, dtype)
    ref_loss, ref = _loss_and_grads(plain, head, batch)

    tiled, head = _lora_model(tiny_model_dir, quantize, dtype)
    slices = []
    mlp_class = type(tiled.model.layers[0].mlp)
    forward = mlp_class.forward
    monkeypatch.setattr(mlp_class, "forward",
                        lambda self, x: slices.append(x.numel() // x.shape[-1]) or forward(self, x))
    assert mlp_tiles(24, 1, 1, 8) == 3 and use_tiled_mlp(tiled, 3) == 2
    packed = []

    class Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    loss, got = _loss_and_grads(tiled, head, batch, offload=True)
    # every MLP call saw a third of the 3 x 24 tokens, never all: forward, checkpoint recompute, tiled backward
    assert len(slices) >= 2 * 3 * 3 and set(slices) == {24}, slices
    assert (3, 24, 64) in packed  # a decoder layer's input, the checkpoint, went through the offload hooks
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert got.keys() == ref.keys() and len(got) == 2 * 2 * 7
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=rtol * ref[k].abs().max().item())


def _bad(capsys, argv, needle, world=None, monkeypatch=None):
    if world is not None:  # as the launcher sets them; the check runs before any distributed start
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        train_main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "INFO" not in ln and "WARNING" not in ln]
    prefix = "[rank 0] " if world else ""
    assert len(err) == 1 and err[0].startswith(f"{prefix}llama-ft: error: ") and needle in err[0], err


@pytest.mark.parametrize("extra,world,needle", [
    (("--sequence_parallel_size", "0"), None, "--sequence_parallel_size 0: expected an integer >= 1"),
    (("--sequence_parallel_size", "3"), 4, "does not divide the 4 ranks"),
    (("--sequence_parallel_size", "8"), 8, "the model's 4 query heads and 2 KV heads"),
    (("--sequence_parallel_size", "2", "--attn_implementation", "eager"), 2, "--attn_implementation eager"),
    (("--sequence_parallel_size", "2", "--packing", "--max_seq_len", "64"), 2, "needs --attn_implementation flash"),
    (("--tiled_mlp",), None, "--tiled_mlp with --lora_dropout 0.05"),
    (("--activation_offload",), None, "--activation_offload needs --gradient_checkpointing"),
])
def test_bad_long_context_flags_are_one_line(capsys, monkeypatch, tiny_model_dir, tmp_path, extra, world, needle):
    _bad(capsys, ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                  "--max_steps", "2", *extra], needle, world, monkeypatch)
    assert not (tmp_path / "out").exists()


def test_working_sizes_are_the_ones_the_check_accepts():
    """Every size listed as working passes the check, and every other size up to the heads is refused."""
    for heads, kv in ((9, 3), (32, 8), (12, 4), (128, 8), (7, 7), (32, 6)):
        for world in (1, 2, 4, 8, 9, 12, 16, 64):
            ok = working_sizes(heads, kv, world)
            for size in range(2, world + 1):
                accepted = True
                try:
                    check_sequence_parallel(size, world, heads, kv, "sdpa", False, "M")
                except LayoutError:
                    accepted = False
                assert accepted == (size in ok), (heads, kv, world, size)


def test_run_llama_stops_before_launching_on_heads_it_cannot_split(tmp_path):
    """9 query heads and 3 KV heads (SmolLM2-135M's) with --sequence_parallel_size 2 on 2 CPU ranks: the plan
    run-llama.sh runs first refuses it as training would, so run-llama.sh stops there in one line, exit 2, and no
    rank starts (before, the plan's error was only a note and every rank stopped on it after start-up)."""
    model = tmp_path / "heads-9-3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({  # what the plan reads; the launch that would read more never comes
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 72, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 384,
        "max_position_embeddings": 1024}))
    for extra in ((), ("--force",)):  # --force overrides the memory verdict, not flags training refuses
        proc, launched = _fake_launch(tmp_path, model, "--sequence_parallel_size", "2", *extra, NPROC="2")
        assert proc.returncode == 2 and launched is None, proc.stderr
        assert proc.stderr.splitlines() == ["run-llama.sh: error: " + HEADS_9_3.replace("M/", "heads-9-3/")], \
            proc.stderr
    # the sizes it names do work: SP 3 on 3 ranks gets past the plan to the launcher
    proc, launched = _fake_launch(tmp_path, model, "--sequence_parallel_size", "3", NPROC="3")
    assert proc.returncode == 0 and launched is not None, proc.stderr
    # other plan errors stay a note: training may read what the plan cannot
    proc, launched = _fake_launch(tmp_path, model, "--lora_r", "0", NPROC="2")
    assert proc.returncode == 0 and launched is not None and "note: no memory plan before launching" in proc.stderr


FLAGS = ("--max_steps", "5", "--save_steps", "5", "--eval_steps", "5", "--eval_dataset_size", "8", "--lora_r", "8",
         "--lora_alpha", "16", "--lora_dropout", "0", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "2", "--source_max_len", "128", "--target_max_len", "32", "--bf16", "false",
         "--learning_rate", "5e-3", "--warmup_ratio", "0")


def _compare(ref: Path, got: Path) -> None:
    r, g = _metrics(ref), _metrics(got)
    steps = [m for m in r if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    for a, b in zip(steps, [m for m in g if "loss" in m], strict=True):
        assert a["step"] == b["step"] and a["trained_tokens"] == b["trained_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)  # the gradient's scale too
    evals = [[m["eval_loss"] for m in x if "eval_loss" in m] for x in (r, g)]
    assert len(evals[0]) == 1 and evals[1] == pytest.approx(evals[0], rel=1e-5)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ref, got))
    assert a.keys() == b.keys() and a
    moved = 0
    for k in a:
        # five Adam steps amplify fp32 rounding where a gradient is near zero: elementwise loose, whole tight
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
        assert ((b[k] - a[k]).norm() / a[k].norm()).item() < 1e-4, k
        moved += int(not torch.equal(a[k], torch.zeros_like(a[k])))
    assert moved == len(a)  # every adapter trained


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [True])  # bf16 SP=2: tests/test_token_loss.py, against a float64 reference
def test_sequence_parallel_two_ranks_equal_one_rank(tmp_path, quantize):
    """Same global batch: 1 rank x 2 examples x 2 accumulation steps against an SP=2 group on 2 ranks that shares
    them. With a quantized base (the 4-bit one here; FP8 and NF4 share the layer, its autograd and the
    ZeRO-3 handling, llama_ft/quant, and differ in the GEMMs tested in test_fp8.py / test_nf4_*.py) the SP=2 run
    also tiles its MLPs, offloads its checkpoints and keeps half of its base partitions in host memory
    (--offload_ratio 0.5)."""
    extra = ("--bits", "4") if quantize else ()
    run_llama(tmp_path, tmp_path / "sp1", *FLAGS, *extra, "--gradient_checkpointing", "false", nproc=1)
    more = ("--tiled_mlp", "--gradient_checkpointing", "true", "--activation_offload", "--offload", "--offload_ratio",
            "0.5") if quantize else ("--gradient_checkpointing", "false")
    proc = run_llama(tmp_path, tmp_path / "sp2", *FLAGS, *extra, "--sequence_parallel_size", "2", *more)
    if quantize:
        assert "tiled MLP: 2 MLPs in 2 slices" in proc.stderr and "(NF4)" in proc.stderr
        report = json.loads((tmp_path / "sp2" / "load_report_rank0.json").read_text())
        assert report["extra"]["offload"]["ratio"] == 0.5 and report["quantized_layers"] == 14
    _compare(tmp_path / "sp1", tmp_path / "sp2")
    results = json.loads((tmp_path / "sp2" / "train_results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 5


@pytest.mark.gpu
def test_tiled_mlp_and_offload_lower_the_cuda_peak(tiny_model_dir):
    """On a GPU, at 16k tokens: each piece lowers torch.cuda.max_memory_allocated of a forward + backward with
    checkpointing, and the gradients stay the plain ones."""
    batch = {k: v.cuda() for k, v in collate(_examples([16384], seed=2), PAD).items()}

    def peak(tiles: int, offload: bool):
        model, head = _lora_model(tiny_model_dir, False, torch.float32)
        model.cuda()
        if tiles > 1:
            use_tiled_mlp(model, tiles)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        from llama_ft.train.loss import lm_head_nll_sum, loss_targets

        positions, targets = (t.cuda() for t in loss_targets(batch["labels"].cpu()))
        with activation_offload(offload, pin_memory=True):
            hidden = model(input_ids=batch["input_ids"], use_cache=False).logits
            nll = lm_head_nll_sum(hidden, head, positions, targets, 1024)
        nll.backward()
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return torch.cuda.max_memory_allocated() - base, grads

    plain, ref = peak(1, False)
    tiled, g_tiled = peak(8, False)
    offloaded, g_off = peak(1, True)
    assert tiled < plain and offloaded < plain, (plain, tiled, offloaded)
    for g in (g_tiled, g_off):
        assert ((g - ref).norm() / ref.norm()).item() < 1e-4
