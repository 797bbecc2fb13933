"""LoRA on split models (PEFT's own API) vs. the same LoRA on the unsplit model.

Tolerances (fp32): as in test_parity.py, the split only reorders floating-point sums (row-parallel partial
products, all-reduced LoRA gradients), so values of order 1 differ by a few ulps; AdamW normalises updates, so
that noise stays ~1e-7 over 5 steps. We allow 1e-5 on losses and logits and 2e-5 on gradients, far below
what a missing all-reduce (a factor tp on a gradient) or a mis-sliced factor (errors of order 0.1) gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, full_grad, full_param

ATOL = 1e-5
GRAD_ATOL = 2e-5
STEPS = 5


def _lora(**overrides):
    from peft import LoraConfig

    kwargs = dict(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _lora_names(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _split_and_ref(arch: str, tp: int, lora_kwargs: dict, seed: int = 123):
    """The same tiny model twice (split / unsplit) with the same LoRA config and the same PEFT init RNG."""
    from peft import get_peft_model

    model = build(arch, tp)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp)
    torch.manual_seed(seed)
    split = get_peft_model(model, _lora(**lora_kwargs))
    torch.manual_seed(seed)
    ref = get_peft_model(ref, _lora(**lora_kwargs))
    return split, ref, model.tp_plugin_state.mesh


def _lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _randomize_lora(split, ref, group, seed: int = 7):
    """B starts at zero (PEFT's init): give every factor random values (same in both) so that step one already
    exercises every gradient path. The split gets its slice of the unsplit values."""
    from tp_plugin.sharding import shard_tensor

    gen = torch.Generator().manual_seed(seed)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, param in _lora_params(split):
            full = ref_params[name]
            full.copy_(torch.randn(full.shape, generator=gen) * 0.05)
            spec = param.tp_shard
            param.copy_(full if spec is None else shard_tensor(full, spec))


def _replicated_identical(model, group) -> float:
    """Max difference, over the TP group, of every replicated LoRA factor and its gradient (must be 0)."""
    worst = 0.0
    for name, param in _lora_params(model):
        if param.tp_shard is not None:
            continue
        for tensor in (param.detach(), param.grad):
            if tensor is None:
                continue
            copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, tensor.contiguous(), group=group)
            worst = max(worst, max((c - copies[0]).abs().max().item() for c in copies))
    return worst


def _train(rank, world, arch, tp, lora_kwargs, dropout_seeded):
    split, ref, mesh = _split_and_ref(arch, tp, lora_kwargs)
    group = mesh.tp_group
    names = _lora_names(split)
    assert names == _lora_names(ref), (names ^ _lora_names(ref))
    # PEFT's init, drawn at full size from the same seed and broadcast from TP rank 0, equals the unsplit init.
    ref_params = dict(ref.named_parameters())
    init_err = max((full_param(p, group) - ref_params[n]).abs().max().item() for n, p in _lora_params(split))
    _randomize_lora(split, ref, group)
    trainable = sorted(n for n, p in split.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable), trainable  # the frozen base stays frozen

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (split, ref)]
    losses, grad_err, replica_err = [], 0.0, 0.0
    ids = batch(seed=0)
    for step in range(STEPS):
        pair = []
        for m, opt in zip((split, ref), opts):
            if dropout_seeded:
                torch.manual_seed(1000 + step)  # same dropout masks in both runs (see ShardedInputDropout)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            pair.append(loss.item())
        ref_params = dict(ref.named_parameters())
        for name, param in split.named_parameters():
            if param.requires_grad:
                grad_err = max(grad_err, (full_grad(split, name, param, group) - ref_params[name].grad).abs().max().item())
        replica_err = max(replica_err, _replicated_identical(split, group))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        replica_err = max(replica_err, _replicated_identical(split, group))
        losses.append(pair)
    return {"init_err": init_err, "losses": losses, "grad_err": grad_err, "replica_err": replica_err,
            "n_lora": len(names)}


TRAIN_CASES = {
    # llama: q/k/v/gate/up column-parallel inside regions, o/down row-parallel; rslora scaling.
    "llama-all-linear-rslora": ("llama", dict(use_rslora=True), False),
    # gpt2: transposed Conv1D weights, biases on the base and on B (lora_bias), base biases trained.
    "gpt2-all-linear-lora_bias": ("gpt2", dict(lora_bias=True), False),
    # named targets, dropout > 0 with the same seeds: the sharded dropout draws the unsplit model's masks.
    "llama-qv-dropout": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                       lora_dropout=0.2), True),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_lora_training_matches_unsplit(case):
    arch, lora_kwargs, dropout_seeded = TRAIN_CASES[case]
    for r in run_ranks(2, _train, arch, 2, lora_kwargs, dropout_seeded):
        assert r["init_err"] == 0.0, r["init_err"]
        assert r["replica_err"] == 0.0, f"replicated LoRA factors drifted apart across TP ranks: {r['replica_err']}"
        split, ref = zip(*r["losses"])
        assert ref[-1] < ref[0] - 0.05, f"the reference run did not learn: {ref}"  # the test can see drift
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["grad_err"] <= GRAD_ATOL, r["grad_err"]
