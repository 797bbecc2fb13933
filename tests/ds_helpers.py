"""Helpers for the DeepSpeed tests: configs, the unsplit reference run, and a (dp x tp) DeepSpeed run.

The global batch has 4 sequences; each of the 2 data-parallel replicas trains on its half (the same half on
both ranks of a TP group), and the reference trains the unsplit model on all 4 in one process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

import tp_plugin
import tp_plugin.integrations.deepspeed
from tests.models import batch, build

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
LR = 1e-2
GLOBAL_BATCH = 4


def ds_config(stage: int, *, clip: float, bf16: bool = False, tp: int | None = 2, gas: int = 1) -> dict:
    """A DeepSpeed config for tests: tiny buckets are fine, and no DeepSpeed optimizer (it would compile one)."""
    dp = 4 // (tp or 2)  # the tests run 4 ranks
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dp // gas, "gradient_accumulation_steps": gas,
              "gradient_clipping": clip, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
              "wall_clock_breakdown": False}
    if tp is not None:
        config["tensor_parallel"] = {"autotp_size": tp}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def global_batches(steps: int) -> list[torch.Tensor]:
    """Two global batches, alternating: small enough to memorise, so the loss falls visibly in 10 steps."""
    return [batch(seed=100 + step % 2, batch_size=GLOBAL_BATCH, seq=12) for step in range(steps)]


def reference_losses(arch: str, steps: int, clip: float, tp: int = 2) -> tuple[list[float], list[float]]:
    """The unsplit model, one process, the whole global batch per step: losses and pre-clipping grad norms."""
    model = build(arch, tp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for ids in global_batches(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, norms


def deepspeed_losses(arch: str, steps: int, config: dict, *, tp: int = 2, with_mpu: bool = False,
                     sequence_parallel: bool | None = None) -> list[float]:
    """Split the model, hand it to deepspeed.initialize unchanged, train; the global loss of each step."""
    import deepspeed

    model = tp_plugin.parallelize(build(arch, tp), tp_size=tp, sequence_parallel=sequence_parallel)
    mesh = model.tp_plugin_state.mesh
    extra = {"mpu": tp_plugin.mpu(model)} if with_mpu else {}  # the top-level name users reach for
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config=copy.deepcopy(config), **extra)
    gas = engine.gradient_accumulation_steps()
    per_rank = GLOBAL_BATCH // mesh.dp_size
    losses = []
    for ids in global_batches(steps):
        mine = ids[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]
        total = 0.0
        for micro in mine.chunk(gas):
            loss = engine(micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / gas
        dist.all_reduce(total, group=mesh.dp_group)  # mean over the data-parallel replicas = global batch loss
        losses.append(total.item() / mesh.dp_size)
    engine.destroy()
    return losses


def _engine(arch: str, config: dict):
    import deepspeed

    model = tp_plugin.parallelize(build(arch, 2), tp_size=2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config=copy.deepcopy(config))
    return engine, model.tp_plugin_state.mesh


def _train(engine, mesh, batches) -> list[float]:
    per_rank = GLOBAL_BATCH // mesh.dp_size
    losses = []
    for ids in batches:
        mine = ids[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]
        loss = engine(mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh.dp_group)
        losses.append(total.item() / mesh.dp_size)
    return losses


def resume_losses(arch: str, config: dict, ckpt_dir: str, hf_dir: str, steps: int = 6, resume: bool = True) -> dict:
    """Uninterrupted run vs. save_checkpoint after half the steps + a fresh engine that load_checkpoint()s.

    At the save point the engine is also exported with `tp_plugin.save_pretrained` (an ordinary HF
    checkpoint), and its logits on a probe batch are returned for comparison with the exported model."""
    batches = global_batches(steps)
    straight = None
    if resume:
        engine, mesh = _engine(arch, config)
        straight = _train(engine, mesh, batches)
        engine.destroy()

    engine, mesh = _engine(arch, config)
    first = _train(engine, mesh, batches[: steps // 2])
    engine.save_checkpoint(ckpt_dir, tag="half")
    tp_plugin.save_pretrained(engine, hf_dir)
    with torch.no_grad():
        probe = engine(batch(seed=7)).logits.detach().clone()
    engine.destroy()
    if not resume:
        return {"probe": probe}
    engine, mesh = _engine(arch, config)  # fresh weights and optimizer: everything must come from the checkpoint
    path, _ = engine.load_checkpoint(ckpt_dir, tag="half")
    assert path is not None, "load_checkpoint found nothing"
    resumed = first + _train(engine, mesh, batches[steps // 2:])
    engine.destroy()
    files = sorted(p.name for p in (Path(ckpt_dir) / "half").iterdir())
    return {"straight": straight, "resumed": resumed, "files": files, "probe": probe}
