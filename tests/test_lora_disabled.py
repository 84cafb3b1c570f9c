"""lora_disabled: the adapters switched off give the base model's outputs exactly, FP8 base included.

References: the plain transformers model on the same checkpoint, PEFT's `disable_adapter()` with the same
adapters, and (FP8) transformers with every adapted weight replaced by its dequantized FP8 value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llama_ft.adapters import lora_named_parameters, save_adapters
from llama_ft.fp8 import FP8LoRALinear, dequantize_fp8, fp8_linear, quantize_fp8_reference, scales_from_bytes
from llama_ft.fp8.format import scales_to_bytes
from llama_ft.lora import LoraSpec, lora_disabled, lora_modules
from llama_ft.model.build import build_lora_model

SPEC = LoraSpec(8, 16, target_modules=("q_proj", "v_proj", "down_proj"))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))


def _trained_like(tiny_model_dir, quantize: bool):
    """Our model with random non-zero A and B (as after training), single process, fp32."""
    torch.manual_seed(1)
    model, _ = build_lora_model(tiny_model_dir, SPEC, ds_config=None, dtype=torch.float32, quantize=quantize)
    for _, p in lora_named_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_disabled_logits_are_the_base_and_peft_disable_adapter(tiny_model_dir, tmp_path):
    ours = _trained_like(tiny_model_dir, quantize=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = _ids(base.config.vocab_size)
    plain = _logits(base, ids)
    save_adapters(ours, tmp_path / "ad", SPEC, str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").eval()

    with lora_disabled(ours):
        off = _logits(ours, ids)
    with peft_model.disable_adapter():
        peft_off = _logits(peft_model, ids)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(off, peft_off, rtol=0, atol=1e-5)
    # restored on exit: the adapters are back, and they matter (so the equalities above can fail)
    on = _logits(ours, ids)
    torch.testing.assert_close(on, _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert (on - plain).abs().max() > 1e-2


def test_disabled_branch_is_skipped_not_zeroed(tiny_model_dir):
    """inf/NaN in A and B cannot reach the output: the LoRA GEMMs are not run (0 * inf would be NaN)."""
    ours = _trained_like(tiny_model_dir, quantize=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = _ids(base.config.vocab_size)
    for m in lora_modules(ours).values():
        m.lora_A.data.fill_(float("nan"))
        m.lora_B.data.fill_(float("inf"))
    with lora_disabled(ours):
        off = _logits(ours, ids)
    torch.testing.assert_close(off, _logits(base, ids), rtol=0, atol=1e-5)
    assert not torch.isfinite(_logits(ours, ids)).all()


def test_state_is_restored_on_exception_and_when_nested(tiny_model_dir):
    ours = _trained_like(tiny_model_dir, quantize=False)
    layers = list(lora_modules(ours).values())
    assert len(layers) == 2 * 3 and all(m.lora_enabled for m in layers)
    with pytest.raises(RuntimeError, match="boom"), lora_disabled(ours):
        assert not any(m.lora_enabled for m in layers)
        raise RuntimeError("boom")
    assert all(m.lora_enabled for m in layers)
    layers[0].lora_enabled = False  # a layer already off stays off after an inner block
    with lora_disabled(ours):
        with lora_disabled(ours):
            pass
        assert not any(m.lora_enabled for m in layers)
    assert [m.lora_enabled for m in layers] == [False] + [True] * 5


def test_fp8_disabled_logits_are_the_dequantized_base(tiny_model_dir):
    """FP8 base: under lora_disabled, transformers with each adapted weight = dequantize(q, s); the
    same FP8 model with B = 0 agrees; NaN adapters do not leak."""
    ours = _trained_like(tiny_model_dir, quantize=True)
    fp8 = {name: m for name, m in lora_modules(ours).items() if isinstance(m, FP8LoRALinear)}
    assert len(fp8) == 6
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in fp8.items():
            w = dequantize_fp8(m.weight, scales_from_bytes(m.weight_scale), torch.float32)
            base.get_submodule(name).weight.copy_(w)
    ids = _ids(base.config.vocab_size)
    ref = _logits(base, ids)
    with lora_disabled(ours):
        off = _logits(ours, ids)
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-4)
    on = _logits(ours, ids)
    assert (on - ref).abs().max() > 1e-2
    for m in fp8.values():
        m.lora_B.data.zero_()
    torch.testing.assert_close(off, _logits(ours, ids), rtol=0, atol=1e-5)
    for m in fp8.values():
        m.lora_A.data.fill_(float("nan"))
    with lora_disabled(ours):
        torch.testing.assert_close(_logits(ours, ids), off, rtol=0, atol=0)


@pytest.mark.parametrize("fp8_compute", [False, True])
def test_fp8_linear_forward_and_input_gradient(fp8_compute):
    """fp8_linear = F.linear with the dequantized weight (weight-only mode), forward and dx; fp8-compute
    mode within e4m3 rounding of it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(160, 256, generator=g)
    q, scales = quantize_fp8_reference(w)
    wd = dequantize_fp8(q, scales, torch.float32)
    x = torch.randn(3, 5, 256, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 160, generator=g)
    y = fp8_linear(x, q, scales_to_bytes(scales), fp8_compute)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, wd.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    tol = 0.07 if fp8_compute else 1e-4  # e4m3 keeps 3 mantissa bits: relative error up to 1/16 per operand
    assert ((y.double() - y64).norm() / y64.norm()) < tol
    assert ((dx.double() - dx64).norm() / dx64.norm()) < tol
    assert y.shape == (3, 5, 160) and dx.shape == x.shape
