"""Sequence parallelism through the engines and clients that train a split model: DeepSpeed ZeRO-2/3, PEFT LoRA,
`TPTrainer`, Accelerate (DDP and DeepSpeed) switched on by the launch environment alone.

Tolerances are those of the engines' own test files (tests/test_deepspeed.py, test_peft.py, test_trainer.py,
test_accelerate.py), where each is explained: sequence parallelism only changes which rank sums which rows.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

def _deepspeed(rank, world):
    from tests.ds_helpers import deepspeed_losses, ds_config, reference_losses

    results = {}
    for arch in ("llama", "gpt2"):
        for stage in (2, 3):
            config = ds_config(stage, clip=1.0)
            config["tp_plugin"] = {"sequence_parallel": True}  # how a DeepSpeed config asks for it
            results[(arch, stage)] = deepspeed_losses(arch, 6, config, sequence_parallel=True)
        results[arch] = reference_losses(arch, 6, 1.0)[0]
    return results


def test_deepspeed_zero2_zero3_tp2_dp2():
    # TP=2 x DP=2 with ZeRO-2 and ZeRO-3 and clipping at 1.0: the norms' and row biases' gradients are summed over
    # the TP group before ZeRO reduces them over DP and before the clipping norm reads them. Tolerance: test_deepspeed's.
    from tests import dist as dist_helpers
    from tests.test_deepspeed import FP32_TOL

    if "deepspeed" not in dist_helpers.PRELOAD:
        dist_helpers.PRELOAD.append("deepspeed")
    results = run_ranks(4, _deepspeed, timeout_s=280)[0]
    for arch in ("llama", "gpt2"):
        for stage in (2, 3):
            err = max(abs(a - b) for a, b in zip(results[(arch, stage)], results[arch]))
            assert err <= FP32_TOL, (arch, stage, results[(arch, stage)], results[arch])


def _lora(rank, world, arch):
    from peft import get_peft_model

    from tests.peft_parity import grad_error, replicated_identical
    from tests.test_peft import _lora, _lora_params, _randomize_lora

    model = build(arch, 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=True)
    kwargs = dict(lora_bias=True, bias="all") if arch == "gpt2" else {}  # gpt2: row-parallel biases train too
    torch.manual_seed(123)
    split = get_peft_model(model, _lora(**kwargs))
    torch.manual_seed(123)
    ref = get_peft_model(ref, _lora(**kwargs))
    group = model.tp_plugin_state.mesh.tp_group
    _randomize_lora(split, ref, group)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (split, ref)]
    ids, losses, grad_err, replica_err = batch(seq=13), [], 0.0, 0.0
    split.train(), ref.train()
    for _ in range(3):
        pair = []
        for m, opt in zip((split, ref), opts):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            pair.append(loss.item())
        grad_err = max(grad_err, grad_error(split, ref, group))
        replica_err = max(replica_err, replicated_identical(split, group, _lora_params(split)))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(pair)
    return {"losses": losses, "grad_err": grad_err, "replica_err": replica_err}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_lora(arch):
    # LoRA on every linear layer: the row-parallel layers' LoRA terms ride on the reduce-scatter; losses and
    # the gathered LoRA gradients match the unsplit LoRA model (test_peft's tolerance), and the replicated factors
    # stay identical across the TP group
    for r in run_ranks(2, _lora, arch):
        assert max(abs(a - b) for a, b in r["losses"]) <= 1e-5, r["losses"]
        assert r["grad_err"] <= 2e-5, r["grad_err"]
        assert r["replica_err"] == 0.0


def _trainer_run(rank, world, out):
    from tests.test_trainer import GLOBAL, _losses, _trainer

    if world == 1:
        trainer = _trainer(build("llama", 2), out, GLOBAL, max_steps=4, save_steps=100)
    else:
        model = tp_plugin.parallelize(build("llama", 2), tp_size=2, sequence_parallel=True)
        trainer = _trainer(model, out, GLOBAL // (world // 2), max_steps=4, save_steps=100)
    trainer.train()
    return _losses(trainer)


def test_tp_trainer_tp2_dp2(tmp_path):
    # tp_plugin.TPTrainer at TP=2 x DP=2 (test_trainer's data, clipping at 1.0): the losses of one process
    ref = run_ranks(1, _trainer_run, tmp_path / "single")[0]
    for losses in run_ranks(4, _trainer_run, tmp_path / "split"):
        assert losses.keys() == ref.keys()
        assert max(abs(losses[k] - ref[k]) for k in ref) <= 1e-5, (losses, ref)


def _accelerate(rank, world, engine):
    import os

    from tests.test_accelerate import _accelerate_run, _deepspeed_run

    os.environ["TP_PLUGIN_SEQUENCE_PARALLEL"] = "1"  # the launch switch (e.g. in front of `accelerate launch`)
    split, original = [], tp_plugin.parallelize

    def parallelize(model, *args, **kwargs):  # the loops call tp_plugin.parallelize(model, tp_size=2) as they are
        split.append(original(model, *args, **kwargs))
        return split[-1]

    tp_plugin.parallelize = parallelize
    result = (_accelerate_run if engine == "ddp" else _deepspeed_run)(rank, world, 2, 0.5)
    result["sequence_parallel"] = tp_plugin.tp_state(split[0]).sequence is not None
    return result


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_accelerate(engine):
    # test_accelerate's loops (TP=2 x DP=2, clipping at 0.5), switched to SP by the environment alone
    from tests.test_accelerate import ATOL

    results = run_ranks(4, _accelerate, engine, timeout_s=240)
    ref = results[0]["ref"]
    for r in results:
        assert r["sequence_parallel"]
        assert max(abs(a - b) for a, b in zip(r["losses"], ref)) <= ATOL, (r["losses"], ref)
