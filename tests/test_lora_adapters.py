"""LoRALinear math vs float64, injection, and PEFT naming/format compatibility (single process)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from llama_ft.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    gather_lora_state,
    load_adapters,
    lora_named_parameters,
    read_adapter_tensors,
    save_adapters,
)
from llama_ft.errors import UserError
from llama_ft.lora import LLAMA_LINEAR_NAMES, LoRALinear, LoraSpec, inject_lora
from llama_ft.model.build import build_lora_model


def test_lora_linear_matches_float64_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 40))
    m = LoRALinear(w, 40, 48, LoraSpec(r=4, alpha=8.0))
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = m(x)
    xd, wd, ad, bd = (t.detach().double() for t in (x, w, m.lora_A, m.lora_B))
    ref = xd @ wd.T + 2.0 * (xd @ ad.T) @ bd.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # gradients: only A, B and the input; the base stays frozen
    dy = torch.randn_like(y)
    y.backward(dy)
    dyd = dy.double()
    torch.testing.assert_close(m.lora_B.grad.double(), 2.0 * (dyd.reshape(-1, 48).T @ (xd.reshape(-1, 40) @ ad.T)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.lora_A.grad.double(), 2.0 * ((dyd.reshape(-1, 48) @ bd).T @ xd.reshape(-1, 40)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), dyd @ wd + 2.0 * (dyd @ bd) @ ad, rtol=1e-4, atol=1e-4)
    assert w.grad is None and not w.requires_grad


def test_inject_lora_targets_only_named_linears(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = inject_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj", "down_proj")))
    assert len(wrapped) == 2 * model.config.num_hidden_layers
    assert all(n.endswith(("q_proj", "down_proj")) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # the base weight keeps its checkpoint name
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_adapter_names_and_shapes_match_peft(tiny_model_dir):
    """Our tensor names/shapes are exactly what peft's own state dict holds for the same LoRA."""
    ours, _ = build_lora_model(tiny_model_dir, LoraSpec(8, 16), ds_config=None, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_LINEAR_NAMES)))
    theirs = get_peft_model_state_dict(peft_model)
    mine = {k: tuple(p.shape) for k, p in lora_named_parameters(ours)}
    assert mine == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.fixture
def trained_like_model(tiny_model_dir):
    """Our LoRA model with random (non-zero) A and B, as after training."""
    torch.manual_seed(1)
    model, _ = build_lora_model(tiny_model_dir, LoraSpec(8, 16, target_modules=("q_proj", "v_proj", "down_proj")),
                                ds_config=None, dtype=torch.float32)
    for _, p in lora_named_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_saved_adapters_load_in_peft_with_same_logits(tiny_model_dir, trained_like_model, tmp_path):
    spec = LoraSpec(8, 16, target_modules=("q_proj", "v_proj", "down_proj"))
    save_adapters(trained_like_model, tmp_path / "ad", spec, str(tiny_model_dir))
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert (tmp_path / "ad" / ADAPTER_WEIGHTS).is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained_like_model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapters matter, so the match above means something


def test_load_adapters_round_trip_and_errors(tiny_model_dir, trained_like_model, tmp_path):
    spec = LoraSpec(8, 16, target_modules=("q_proj", "v_proj", "down_proj"))
    save_adapters(trained_like_model, tmp_path / "ad", spec, str(tiny_model_dir))
    fresh, _ = build_lora_model(tiny_model_dir, spec, ds_config=None, dtype=torch.float32)
    tensors = read_adapter_tensors(tmp_path / "ad")
    load_adapters(fresh, tensors, "ad")
    for k, v in gather_lora_state(fresh).items():
        assert torch.equal(v, tensors[k])
    bad = dict(tensors)
    key = next(iter(bad))
    bad[key] = bad[key][:, :3]
    with pytest.raises(UserError, match="shape"):
        load_adapters(fresh, bad, "ad")
    bad = dict(tensors)
    del bad[key]
    with pytest.raises(UserError, match="missing tensor"):
        load_adapters(fresh, bad, "ad")
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        read_adapter_tensors(tmp_path)


def test_saving_gathers_only_lora_tensors(tiny_model_dir, trained_like_model, tmp_path, monkeypatch):
    """Adapters are gathered from partitions one module at a time, and never the frozen base."""
    import llama_ft.adapters as adapters

    seen: list[list[torch.nn.Parameter]] = []
    real = adapters.gathered

    def recording(params, modifier_rank=None):
        seen.append(list(params))
        return real(params, modifier_rank)

    monkeypatch.setattr(adapters, "gathered", recording)
    spec = LoraSpec(8, 16, target_modules=("q_proj", "v_proj", "down_proj"))
    save_adapters(trained_like_model, tmp_path / "ad", spec, str(tiny_model_dir))
    lora_ids = {id(p) for _, p in lora_named_parameters(trained_like_model)}
    assert len(seen) == 3 * trained_like_model.config.num_hidden_layers  # one gather per LoRA module
    assert all(len(group) == 2 and all(id(p) in lora_ids for p in group) for group in seen)


@pytest.mark.parametrize("given,names", [
    (["attention"], ["q_proj", "k_proj", "v_proj", "o_proj"]), (["mlp"], ["gate_proj", "up_proj", "down_proj"]),
    (["all"], list(LLAMA_LINEAR_NAMES)),
    (["attention,down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    (["mlp", "gate_proj"], ["gate_proj", "up_proj", "down_proj"])])
def test_target_groups_become_explicit_names_in_the_saved_config(tiny_model_dir, tmp_path, given, names):
    """--lora_target_modules all|attention|mlp (Pax's groups), alone or with names: the run and its saved
    adapter_config.json use the explicit linear names, and PEFT loads the adapters onto exactly those layers."""
    from llama_ft.config import parse_train_args

    cfg = parse_train_args(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
                            "--lora_target_modules", *given])
    assert list(cfg.lora_spec.target_modules) == names
    model, _ = build_lora_model(tiny_model_dir, cfg.lora_spec, ds_config=None, dtype=torch.float32)
    save_adapters(model, tmp_path / "ad", cfg.lora_spec, str(tiny_model_dir))
    assert sorted(json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())["target_modules"]) == sorted(names)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in PeftModel.from_pretrained(base, tmp_path / "ad").named_modules()
               if hasattr(m, "lora_A")}
    assert wrapped == set(names)


def test_unknown_target_group_is_one_line(capsys, tiny_model_dir, tmp_path):
    from llama_ft.train.recipe import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
                    "--lora_target_modules", "attn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0] == ("llama-ft: error: --lora_target_modules 'attn': expected a group (all, attention, mlp) or "
                      "Llama linear names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
