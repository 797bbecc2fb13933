"""Accelerate trains a split model: TP=2 x DP=2 with DDP over the data-parallel group, data sharded over DP.

The ranks run `Accelerator(cpu=True)` (what `accelerate launch` without GPU gets from tp_plugin, see
tests/test_accelerate_launch.py for the real launcher) and the usual prepare / backward / step loop.

Tolerance of the loss comparison: the split run differs from the single-process run only in the order of
floating-point sums (row-parallel partial sums over TP, vocab-parallel softmax, the DDP gradient average over
DP instead of one mean over the global batch). AdamW turns gradient differences of a few ulps into parameter
differences of the same relative size, so losses of order 5 agree to ~1e-6 after 5 steps; we allow 1e-5
absolute. A wrong DP group or a wrong data split changes the losses at the 1e-2 level (different samples, or
gradients averaged with another shard), and a wrong clipping norm (local instead of global) at ~1e-3 with the
clipping below: both are far outside the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import tp_plugin
from tests.dist import run_ranks
from tests.models import build

STEPS, MICRO, SEQ, LR = 5, 2, 12, 1e-2
ATOL = 1e-5


def _data(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(3, 101, (n, SEQ), generator=gen)


def _reference(model, data, dp: int, clip: float) -> list[float]:
    """One process, the global batch of each step: the DP replicas' micro batches together."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        batch = data[step * MICRO * dp:(step + 1) * MICRO * dp]
        loss = model(batch, labels=batch).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _train(accelerator, model, optimizer, loader, clip: float, seen: list | None = None) -> list[float]:
    """The usual Accelerate loop over `loader`: the mean loss over the replicas of every step."""
    losses = []
    for batch in loader:
        loss = model(batch, labels=batch).loss
        accelerator.backward(loss)
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if seen is not None:
            seen.append(batch.clone())
    return losses


def _accelerate_run(rank, world, tp, clip):
    from accelerate import Accelerator

    dp = world // tp
    data = _data(STEPS * MICRO * dp)
    model = build("llama", tp)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp)
    accelerator = Accelerator(cpu=True)
    # The loader comes first on purpose: it must still be sharded over DP (the model in the same call counts).
    loader = DataLoader(data, batch_size=MICRO, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader, model, optimizer = accelerator.prepare(loader, model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert model.process_group is not None
    dp_ranks = torch.distributed.get_process_group_ranks(model.process_group)
    seen = []
    losses = _train(accelerator, model, optimizer, loader, clip, seen)
    ref_losses = _reference(ref, data, dp, clip) if rank == 0 else None
    return {"losses": losses, "ref": ref_losses, "dp_ranks": dp_ranks, "batches": len(loader),
            "first": seen[0].tolist()}  # plain lists: a tensor would travel as shared memory the rank frees


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_ddp_tp2_dp2_matches_single_process(clip):
    results = run_ranks(4, _accelerate_run, 2, clip)
    ref = results[0]["ref"]
    for rank, r in enumerate(results):
        # DDP over the DP group: ranks with the same TP rank (0,2) and (1,3), never the TP pair
        assert r["dp_ranks"] == [rank % 2, rank % 2 + 2], r["dp_ranks"]
        assert r["batches"] == STEPS  # steps per epoch = samples / (micro x DP), not / world
        assert len(r["losses"]) == STEPS
        errors = [abs(a - b) for a, b in zip(r["losses"], ref)]
        assert max(errors) <= ATOL, (r["losses"], ref)
    # the TP ranks of one replica got the same batch, the two replicas different ones
    assert results[0]["first"] == results[1]["first"] and results[2]["first"] == results[3]["first"]
    assert results[0]["first"] != results[2]["first"]


def _deepspeed_run(rank, world, tp, clip):
    """The same loop under DeepSpeed ZeRO-2 (config built in code: what a DEEPSPEED yaml + json give)."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    dp = world // tp
    data = _data(STEPS * MICRO * dp)
    model = build("llama", tp)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` exports for a DEEPSPEED config
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "gradient_clipping": clip, "zero_optimization": {"stage": 2},
              "tensor_parallel": {"autotp_size": tp}}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    loader = DataLoader(data, batch_size=MICRO, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader, engine, optimizer = accelerator.prepare(loader, model, optimizer)
    losses = []
    for batch in loader:
        loss = engine(batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    ref_losses = _reference(ref, data, dp, clip) if rank == 0 else None
    return {"losses": losses, "ref": ref_losses, "batches": len(loader), "zero": engine.zero_optimization_stage()}


def test_deepspeed_zero2_tp2_dp2_matches_single_process():
    # clipping on (0.5, below the ~2.5 gradient norm): DeepSpeed must clip with the unsplit model's norm
    results = run_ranks(4, _deepspeed_run, 2, 0.5, timeout_s=240)
    ref = results[0]["ref"]
    for r in results:
        assert r["zero"] == 2 and r["batches"] == STEPS
        errors = [abs(a - b) for a, b in zip(r["losses"], ref)]
        assert len(r["losses"]) == STEPS and max(errors) <= ATOL, (r["losses"], ref)


def _wrong_sampler(rank, world):
    from accelerate import Accelerator
    from torch.utils.data.distributed import DistributedSampler

    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    # deliberately wrong: sharded over the world, so the two TP ranks of a replica get different samples
    data = _data(16)
    loader = DataLoader(data, batch_size=MICRO, sampler=DistributedSampler(data, world, rank, shuffle=False))
    for batch in loader:
        model(batch, labels=batch).loss.backward()


def test_tp_batch_check_fires_on_every_rank():
    with pytest.raises(AssertionError) as info:
        run_ranks(4, _wrong_sampler)
    report = str(info.value)
    assert "4 rank(s) failed" in report, report[-3000:]
    assert report.count("got different batches") == 4, report[-3000:]
    assert "tensor-parallel group [0, 1]" in report and "tensor-parallel group [2, 3]" in report


def _eval_first_then_train(rank, world):
    """The check looks at the first *training* forward: an eval forward on equal prompts does not use it up.
    (Also the other order: Accelerator() first, then the split.)"""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model = accelerator.prepare(model)
    assert torch.distributed.get_process_group_ranks(model.process_group) == [rank]  # DP group of one
    model.eval()
    with torch.no_grad():
        model(_data(1))
    model.train()
    batch = _data(4)[rank:rank + 1]  # different on each rank
    try:
        model(batch, labels=batch)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_tp_batch_check_skips_eval_forwards():
    messages = run_ranks(2, _eval_first_then_train)
    assert all(m and "got different batches" in m for m in messages), messages


def test_every_accelerate_config_says_what_its_name_says():
    """Each yaml in configs/accelerate/ loads in Accelerate and names the layout its file name promises
    (tpT[_dpD][_zeroZ], TP inside a node); the GPU ones cannot run here, so this is their check."""
    import json
    import re
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.parallelism_config import ParallelismConfig

    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) >= 7, files
    for path in files:
        config = load_config_from_file(str(path))
        name = path.stem
        tp = int(re.search(r"tp(\d+)", name).group(1))
        fsdp = "fsdp2" in name  # FSDP2 over the data-parallel ranks: DP 2 ("cpu_tp2_fsdp2", the name)
        dp = int(m.group(1)) if (m := re.search(r"_dp(\d+)", name)) else 2 if fsdp else 1
        zero = int(m.group(1)) if (m := re.search(r"zero(\d)", name)) else None
        assert config.num_processes == tp * dp, (name, config.num_processes)
        assert tp <= config.num_processes // config.num_machines, f"{name}: a TP group would span nodes"
        if zero is None:
            if fsdp:
                assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2, name
            else:
                assert config.distributed_type.value == "MULTI_GPU", name
            sizes = {"parallelism_config_tp_size": tp, **({"parallelism_config_dp_shard_size": dp} if dp > 1 else {})}
            assert config.parallelism_config == sizes, (name, config.parallelism_config)
            # what an Accelerator() made before the split builds from them, and checks (tp x dp = processes)
            parallelism = ParallelismConfig(**{k.removeprefix("parallelism_config_"): v for k, v in sizes.items()})
            assert parallelism.total_size == config.num_processes, name
        else:
            assert config.distributed_type.value == "DEEPSPEED", name
            ds = json.loads((root / config.deepspeed_config["deepspeed_config_file"]).read_text())
            assert ds["tensor_parallel"]["autotp_size"] == tp and ds["zero_optimization"]["stage"] == zero, name
            assert "train_batch_size" not in ds, f"{name}: DeepSpeed derives it from micro x accum x DP"
            if zero == 3:
                assert config.deepspeed_config.get("zero3_init_flag") is False, f"{name}: load, split, then ZeRO-3"


def _usual_order_with_parallelism_config(rank, world, tp_in_config):
    """`Accelerator()` first, as on a GPU machine with the TP yaml: Accelerate validated the yaml's sizes (tp x
    dp = processes) and holds a `ParallelismConfig` with tp_size 2 (emulated here: Accelerate refuses one on CPU
    processes). Then the model is loaded and split, and `prepare` gets it."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    accelerator = Accelerator(cpu=True)
    config = ParallelismConfig(dp_shard_size=world // tp_in_config, tp_size=tp_in_config)  # (the yamls' sizes)
    accelerator.state.parallelism_config = config
    accelerator.state.device_mesh = config.get_device_mesh("cpu")
    data = _data(STEPS * MICRO * 2)
    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2)
    loader = DataLoader(data, batch_size=MICRO, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    try:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    except ValueError as exc:
        return {"error": str(exc)}
    losses = _train(accelerator, model, optimizer, loader, 0.0)
    return {"losses": losses, "ref": _reference(ref, data, 2, 0.0) if rank == 0 else None,
            "released": accelerator.parallelism_config is None,
            "dp_ranks": torch.distributed.get_process_group_ranks(model.process_group)}


def test_usual_order_releases_accelerates_parallelism_config():
    results = run_ranks(4, _usual_order_with_parallelism_config, 2)
    for rank, r in enumerate(results):
        assert r["released"] and r["dp_ranks"] == [rank % 2, rank % 2 + 2], r
        assert max(abs(a - b) for a, b in zip(r["losses"], results[0]["ref"])) <= ATOL, (r["losses"], results[0])
    # a config whose TP degree is not the split's: refused on every rank, before DDP is built
    for r in run_ranks(4, _usual_order_with_parallelism_config, 4):
        assert "tp_size=4" in r["error"] and "tp_size=2" in r["error"], r
