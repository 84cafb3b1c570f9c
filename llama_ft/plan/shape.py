"""The model side of the plan: a Llama's shape, and the parameters llama-ft builds from it, in model order.

A shape comes from an alias (`8b`, `70b`, `405b`: Llama 3.1), from a model directory's config.json, or
from a transformers LlamaConfig. config.json is read with the json module and LlamaConfig's defaults for
absent fields (tests/test_plan.py checks the result against `AutoConfig`): importing transformers'
config classes imports torch (2-3.5 s here), and run-llama.sh runs the planner before every launch.

Parameters, as the build makes them (llama_ft/model/build.py, lora.py, fp8/module.py), per decoder layer
in execution order, with d = head_dim, q = heads * d, kv = kv_heads * d, I = intermediate size:

    input_layernorm.weight        (h,)                   frozen, training dtype
    self_attn.{q,k,v,o}_proj      (q, h) (kv, h) (kv, h) (h, q)
    post_attention_layernorm      (h,)
    mlp.{gate,up,down}_proj       (I, h) (I, h) (h, I)

plus embed_tokens (V, h), the final norm (h,) and lm_head (V, h) (absent when tied to the embeddings).
A LoRA target linear (out, in) holds its frozen weight (training dtype; with --quantize: uint8 out*in
plus the fp32 block scales as uint8 ceil(out/128) x ceil(in/128)*4) and lora_A (r, in), lora_B (out, r)
in the training dtype. Everything else is frozen in the training dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.errors import UserError
from llama_ft.flags import LLAMA_LINEAR_NAMES, expand_targets

FP8_BLOCK = 128
"""Side of an FP8 scale block (llama_ft/fp8/format.py BLOCK)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama that decide its memory."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    prequantized: bool = False  # config.json of a `llama-ft quantize` checkpoint: --quantize is implied
    name: str = ""

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each decoder-layer linear."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (self.q_width, h), "k_proj": (self.kv_width, h), "v_proj": (self.kv_width, h),
                "o_proj": (h, self.q_width), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def parameter_count(self) -> int:
        """Parameters of the bf16 model (no LoRA)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden_size
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * per_layer + heads * self.vocab_size * self.hidden_size + self.hidden_size


def _llama31(name: str, hidden: int, inter: int, layers: int, heads: int) -> ModelShape:
    return ModelShape(hidden, inter, layers, heads, 8, hidden // heads, 128256, False, 131072, False, name)


ALIASES = {
    "8b": _llama31("Llama 3.1 8B", 4096, 14336, 32, 32),
    "70b": _llama31("Llama 3.1 70B", 8192, 28672, 80, 64),
    "405b": _llama31("Llama 3.1 405B", 16384, 53248, 126, 128),
}

# LlamaConfig's defaults for the fields a config.json may leave out (transformers 5.x)
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
                   "tie_word_embeddings": False, "max_position_embeddings": 2048, "attention_bias": False,
                   "mlp_bias": False}


def shape_from_fields(get: Any, where: str, name: str) -> ModelShape:
    """ModelShape from a field getter `get(key, default)` (a config.json dict or a LlamaConfig)."""
    model_type = get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{where}: model_type is {model_type!r}, expected 'llama'")
    v = {k: get(k, d) for k, d in _LLAMA_DEFAULTS.items()}
    if v["attention_bias"] or v["mlp_bias"]:
        raise UserError(f"{where}: attention_bias/mlp_bias is set; LoRA on linears with a bias is not supported")
    heads = v["num_attention_heads"]
    try:
        shape = ModelShape(int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_hidden_layers"]),
                           int(heads), int(v["num_key_value_heads"] or heads),
                           int(v["head_dim"] or v["hidden_size"] // heads), int(v["vocab_size"]),
                           bool(v["tie_word_embeddings"]), int(v["max_position_embeddings"]),
                           get("quantization_config", None) is not None, name)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{where}: not a usable Llama config ({e})") from None
    sizes = [shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.num_attention_heads,
             shape.num_key_value_heads, shape.head_dim, shape.vocab_size]
    if min(sizes) <= 0:
        raise UserError(f"{where}: every size must be > 0, got {sizes}")
    return shape


def shape_from_dir(model_dir: str | Path, flag: str = "--model_name_or_path") -> ModelShape:
    """The shape config.json describes (LlamaConfig's defaults for absent fields)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{flag} {model_dir}: no config.json there (expected a Hugging Face model directory, "
                        f"or one of {', '.join(ALIASES)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return shape_from_fields(raw.get, str(path), Path(model_dir).name)


def shape_from_config(config: Any) -> ModelShape:
    """The shape of a transformers LlamaConfig (or a ModelShape, returned as is)."""
    if isinstance(config, ModelShape):
        return config
    return shape_from_fields(lambda k, d: getattr(config, k, d), "llama_config",
                             str(getattr(config, "name_or_path", "") or "llama_config"))


def resolve_model(spec: str, flag: str = "--model_name_or_path") -> ModelShape:
    """An alias (8b, 70b, 405b; case-insensitive) or a model directory."""
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        return alias
    check_not_gguf(spec, flag)
    if not Path(spec).is_dir():
        raise UserError(f"{flag} {spec!r}: not a model alias ({', '.join(ALIASES)}) nor a model directory")
    return shape_from_dir(spec, flag)


@dataclass(frozen=True)
class Param:
    """One parameter as llama-ft builds it: `numel` elements of `itemsize` bytes, in module `module`.

    kind: "target" (the frozen base of a LoRA linear: weight, and with FP8 its scale bytes),
    "frozen" (embeddings, norms, lm_head, non-target linears) or "lora" (A and B, trainable)."""

    name: str
    module: str
    numel: int
    itemsize: int
    kind: str

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def fp8_scale_numel(out_features: int, in_features: int) -> int:
    """uint8 elements of the FP8 block scales: ceil(out/128) x ceil(in/128) fp32 values, 4 bytes each."""
    return math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK) * 4


def check_targets(targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The explicit Llama linears of `--lora_target_modules` (groups expanded), in module order."""
    return tuple(expand_targets(targets))


def _linear(prefix: str, out_f: int, in_f: int, target: bool, r: int, quantize: bool, dtype_bytes: int) -> list[Param]:
    if not target:
        return [Param(f"{prefix}.weight", prefix, out_f * in_f, dtype_bytes, "frozen")]
    base = [Param(f"{prefix}.weight", prefix, out_f * in_f, 1 if quantize else dtype_bytes, "target")]
    if quantize:
        base.append(Param(f"{prefix}.weight_scale", prefix, fp8_scale_numel(out_f, in_f), 1, "target"))
    return base + [Param(f"{prefix}.lora_A.weight", prefix, r * in_f, dtype_bytes, "lora"),
                   Param(f"{prefix}.lora_B.weight", prefix, out_f * r, dtype_bytes, "lora")]


def layer_params(shape: ModelShape, layer: int, targets: tuple[str, ...], r: int, quantize: bool,
                 dtype_bytes: int) -> list[Param]:
    """One decoder layer's parameters in execution order (norm, q, k, v, o, norm, gate, up, down)."""
    h, pre = shape.hidden_size, f"model.layers.{layer}"
    out: list[Param] = []
    lin = shape.linear_shapes()
    for block, names in (("self_attn", LLAMA_LINEAR_NAMES[:4]), ("mlp", LLAMA_LINEAR_NAMES[4:])):
        norm = "input_layernorm" if block == "self_attn" else "post_attention_layernorm"
        out.append(Param(f"{pre}.{norm}.weight", f"{pre}.{norm}", h, dtype_bytes, "frozen"))
        for n in names:
            out += _linear(f"{pre}.{block}.{n}", *lin[n], n in targets, r, quantize, dtype_bytes)
    return out


def model_params(shape: ModelShape, targets: tuple[str, ...], r: int, quantize: bool, dtype_bytes: int) -> list[Param]:
    """Every parameter of the LoRA model, in execution order (embeddings, layers, final norm, head)."""
    v, h = shape.vocab_size, shape.hidden_size
    params = [Param("model.embed_tokens.weight", "model.embed_tokens", v * h, dtype_bytes, "frozen")]
    for layer in range(shape.num_hidden_layers):
        params += layer_params(shape, layer, targets, r, quantize, dtype_bytes)
    params.append(Param("model.norm.weight", "model.norm", h, dtype_bytes, "frozen"))
    if not shape.tie_word_embeddings:
        params.append(Param("lm_head.weight", "lm_head", v * h, dtype_bytes, "frozen"))
    return params
