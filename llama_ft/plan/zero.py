"""ZeRO-3 arithmetic: partitions, persistence, the gathered working set, optimizer states (DeepSpeed 0.19).

Partition (partition_parameters.py `_aligned_size`/`partition_numel`): a parameter of n elements over W
ranks is padded to a multiple of W, and every rank holds ceil(n / W) elements of it.

Persistence (parameter_offload.py `mark_persistent_parameters`): a parameter with n <=
stage3_param_persistence_threshold stays whole on every rank after its first gather (its partition
stays too), so it costs n + ceil(n / W) elements of device memory.

Gathered working set (partitioned_param_coordinator.py). The first step records the order in which
modules fetch their parameters (the trace: forward, then backward; with gradient checkpointing every
layer's forward runs again just before its backward). At each module the coordinator
  - gathers the module's parameters (whole, in their stored dtype: 1 byte per FP8 weight + its scales);
  - prefetches the next parameters of the trace that are not gathered, in trace order, until
    min(stage3_prefetch_bucket_size, stage3_max_live_parameters - gathered) elements are under way;
  - after the module, releases a parameter unless it is used again before the following modules
    have traversed stage3_max_reuse_distance elements ("kept"): with the default 1e9, the last layers
    of the forward stay gathered through the loss into their backward, and with checkpointing each
    layer's recompute gather serves its backward.
All of these counts are elements, not bytes. `gathered_at` evaluates that rule at one trace position;
it misses what the coordinator's prefetch does on top (every fetch call prefetches, the prefetch runs ahead
to max_live_parameters and keeps what it passed over), which `simulate_gathered` follows call by call and
the planner uses.

Optimizer (stage3.py `_create_fp16_partitions_with_defragmentation`, `_create_fp32_partitions`,
`initialize_optimizer_states`, `_setup_for_real_optimizer`), per rank, with P = sum of the LoRA
partitions (elements) and S = the largest sub-group (`sub_group_size`, default 1e9, split in
parameter order):
    LoRA partitions, one flat buffer          P x training dtype
    fp32 master partition                     4 P   (none in fp32 training without offload: it is the same tensor)
    Adam exp_avg, exp_avg_sq                  8 P
    fp32 gradient of the partition            4 S   (offload_optimizer: 4 P, one buffer per sub-group)
    gradient partitions (grad_accum_dtype)    P x training dtype (or data_types.grad_accum_dtype)
    reduce bucket (contiguous_gradients)      reduce_bucket_size x communication dtype, on the device
Adam's step (torch's foreach AdamW) takes one more fp32 copy of a sub-group (4 S) while it runs;
DeepSpeedCPUAdam (offload_optimizer) updates in place.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from llama_ft.errors import UserError
from llama_ft.plan.shape import Param

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def part(numel: int, world: int) -> int:
    """Elements of a parameter each rank holds: ceil(numel / world) (DeepSpeed pads to a multiple of world)."""
    return math.ceil(numel / world)


def pinned(nbytes: int) -> int:
    """Host bytes a pinned allocation takes: torch's CachingHostAllocator rounds every request up to the
    next power of two (ATen/core/CachingHostAllocator.h `PowerOf2Ceil`)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def zero3_auto_values(hidden_size: int) -> dict[str, int]:
    """The bucket sizes llama_ft/config.py `fill_ds_config` puts in place of "auto" (kept equal by a test)."""
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


@dataclass(frozen=True)
class ZeroSettings:
    """What the memory depends on in a DeepSpeed config (DeepSpeed's defaults where a field is absent)."""

    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    contiguous_gradients: bool = True
    offload_param: str = "none"
    offload_param_pin: bool = True
    nvme_buffer_count: int = 5
    nvme_buffer_size: int = 100_000_000
    offload_optimizer: str = "none"
    offload_optimizer_pin: bool = True
    grad_accum_bytes: int | None = None  # data_types.grad_accum_dtype; None: the training dtype
    comm_bytes: int | None = None  # communication_data_type; None: the training dtype


def _number(section: dict, keys: tuple[str, ...], default: int, source: str, hidden_size: int) -> int:
    """A numeric ZeRO field under any of its names; "auto" gets fill_ds_config's value."""
    for key in keys:
        if key not in section:
            continue
        value = section[key]
        if value == "auto":
            auto = zero3_auto_values(hidden_size)
            if keys[-1] not in auto:
                raise UserError(f"{source}: field 'zero_optimization.{key}' is \"auto\" but llama-ft has no value "
                                "for it")
            return auto[keys[-1]]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"{source}: field 'zero_optimization.{key}' is {value!r}, expected a number >= 0")
        return int(value)
    return default


def _offload(zero: dict, key: str, source: str) -> tuple[str, bool, dict]:
    sec = zero.get(key) or {}
    if not isinstance(sec, dict):
        raise UserError(f"{source}: field 'zero_optimization.{key}' must be an object")
    device = str(sec.get("device", "none") or "none").lower()
    if device not in ("none", "cpu", "nvme"):
        raise UserError(f"{source}: field 'zero_optimization.{key}.device' is {device!r}, expected none, cpu or nvme")
    return device, bool(sec.get("pin_memory", True)), sec


def zero_settings(ds_config: dict, hidden_size: int, source: str = "--deepspeed") -> ZeroSettings:
    """Read a (resolved or raw) DeepSpeed config; "auto" bucket sizes are filled as fill_ds_config does."""
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise UserError(f"{source}: field 'zero_optimization.stage' is {stage!r}, expected 3")

    def num(keys: tuple[str, ...], default: int) -> int:
        return _number(zero, keys, default, source, hidden_size)

    param_dev, param_pin, param_sec = _offload(zero, "offload_param", source)
    opt_dev, opt_pin, _ = _offload(zero, "offload_optimizer", source)
    accum = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    comm = ds_config.get("communication_data_type")
    for field, value in (("data_types.grad_accum_dtype", accum), ("communication_data_type", comm)):
        if value is not None and str(value).lower() not in DTYPE_BYTES:
            raise UserError(f"{source}: field {field!r} is {value!r}, expected one of fp32, bf16, fp16")
    return ZeroSettings(
        reduce_bucket_size=num(("reduce_bucket_size",), 500_000_000),
        prefetch_bucket_size=num(("prefetch_bucket_size", "stage3_prefetch_bucket_size"), 50_000_000),
        param_persistence_threshold=num(("param_persistence_threshold", "stage3_param_persistence_threshold"),
                                        100_000),
        max_live_parameters=num(("max_live_parameters", "stage3_max_live_parameters"), 1_000_000_000),
        max_reuse_distance=num(("max_reuse_distance", "stage3_max_reuse_distance"), 1_000_000_000),
        sub_group_size=num(("sub_group_size",), 1_000_000_000),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        offload_param=param_dev, offload_param_pin=param_pin,
        nvme_buffer_count=int(param_sec.get("buffer_count", 5)),
        nvme_buffer_size=int(param_sec.get("buffer_size", 1e8)),
        offload_optimizer=opt_dev, offload_optimizer_pin=opt_pin,
        grad_accum_bytes=DTYPE_BYTES[str(accum).lower()] if accum is not None else None,
        comm_bytes=DTYPE_BYTES[str(comm).lower()] if comm is not None else None,
    )


def is_persistent(p: Param, z: ZeroSettings) -> bool:
    return p.numel <= z.param_persistence_threshold


def partition_bytes(p: Param, world: int) -> int:
    return part(p.numel, world) * p.itemsize


# ---------------------------------------------------------------------------------------------------------------
# The trace of module fetches and the gathered working set


@dataclass(frozen=True)
class Module:
    """A module that owns parameters: their total elements (persistent ones included: the coordinator
    counts them when it measures reuse distance) and what gathering it costs (non-persistent only)."""

    name: str
    numel: int
    gather_numel: int
    gather_bytes: int
    params: tuple[Param, ...]


def modules_in_order(params: list[Param], z: ZeroSettings) -> list[Module]:
    """Group parameters by module, in first-use order."""
    groups: dict[str, list[Param]] = defaultdict(list)
    for p in params:
        groups[p.module].append(p)
    out = []
    for name, ps in groups.items():
        gathered = [p for p in ps if not is_persistent(p, z)]
        out.append(Module(name, sum(p.numel for p in ps), sum(p.numel for p in gathered),
                          sum(p.nbytes for p in gathered), tuple(ps)))
    return out


@dataclass(frozen=True)
class Trace:
    """Module indices in fetch order for one micro-batch, and where the backward begins.

    forward: embeddings, layers, final norm (lm_head is not in it: the chunked loss gathers the head
    itself, train/loss.py). backward: the final norm, then each layer from the last: without
    checkpointing its modules in reverse; with it, its modules in forward order (the recompute) and
    then in reverse, and at the end the embeddings (their output requires a gradient then; seen in the
    instrumented run's trace). `first_backward` is the position of the last layer's first backward module.
    DPO (`reference_pass`): the reference forward (the same modules; adapters off, no grad) comes first,
    ending at `reference_end`, then the policy's forward and backward, as train/objectives.py runs them."""

    modules: list[Module]
    order: list[int]
    forward_end: int  # position of the final norm (the loss runs right after it)
    first_backward: int
    reference_end: int | None = None  # DPO: position of the reference pass's final norm


def build_trace(modules: list[Module], layers: int, checkpointing: bool, reference_pass: bool = False) -> Trace:
    by_name = {m.name: i for i, m in enumerate(modules)}
    layer_mods = [[by_name[m.name] for m in modules if m.name.startswith(f"model.layers.{n}.")] for n in range(layers)]
    embed, norm = by_name["model.embed_tokens"], by_name["model.norm"]
    forward = [embed] + [i for mods in layer_mods for i in mods] + [norm]
    reference = list(forward) if reference_pass else []
    forward = reference + forward
    backward = [norm]
    first_backward = None
    for mods in reversed(layer_mods):
        if checkpointing:
            backward += mods
        if first_backward is None:
            first_backward = len(forward) + len(backward)
        backward += list(reversed(mods))
    if checkpointing:  # transformers' gradient_checkpointing_enable makes the embedding's output require a
        backward.append(embed)  # gradient (enable_input_require_grads): its backward hook gathers it again
    return Trace(modules, forward + backward, len(forward) - 1, first_backward,
                 len(reference) - 1 if reference_pass else None)


def forward_trace(modules: list[Module], layers: int) -> Trace:
    """A forward alone, no backward: the pass before training that computes DPO's reference log-probs
    (--precompute_ref_logprobs); `reference_end` (= forward_end) is its final norm."""
    t = build_trace(modules, layers, False)
    return Trace(modules, t.order[:t.forward_end + 1], t.forward_end, t.forward_end + 1, t.forward_end)


def next_uses(trace: Trace) -> tuple[list[int | None], list[int | None]]:
    """For each trace position u: the position of the next use of the same module (None: not used again
    in the micro-batch), and the elements the coordinator traverses until then (the modules strictly between)."""
    order, mods = trace.order, trace.modules
    cum = [0]
    for i in order:
        cum.append(cum[-1] + mods[i].numel)
    nxt: list[int | None] = [None] * len(order)
    gaps: list[int | None] = [None] * len(order)
    last_seen: dict[int, int] = {}
    for pos in range(len(order) - 1, -1, -1):
        v = last_seen.get(order[pos])
        if v is not None:
            nxt[pos], gaps[pos] = v, cum[v] - cum[pos + 1]
        last_seen[order[pos]] = pos
    return nxt, gaps


def kept(gap: int | None, z: ZeroSettings) -> bool:
    """Kept gathered after a use for the next one, or released (`__params_to_release`)."""
    return gap is not None and gap < z.max_reuse_distance


def gathered_at(trace: Trace, pos: int, z: ZeroSettings) -> tuple[int, int]:
    """(bytes, elements) of gathered, non-persistent parameters while the module at `pos` runs: itself,
    those kept from an earlier use for a later one, and the prefetch issued at `pos` (whole parameters
    in trace order until the prefetch limit is reached, as the coordinator's loop does)."""
    order, mods = trace.order, trace.modules
    nxt, gaps = next_uses(trace)
    live = {order[pos]} | {order[u] for u in range(pos) if kept(gaps[u], z) and nxt[u] >= pos}
    numel = sum(mods[i].gather_numel for i in live)
    nbytes = sum(mods[i].gather_bytes for i in live)
    limit = min(z.prefetch_bucket_size, max(0, z.max_live_parameters - numel))
    fetched = 0
    for i in order[pos + 1:]:
        if fetched >= limit:
            break
        if i in live:
            continue
        live.add(i)
        for p in mods[i].params:
            if fetched < limit and not is_persistent(p, z):
                fetched += p.numel
                nbytes += p.nbytes
    return nbytes, numel + fetched


def gathers_per_micro_batch(trace: Trace, z: ZeroSettings) -> dict[int, int]:
    """How many times each module's partitions are gathered in one micro-batch: at its first use and at
    every later use that follows a release. Each gather copies a host-resident partition to the device.
    The static rule without the prefetch (exact when stage3_prefetch_bucket_size is 0); the planner counts
    with `simulate_gathered`."""
    nxt, gaps = next_uses(trace)
    count: dict[int, int] = defaultdict(int)
    served = set()  # positions whose module was kept gathered by the previous use
    for pos, i in enumerate(trace.order):
        if pos not in served:
            count[i] += 1
        if kept(gaps[pos], z):
            served.add(nxt[pos])
    return dict(count)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer states


def sub_groups(lora_parts: list[int], sub_group_size: int) -> list[int]:
    """Elements per optimizer sub-group: parameters in order, a group closes once it reaches sub_group_size
    (stage3.py `_create_fp16_sub_groups`)."""
    if sum(lora_parts) <= sub_group_size:
        return [sum(lora_parts)]
    groups, cur = [], 0
    for n in lora_parts:
        cur += n
        if cur >= sub_group_size:
            groups.append(cur)
            cur = 0
    if cur:
        groups.append(cur)
    return groups


@dataclass(frozen=True)
class OptimizerBytes:
    """Per-rank optimizer memory: where each piece lives, and the step's transient."""

    device: dict[str, int]
    host: dict[str, int]
    step_transient_device: int


def optimizer_bytes(lora: list[Param], world: int, dtype_bytes: int, z: ZeroSettings, pin: bool) -> OptimizerBytes:
    """The optimizer's buffers for the LoRA partitions (see the module docstring); `pin`: host buffers
    DeepSpeed pins (GPU runs with pin_memory) take whole powers of two."""
    parts = [part(p.numel, world) for p in lora]
    total = sum(parts)
    groups = sub_groups(parts, z.sub_group_size)
    accum = z.grad_accum_bytes or dtype_bytes
    if z.offload_optimizer == "none":
        dev = {"fp32 master": 0 if dtype_bytes == 4 else 4 * total, "Adam moments": 8 * total,
               "fp32 gradient": 4 * max(groups), "gradient partitions": accum * total}
        return OptimizerBytes(dev, {}, 4 * max(groups))
    pin_it = pinned if (pin and z.offload_optimizer_pin) else (lambda n: n)
    if z.offload_optimizer == "cpu":
        host = {"fp32 master": 4 * total, "Adam moments": 8 * total,
                "fp32 gradient": sum(pin_it(4 * g) for g in groups), "gradient partitions": pin_it(accum * total)}
    else:  # nvme: states in swap files; pinned swap buffers for the largest sub-group's fp32 tensors
        host = {"NVMe swap buffers": 4 * 4 * max(groups), "gradient partitions": pin_it(accum * total)}
    return OptimizerBytes({}, host, 0)



# ---------------------------------------------------------------------------------------------------------------
# The coordinator, step by step (a trace that is complete: every step after the first)

PARAMLESS_CALLS_PER_USE = 1
"""Fetch calls without parameters that follow each use of a parameter-owning module. The coordinator
runs `fetch_sub_module` (and with it a prefetch) for every module, parameters or not: in the instrumented
Llama-3.2-1B run (BENCHMARKS.md, "The planner against measured CPU runs") a layer's forward made 20 calls for
9 parameter-owning modules (the decoder layer, attention, MLP and activation containers, and a dropout
child under each LoRALinear). One per use is the lower bound; the prefetch runs ahead of use either way."""


def simulate_gathered(trace: Trace, z: ZeroSettings, gathers: dict[str, int] | None = None) -> list[int]:
    """Gathered non-persistent bytes while the module at each trace position runs, following
    partitioned_param_coordinator.py (DeepSpeed 0.19) once the trace is complete:
      fetch: gather the module's parameters; pop the prefetch queue (every use of every parameter, in
        trace order) past the module's own entries, setting each popped parameter's "most recent fetch
        step" to that entry's step; then prefetch: pop entries while fewer than
        min(max_live_parameters - available, prefetch_bucket_size) elements are being gathered;
        an entry whose parameter is already gathered is popped for free and still sets its step;
      release (after the module): its parameters, except those whose most recent fetch step lies
        ahead (`__params_to_release`: the prefetcher went past a later use of theirs while they were
        gathered) and those used again before max_reuse_distance elements of the trace are traversed.
    The first consequence the static rule misses: every call prefetches at least one parameter, there
    are more calls than parameters, so the prefetch runs ahead until max_live_parameters elements are
    gathered; once it has passed the backward uses of what it holds, none of that is released in the
    forward. With the default 1e9 that is the whole of a 1B model by its fifth layer (measured).
    Counts are elements (`ds_numel`), as in DeepSpeed; persistent parameters are never gathered here.
    `gathers`, when given, receives how many times each parameter (by name) is gathered in the micro-batch:
    each gather copies its partition to the device (PCIe, for an offloaded one)."""
    mods, order = trace.modules, trace.order
    calls: list[int | None] = []  # module index per fetch call; None: a call without parameters
    use_call: list[int] = []
    for i in order:
        use_call.append(len(calls))
        calls.append(i)
        calls.extend([None] * PARAMLESS_CALLS_PER_USE)
    gathered = [[p for p in mods[i].params if not is_persistent(p, z)] for i in range(len(mods))]
    queue = [(p, c) for c, i in enumerate(calls) if i is not None for p in gathered[i]]
    head = 0
    recent: dict[str, int] = defaultdict(lambda: -1)
    live: dict[str, Param] = {}
    avail = 0  # __n_available_params
    out: list[int] = []
    nxt_pos = 0
    for c, i in enumerate(calls):
        own = gathered[i] if i is not None else []
        for p in own:
            if p.name not in live:
                live[p.name] = p
                avail += p.numel
                if gathers is not None:
                    gathers[p.name] = gathers.get(p.name, 0) + 1
        wanted = {p.name for p in own if recent[p.name] < c}
        popped: set[str] = set()
        while head < len(queue) and len(popped) < len(wanted):
            p, s = queue[head]
            head += 1
            recent[p.name] = s
            popped.add(p.name)
        if z.prefetch_bucket_size > 0:
            limit = min(z.max_live_parameters - avail, z.prefetch_bucket_size)
            fetching = 0
            while head < len(queue) and fetching < limit:
                p, s = queue[head]
                head += 1
                recent[p.name] = max(recent[p.name], s)
                if p.name not in live:
                    live[p.name] = p
                    avail += p.numel
                    fetching += p.numel
                    if gathers is not None:
                        gathers[p.name] = gathers.get(p.name, 0) + 1
        if i is None:
            continue
        out.append(sum(p.nbytes for p in live.values()))
        nxt_pos += 1
        # release after the module (its child call ran): step_id is then c + 1 + the calls in between
        step = c + 1 + PARAMLESS_CALLS_PER_USE
        release = {p.name for p in own if recent[p.name] <= step}
        traversed = 0
        for j in calls[step:]:
            if traversed >= z.max_reuse_distance or not release:
                break
            if j is None:
                continue
            for p in mods[j].params:
                release.discard(p.name)
                traversed += p.numel
        for name in release:
            avail -= live.pop(name).numel
    return out
