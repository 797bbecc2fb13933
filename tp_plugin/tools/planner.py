"""`tp-plugin plan`: which layout (TP degree, data parallelism, ZeRO stage, checkpointing) fits a model on N GPUs.

Nothing is loaded and nothing is allocated: the model is built on the meta device from its config, and

* parameters per rank are exact: the plan that `parallelize` would apply, resolved for every TP degree the heads,
  KV heads and vocabulary allow (uneven splits, replicated KV heads and the padded vocabulary included);
* activations are measured, not modelled: the bytes autograd saves for backward in one training forward of a
  1- and a 2-layer copy of the model on the meta device, split at the same degree over a fake process group,
  extrapolated to all layers (per layer = 2 layers - 1 layer); attention runs the flash kernel's saving pattern.
  Gradient checkpointing keeps each layer's input plus one layer recomputed at a time. Sequence parallelism is
  measured the same way on the model split with `sequence_parallel=True`, plus one region's gathered input;
* model states: weights and gradients in the training dtype, the optimizer's fp32 master copy (when the training
  dtype is lower) and states (AdamW 2, SGD none), divided over the data-parallel ranks by the ZeRO stage
  (1: optimizer, 2: + gradients, 3 / FSDP: + weights), e.g. 16 bytes per parameter for bf16 AdamW;
* the step's peak (`step_peak`): activations and gradients never coexist in full, so on top of the resident
  weights and optimizer state a step needs the larger of (activations + the logits' gradient + the largest weight
  gradient) and (gradients + the optimizer step's temporaries), plus ZeRO-3 / FSDP's gathered layers; the loss is
  taken vocab-parallel (`loss_parallel=True`), so the full logits are never gathered;
* a fixed margin for the CUDA context, NCCL buffers and allocator fragmentation (`MARGIN_GIB`).

Pipeline stages (`tp_plugin.pipeline`, pp > 1; data parallelism by DDP, ZeRO-1, or FSDP2 counted as ZeRO-2: its
parameters stay gathered during a step) hold 1/pp of the layers'
weights, gradients and optimizer state (the first and last stage also the embedding or head); under 1F1B the
first stage keeps pp micro-batches of its layers' activations in flight, as many as all layers of one.
The recommendation: no pipeline if anything fits, then the smallest TP degree that fits inside one node (at most
8), then no gradient checkpointing, then no sequence parallelism, then the lowest ZeRO stage.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..plan import resolve_plan
from ..sharding import TPSplitError
from ..split import policy_for, split_model
from ..styles import ColumnStyle, RowStyle, VocabEmbedding, VocabLMHead

GiB = 2 ** 30
MARGIN_GIB = 2.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # fp32 states per trainable parameter


@dataclass
class Workload:
    gpus: int
    gpu_memory_gib: float
    nodes: int = 1
    seq: int = 4096
    micro_batch: int = 1
    dtype: str = "bf16"
    optimizer: str = "adamw"
    lora: bool = False
    lora_rank: int = 16
    gradient_checkpointing: bool | None = None  # None: try both
    sequence_parallel: bool = False  # also plan sequence-parallel layouts (measured like the others)
    device: str = "cuda"  # "cpu": torch's per-parameter optimizer step instead of the multi-tensor one

    @property
    def gpus_per_node(self) -> int:
        return max(1, self.gpus // self.nodes)


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    sequence_parallel: bool
    gradient_checkpointing: bool
    fits: bool
    memory_gib: dict[str, float]
    comm_gib_per_step: dict[str, float]
    notes: list[str] = field(default_factory=list)


# ---- the model on the meta device -------------------------------------------------------------------------------

def load_config(target: str):
    """A local model directory (or one holding only config.json), else a model_type (a tiny default config)."""
    from transformers import AutoConfig

    if Path(target).is_dir():
        return AutoConfig.from_pretrained(target)
    from .tiny_models import tiny_config

    return tiny_config(target)


def meta_model(config, dtype: torch.dtype, layers: int | None = None) -> nn.Module:
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def split_degrees(model: nn.Module, limit: int) -> dict[int, object]:
    """{tp: plan} for every degree up to `limit` the model can be split into (pure: no process group)."""
    plans = {}
    for tp in range(1, limit + 1):
        try:
            plans[tp] = resolve_plan(model, policy_for(model, tp), tp)
        except TPSplitError:
            continue
    return plans


def lora_parameters(plan, rank: int, r: int) -> int:
    """Trainable LoRA parameters on TP rank `rank` with `target_modules="all-linear"` at rank `r`."""

    total = 0
    for entry in plan.entries:
        if not isinstance(entry.style, (ColumnStyle, RowStyle)):
            continue
        out_f, in_f = entry.full_shapes["weight"][::-1] if entry.transposed else entry.full_shapes["weight"]
        local = entry.specs[rank]["weight"].local_size
        total += r * in_f + local * r if isinstance(entry.style, ColumnStyle) else r * local + out_f * r
    return total


@contextlib.contextmanager
def flash_attention():
    """Route SDPA to the CPU flash kernel, whose backward saves q, k, v, the output and the log-sum-exp like the
    flash kernels used on GPUs (on the meta device SDPA would pick its math kernel, which saves [s, s] scores)."""
    original = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise RuntimeError("memory model: expected a causal SDPA call without an explicit mask")
        if enable_gqa:  # the CPU flash kernel wants as many KV heads as query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                          scale=scale)[0]
    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(model: nn.Module, batch: int, seq: int) -> int:
    """Bytes autograd saves for backward in one training forward (each storage once, parameters left out)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def activation_bytes(config, tp: int, batch: int, seq: int, dtype: torch.dtype, *,
                     sequence_parallel: bool = False) -> dict[str, int]:
    """Saved activations on TP rank 0 at degree `tp`: the part outside the layers and per layer (fake process
    group of `tp` ranks, meta device, 1- and 2-layer copies)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    measured = []
    for layers in (1, 2):
        model = meta_model(config, dtype, layers)
        model.train()
        if tp > 1:
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
        try:
            if tp > 1:
                split_model(model, tp, loss_parallel=True, sequence_parallel=sequence_parallel)
            measured.append(saved_bytes(model, batch, seq))
        finally:
            if tp > 1:
                dist.destroy_process_group()
    one, two = measured
    return {"outside": 2 * one - two, "per_layer": two - one}


# ---- candidates ---------------------------------------------------------------------------------------------------

def _ring(size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `size_bytes` over `ranks` ranks."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * size_bytes


def candidates(config, work: Workload) -> list[Candidate]:
    dtype = DTYPES[work.dtype]
    width = dtype.itemsize
    text = config.get_text_config()
    layers = text.num_hidden_layers
    model = meta_model(config, dtype)
    limit = min(work.gpus, 8 * max(1, work.nodes))
    plans = split_degrees(model, limit)
    out = []
    for (tp, plan), pp in ((tp_plan, pp) for tp_plan in plans.items() for pp in (1, 2, 4, 8)):
        if work.gpus % (tp * pp) or pp > layers:
            continue
        dp = work.gpus // (tp * pp)
        acts = activation_bytes(config, tp, work.micro_batch, work.seq, dtype)
        sp_acts = _sp_activation_bytes(config, tp, work, dtype) if work.sequence_parallel and tp > 1 else None
        params = max(plan.rank_parameters)
        if pp > 1:  # a stage's share of the layers, plus the larger of the embedding and head shards
            ends = sum(math.prod(e.local_shape(0, "weight")) for e in plan.entries
                       if isinstance(e.style, (VocabEmbedding, VocabLMHead)))
            params = int((params - ends) / pp + ends)
        trainable = max(lora_parameters(plan, r, work.lora_rank) for r in range(tp)) if work.lora else params
        largest = max((math.prod(e.local_shape(0, n)) for e in plan.entries for n in e.full_shapes), default=0)
        vocab_shard = max((math.prod(e.local_shape(0, "weight")[:1]) for e in plan.entries
                           if isinstance(e.style, VocabLMHead)), default=0)
        master = 4 if width < 4 else 0
        states = OPTIMIZER_STATES[work.optimizer] * 4
        for zero in ((0, 1, 2, 3) if pp == 1 else (0, 1, 2)) if dp > 1 else (0,):
            for ckpt in ([False, True] if work.gradient_checkpointing is None else [work.gradient_checkpointing]):
                for sp in ([False, True] if sp_acts is not None else [False]):
                    out.append(_candidate(work, tp, pp, dp, zero, ckpt, sp, params, trainable, width, master,
                                          states, sp_acts if sp else acts, layers, text.hidden_size, largest,
                                          vocab_shard))
    return out


def _sp_activation_bytes(config, tp: int, work: Workload, dtype) -> dict[str, int] | None:
    """Saved activations with sequence parallelism, measured like the plain ones; None for a model that
    sequence parallelism cannot split (`parallelize` refuses it)."""
    try:
        return activation_bytes(config, tp, work.micro_batch, work.seq, dtype, sequence_parallel=True)
    except TPSplitError:
        return None


def step_peak(work: Workload, memory: dict[str, float], trainable: int, largest: int, vocab_shard: int,
              params: int, layers: int, width: int, zero: int, dp: int) -> tuple[float, float]:
    """The most a training step holds on top of the resident weights and optimizer state, and the temporaries in it.

    Activations and gradients never coexist in full: backward frees a layer's activations as it makes its
    gradients. The peak is at the start of backward (all activations, the fp32 gradient of the vocab-parallel
    logits, the first and largest weight gradient) or in the optimizer step (all gradients plus the step's
    temporaries: torch's multi-tensor AdamW on GPUs makes one fp32 list the size of the trainable parameters, its
    per-parameter loop, the CPU default, two copies of the largest tensor). Under ZeRO-3 / FSDP two layers' weights
    are gathered at any time. Checked against a CPU run's resident memory in tests/test_planner.py."""
    logits_grad = work.micro_batch * work.seq * vocab_shard * 4
    largest_grad = 0 if work.lora else largest * width
    if work.optimizer != "adamw":
        step = 0.0
    elif work.device == "cuda":
        step = trainable * 4 / (dp if zero >= 1 else 1)  # ZeRO steps only this rank's partition
    else:
        step = 2 * largest_grad * 4 / width
    gathered = 2 * params / layers * width if zero >= 3 and dp > 1 else 0.0
    peak = max(memory["activations"] + logits_grad + largest_grad, memory["grads"] + step) + gathered
    return peak, logits_grad + step + gathered


def _candidate(work, tp, pp, dp, zero, ckpt, sp, params, trainable, width, master, states, acts, layers, hidden,
               largest, vocab_shard) -> Candidate:
    notes = []
    per_layer = acts["per_layer"]  # measured with sequence parallelism on for an `sp` candidate
    if ckpt:  # each layer keeps its input; one layer's activations are rebuilt at a time in backward
        layer_input = work.micro_batch * work.seq * hidden * width / (tp if sp else 1)
        activations = acts["outside"] + layers * layer_input + per_layer
    else:
        activations = acts["outside"] + layers * per_layer
    if sp:  # one region's gathered input at a time (and its copy gathered again in backward)
        activations += work.micro_batch * work.seq * hidden * width
    memory = {"params": params * width / (dp if zero >= 3 else 1),
              "grads": trainable * width / (dp if zero >= 2 else 1),
              "optimizer": trainable * (master + states) / (dp if zero >= 1 else 1),
              "activations": activations}
    memory["step_peak"], memory["buffers"] = step_peak(work, memory, trainable, largest, vocab_shard, params,
                                                       layers, width, zero, dp)
    memory = {k: v / GiB for k, v in memory.items()}
    memory["margin"] = MARGIN_GIB
    # resident: weights and optimizer state; on top, the step's peak (activations, gradients and temporaries
    # never all at once), and the margin
    memory["total"] = memory["params"] + memory["optimizer"] + memory["step_peak"] + memory["margin"]
    fits = memory["total"] <= work.gpu_memory_gib
    tokens = work.micro_batch * work.seq * hidden * width
    # per block: 2 all-reduces each way (+ 2 in the recompute); with SP the same bytes as all-gathers and
    # reduce-scatters, plus the backward's re-gather of the 2 regions' inputs (half an all-reduce each)
    tp_bytes = layers * ((6 if ckpt else 4) + (1 if sp else 0)) * _ring(tokens, tp)
    dp_bytes = _ring(trainable * width, dp) + (2 * (dp - 1) / dp * params * width if zero >= 3 else 0)
    if tp > work.gpus_per_node:
        notes.append(f"the TP group of {tp} spans nodes of {work.gpus_per_node} GPUs: TP traffic would cross the "
                     f"network; keep TP inside a node")
    if tp > 8:
        notes.append("TP beyond 8 ranks: prefer data parallelism or pipeline stages")
    if pp > 1:
        notes.append(f"{pp} pipeline stages (tp_plugin.pipeline; across replicas DDP, ZeRO-1, or FSDP2 as ZeRO-2): "
                     f"{_ring(tokens, 2) / 2 / GiB:.3f} GiB per micro-batch between stages each way")
    if not fits:
        biggest = max(("params", "grads", "optimizer", "activations"), key=lambda k: memory[k])
        notes.append(f"needs {memory['total']:.1f} GiB of {work.gpu_memory_gib:g} (largest part: {biggest} "
                     f"{memory[biggest]:.1f} GiB)")
    if work.lora:
        notes.append(f"LoRA r={work.lora_rank} on all linear layers: {trainable:,} trainable parameters per rank")
    return Candidate(tp, pp, dp, zero, sp, ckpt, fits, {k: round(v, 3) for k, v in memory.items()},
                     {"tp": round(tp_bytes / GiB, 3), "dp": round(dp_bytes / GiB, 3)}, notes)


def recommend(cands: list[Candidate], work: Workload) -> Candidate | None:
    """No pipeline if possible, the smallest TP degree that fits inside a node (<= 8), then no checkpointing, then
    the lowest ZeRO stage."""
    usable = [c for c in cands if c.fits and c.tp <= min(8, work.gpus_per_node)]
    return min(usable, key=lambda c: (c.pp, c.tp, c.gradient_checkpointing, c.sequence_parallel, c.zero_stage),
               default=None)


def reason(best: Candidate | None, cands: list[Candidate], work: Workload) -> str:
    if best is not None and best.tp == 1:
        return (f"the model fits without tensor parallelism ({best.memory_gib['total']:.1f} of "
                f"{work.gpu_memory_gib:g} GiB per GPU): {best.dp}x data parallelism"
                + (f" with ZeRO-{best.zero_stage}, the lowest stage that fits" if best.zero_stage else "")
                + ("; gradient checkpointing is needed to fit the activations" if best.gradient_checkpointing else "")
                + ".")
    if best is None:
        smallest = min(cands, key=lambda c: c.memory_gib["total"])
        return (f"nothing fits on {work.gpus} x {work.gpu_memory_gib:g} GiB: the leanest layout (tp={smallest.tp}, "
                f"dp={smallest.dp}, ZeRO-{smallest.zero_stage}, checkpointing {smallest.gradient_checkpointing}) "
                f"needs {smallest.memory_gib['total']:.1f} GiB per GPU. Use more GPUs, LoRA, or a shorter sequence.")
    if best.pp > 1:
        return (f"no layout without pipeline stages fits; tp={best.tp} inside a node x pp={best.pp} stages x "
                f"dp={best.dp} does ({best.memory_gib['total']:.1f} of {work.gpu_memory_gib:g} GiB per GPU): run it "
                f"with tp_plugin.pipeline (examples/pipeline_finetune.py), not an Accelerate/DeepSpeed config.")
    return (f"tp={best.tp} is the smallest tensor-parallel degree that fits ({best.memory_gib['total']:.1f} of "
            f"{work.gpu_memory_gib:g} GiB per GPU) inside a node of {work.gpus_per_node} GPUs, where the TP "
            f"all-reduces ({best.comm_gib_per_step['tp']:.2f} GiB per step per GPU) stay on the fast links; the "
            f"other {best.dp}x is data parallelism"
            + (f" with ZeRO-{best.zero_stage}, the lowest stage that fits" if best.zero_stage else "")
            + ("; gradient checkpointing is needed to fit the activations" if best.gradient_checkpointing else "")
            + ".")


def plan_document(config, work: Workload) -> dict:
    cands = candidates(config, work)
    best = recommend(cands, work)
    return {"model_type": config.model_type, "workload": asdict(work),
            "candidates": [asdict(c) for c in cands], "recommended": asdict(best) if best else None,
            "reason": reason(best, cands, work)}
