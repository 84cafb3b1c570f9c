"""The 4-bit (NF4) LoRA layer and model, against independent references.

References: float64 autograd over W as bitsandbytes dequantizes it (bitsandbytes' own quantize_4bit /
dequantize_4bit of the same weight), transformers with every adapted weight replaced by that dequantized value,
and PEFT's LoRA on top. Shapes with K a multiple of 64 (the kernels' layout) and not (blocks span rows).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llama_ft.adapters import lora_named_parameters, save_adapters
from llama_ft.lora import LoraSpec, lora_disabled, lora_modules
from llama_ft.model.build import build_lora_model
from llama_ft.nf4.module import NF4LoRALinear


def _bnb_weight(w: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W as bitsandbytes quantizes and dequantizes it (NF4, blocks of 64, fp32 absmax)."""
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False,
                                  quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(q, state).to(dtype)


@pytest.mark.parametrize("n,k", [(96, 128), (40, 72), (33, 200)])  # K % 64 == 0, and blocks across rows
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layer_forward_and_gradients_match_float64_over_bitsandbytes_weights(n, k, dropout):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    spec = LoraSpec(r=8, alpha=16, dropout=dropout)
    m = NF4LoRALinear.from_linear(lin, spec)
    with torch.no_grad():
        m.lora_B.normal_(std=0.1)
    assert m.weight.numel() == -(-n * k // 2) and m.weight_absmax.numel() == 4 * -(-n * k // 64)
    x = torch.randn(2, 5, k, requires_grad=True)

    torch.manual_seed(7)  # the same dropout mask in both passes
    m.train()
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    w64 = _bnb_weight(lin.weight.detach())
    a64 = m.lora_A.detach().double().requires_grad_()
    b64 = m.lora_B.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    torch.manual_seed(7)
    xl = torch.nn.functional.dropout(x64, dropout, training=True) if dropout else x64
    y64 = x64 @ w64.T + spec.scaling * (xl @ a64.T) @ b64.T
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lora_A.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lora_B.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)

    m.eval()  # the adapters off: the base alone, W as bitsandbytes decodes it
    with lora_disabled(m), torch.no_grad():
        torch.testing.assert_close(m(x).double(), x.detach().double() @ w64.T, rtol=1e-5, atol=1e-5)


def test_bf16_layer_rounds_w_as_bitsandbytes_bf16_dequantization():
    """In bf16 the decoded W is bitsandbytes' bf16 dequantization, the product accumulated in fp32 and rounded
    once (the kernel's accumulation order differs from a matmul's: one bf16 rounding step apart at most)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    m = NF4LoRALinear.from_linear(lin, LoraSpec(r=4, alpha=8))
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    w = _bnb_weight(lin.weight.detach(), torch.bfloat16)
    with torch.no_grad():
        want = x.double() @ w.double().T
        torch.testing.assert_close(m(x).double(), want, rtol=2**-8, atol=2**-8 * want.abs().max().item())


def test_nf4_model_with_adapters_equals_transformers_on_bitsandbytes_weights_plus_peft(tiny_model_dir, tmp_path):
    """Our 4-bit model (built unpartitioned, quantized on load) with random adapters gives the logits of
    transformers whose adapted weights are bitsandbytes' NF4 round trip of the checkpoint, plus PEFT's LoRA."""
    spec = LoraSpec(8, 16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"))
    torch.manual_seed(2)
    ours, report = build_lora_model(tiny_model_dir, spec, ds_config=None, dtype=torch.float32, quantize=True, bits=4)
    assert report.quantized_layers == len(lora_modules(ours)) and all(
        isinstance(m, NF4LoRALinear) for m in lora_modules(ours).values())
    for _, p in lora_named_parameters(ours):
        torch.nn.init.normal_(p, std=0.05)
    ours.eval()
    save_adapters(ours, tmp_path / "ad", spec, str(tiny_model_dir))

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name.rsplit(".", 1)[-1] in spec.target_modules:
                # the checkpoint's bf16 values, held in fp32: the same codes and absmax, decoded in fp32 as our
                # fp32 run decodes them (bitsandbytes decodes to the dtype it quantized from)
                mod.weight.copy_(_bnb_weight(mod.weight.detach(), torch.float32))
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "ad").eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs = ours(input_ids=ids).logits, peft_model(input_ids=ids).logits
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        with lora_disabled(ours), peft_model.disable_adapter():
            off = ours(input_ids=ids).logits
            torch.testing.assert_close(off, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert (mine - off).abs().max() > 1e-3  # the adapters matter: the check can fail
