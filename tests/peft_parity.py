"""The PEFT parity scenario of tests/test_peft_variants.py (and the gradient checks tests/test_peft.py shares): a
split model's adapter against the same seeded PEFT adapter on the unsplit model.

`parity` runs it: the adapter is created with non-trivial weights (`init_lora_weights=False`
/ `init_ia3_weights=False`, so every factor matters from the first step), then

  1. initial logits, 2. three AdamW steps (losses, every gathered gradient, replicated weights identical across the
  TP group), 3. save on every rank -> the ordinary unsplit adapter (same keys and shapes as the unsplit one's),
  4. plain PEFT loads it onto an unsplit base, 5. `PeftModel.from_pretrained` loads it onto a fresh split model,
  6. `merge_and_unload` of the split model vs. that of the plain PEFT model of step 4 (which holds exactly the
  split model's trained adapter; the unsplit run's own differs by AdamW noise, see below).

Tolerances (fp32): the split only reorders floating-point sums (partial products summed over ranks, norms summed
from per-rank squares, gradients all-reduced), so values of order 1 differ by a few ulps (~1e-7 .. 1e-6; AdamW,
which normalises updates, keeps that noise at that level over 3 steps). We allow 1e-5 (relative to the logits'
scale) on logits and losses and 2e-5 on gradients: a missing norm all-reduce (norm off by ~sqrt(2)), a missing
gradient sum (a factor 2) or a mis-sliced weight gives errors of order 1e-2 .. 1.

The trained *weights* get 5e-4: AdamW's first steps are about lr * g / |g| per component, so a component whose
gradient is near zero (|g| ~ 1e-7) turns ulp-level gradient noise into a weight difference of lr * noise / |g|
(seen: 8e-5 on an IA3 vector after 3 steps of lr 1e-2), while the trained model's logits still agree to ~1e-7.
Adam is also blind to a gradient wrong by a constant factor, which is why every step's gradients are compared.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist

import tests.dist
import tp_plugin
from tests.models import batch, build, full_param

for _module in ("peft", "deepspeed"):  # imported once in the forkserver, not once per rank
    if _module not in tests.dist.PRELOAD:
        tests.dist.PRELOAD.append(_module)

ATOL = 1e-5
GRAD_ATOL = 2e-5
WEIGHT_ATOL = 5e-4  # trained weights: see the module docstring
STEPS = 3
ADAPTER_KEYS = ("lora_", "ia3_", "trainable_tokens_", "modules_to_save")


def adapter_config(kind: str, **kwargs):
    import peft

    if kind == "ia3":
        return peft.IA3Config(init_ia3_weights=False, **kwargs)
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def adapter_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def replica_error(model, group) -> float:
    """Max difference over the TP group of every replicated trainable weight and its gradient (must be 0)."""
    return replicated_identical(model, group, adapter_params(model))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a, b) -> float:
    """Max abs difference relative to the values' scale (at least 1): a few fp32 ulps whatever their size."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def parity(rank, world, arch, tp, kind, kwargs, out_dir, opts=None):
    """The scenario of the module docstring; `opts`: dropout_seeded, build (kwargs of `build`), split (of
    `parallelize`)."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    from tp_plugin.grad_norm import grad_norm

    opts = opts or {}
    dropout_seeded = opts.get("dropout_seeded", False)
    build_kwargs, split_kwargs = opts.get("build", {}), opts.get("split", {})
    model = build(arch, tp, **build_kwargs)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp, **split_kwargs)
    torch.manual_seed(123)
    split = get_peft_model(model, adapter_config(kind, **kwargs))
    torch.manual_seed(123)
    ref = get_peft_model(ref, adapter_config(kind, **kwargs))
    group = model.tp_plugin_state.mesh.tp_group
    r = {"kinds": sorted({type(m).__name__ for m in split.modules() if "TP" in type(m).__name__})}
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in adapter_params(split)]
    assert names and names == [n for n, _ in adapter_params(ref)], (names, [n for n, _ in adapter_params(ref)])
    bias_too = kwargs.get("bias", "none") != "none"
    assert all(any(k in n for k in ADAPTER_KEYS) or (bias_too and n.endswith("bias")) for n in names), names
    r["n_params"] = len(names)
    # factors drawn at full size from the same seed, broadcast from TP rank 0, then sliced: the unsplit ones,
    # exactly; DoRA's magnitude is computed (a norm: its sums reordered)
    init = {n: (full_param(p, group) - ref_params[n]).abs().max().item() for n, p in adapter_params(split)}
    r["init_err"] = max([e for n, e in init.items() if "magnitude" not in n], default=0.0)
    r["init_magnitude_err"] = max([e for n, e in init.items() if "magnitude" in n], default=0.0)
    ids = batch(seed=3)
    split.eval(), ref.eval()  # logits without dropout (trained below with the same masks in both)
    r["logits_err"] = rel(logits(split, ids), logits(ref, ids))

    opts = [torch.optim.AdamW([p for _, p in adapter_params(m)], lr=1e-2) for m in (split, ref)]
    train_ids, r["losses"], r["grad_err"], r["replica_err"] = batch(seed=0), [], 0.0, 0.0
    for step in range(STEPS):
        pair = []
        for m, opt in zip((split, ref), opts):
            m.train()
            if dropout_seeded:
                torch.manual_seed(1000 + step)  # the same dropout masks in both runs
            loss = m(input_ids=train_ids, labels=train_ids).loss
            loss.backward()
            pair.append(loss.item())
        r["grad_err"] = max(r["grad_err"], grad_error(split, ref, group))
        r["replica_err"] = max(r["replica_err"], replica_error(split, group))
        # the new weights' tags (split / replicated / held by several ranks) give clipping the unsplit norm
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in adapter_params(ref)]))
        r["norm_err"] = max(r.get("norm_err", 0.0), abs(grad_norm(split).item() - ref_norm.item()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        r["losses"].append(pair)
    for m in (split, ref):
        m.eval()
    trained = {n: (full_param(p, group) - ref_params[n]).abs().max().item() for n, p in adapter_params(split)}
    r["trained_err"] = max(trained.values())
    r["worst_trained"] = max(trained.items(), key=lambda kv: kv[1])
    split_logits, ref_logits = logits(split, ids), logits(ref, ids)
    r["trained_logits_err"] = rel(split_logits, ref_logits)

    # save on every rank: rank 0 writes the ordinary adapter, with the unsplit one's keys and shapes
    split.save_pretrained(out_dir)
    saved = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(ref)
    assert sorted(saved) == sorted(expected), set(saved) ^ set(expected)
    assert all(saved[k].shape == expected[k].shape for k in saved), {k: (saved[k].shape, expected[k].shape)
                                                                      for k in saved}
    r["saved_err"] = max((saved[k] - expected[k]).abs().max().item() for k in saved)
    r["saved_keys"] = sorted(saved)
    r["config_type"] = json.load(open(os.path.join(out_dir, "adapter_config.json")))["peft_type"]

    # plain PEFT on an unsplit base (no tp_plugin there) computes what the split model computes
    plain = PeftModel.from_pretrained(build(arch, tp, **build_kwargs), out_dir)
    r["plain_err"] = rel(logits(plain, ids), split_logits)
    # the ordinary adapter onto a fresh split model: each rank takes its slices (both of PEFT's load paths;
    # low_cpu_mem_usage builds the adapter on the meta device and assigns the loaded tensors)
    r["load_param_err"] = r["load_logits_err"] = 0.0
    r["load_tags"] = True
    for low_mem in (False, True):
        fresh = tp_plugin.parallelize(build(arch, tp, **build_kwargs), tp_size=tp, **split_kwargs)
        loaded = PeftModel.from_pretrained(fresh, out_dir, low_cpu_mem_usage=low_mem)
        loaded_params = dict(loaded.named_parameters())
        r["load_param_err"] = max([r["load_param_err"]] + [
            (full_param(loaded_params[n], group) - saved_value).abs().max().item()
            for n, saved_value in saved_by_param(loaded, saved).items()])
        r["load_logits_err"] = max(r["load_logits_err"], rel(logits(loaded, ids), split_logits))
        r["load_tags"] &= all(hasattr(p, "tp_shard") for n, p in loaded.named_parameters()
                              if any(k in n for k in ADAPTER_KEYS))

    # merging: each merged shard is the slice of the unsplit merged weight. Compared with `plain`, which holds the
    # split model's trained adapter exactly (the unsplit run's differs by AdamW noise, see the module docstring).
    merged, plain_merged = split.merge_and_unload(), plain.merge_and_unload()
    merged_plain_params = dict(plain_merged.named_parameters())
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(merged_plain_params)
    r["merge_err"] = max(rel(full_param(p, group), merged_plain_params[n]) for n, p in merged.named_parameters())
    # (not the unmerged logits: merging an embedding LoRA also changes the LM head tied to it, unsplit as split)
    r["merge_logits_err"] = rel(logits(merged, ids), logits(plain_merged, ids))
    r["merge_changed"] = rel(logits(merged, ids), logits(build(arch, tp, **build_kwargs), ids))
    return r


def saved_by_param(model, saved: dict) -> dict:
    """The saved tensor of each adapter parameter of `model` (PEFT drops the adapter name, DoRA's `.weight`)."""
    out = {}
    for name, _ in model.named_parameters():
        key = name.replace(".modules_to_save.default", "").replace(".default", "")
        key = key.removesuffix(".weight") if "lora_magnitude_vector" in key else key
        if key in saved:
            out[name] = saved[key]
    return out


def check(results, expect_kinds):
    for r in results:
        assert r["init_err"] == 0.0, r["init_err"]
        assert r["init_magnitude_err"] <= 1e-6, r["init_magnitude_err"]  # norms of order 1: a few ulps
        assert set(expect_kinds) <= set(r["kinds"]), r["kinds"]
        assert r["logits_err"] <= ATOL, r["logits_err"]
        split, ref = zip(*r["losses"])
        # the adapter moves the loss by 100x the tolerance: wrong gradients would show in the losses
        assert ref[0] - ref[-1] > 100 * ATOL, f"the reference run did not learn: {ref}"
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["grad_err"] <= GRAD_ATOL, r["grad_err"]
        # |norm difference| <= the 2-norm of the gradient differences (<= 2e-5 each, a few hundred nonzero); a
        # replicated weight counted twice, or a shard once, moves the norm by a sizeable fraction of itself
        assert r["norm_err"] <= 1e-4, r["norm_err"]
        assert r["replica_err"] == 0.0, f"replicated weights drifted apart across TP ranks: {r['replica_err']}"
        assert r["trained_err"] <= WEIGHT_ATOL and r["trained_logits_err"] <= ATOL, r
        assert r["saved_err"] <= WEIGHT_ATOL, r["saved_err"]  # the trained weights, gathered
        assert r["plain_err"] <= ATOL, r["plain_err"]
        assert r["load_param_err"] == 0.0 and r["load_tags"], r  # slices of the saved tensors: exact
        assert r["load_logits_err"] <= ATOL, r["load_logits_err"]
        assert r["merge_err"] <= ATOL and r["merge_logits_err"] <= ATOL, r
        assert r["merge_changed"] > 100 * ATOL, r  # the merged adapter changes the base model's logits


def grad_error(split, ref, group, grads: dict | None = None) -> float:
    """Max |gathered split gradient - unsplit gradient| over the trainable parameters (one collective).

    `grads` overrides `param.grad` (ZeRO-2 keeps the averaged gradient partitioned elsewhere)."""
    from tp_plugin.sharding import unshard_tensor

    mine = {n: ((grads or {}).get(n, p.grad).detach(), p.tp_shard) for n, p in split.named_parameters()
            if p.requires_grad}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, (grad, spec) in mine.items():
        if spec is not None:
            grad = unshard_tensor([r[name][0] for r in everyone], [r[name][1] for r in everyone])
        worst = max(worst, (grad - ref_params[name].grad).abs().max().item())
    return worst


def replicated_identical(model, group, params) -> float:
    """Max difference, over the TP group, of every replicated parameter of `params` ((name, param) pairs) and of
    its gradient (must be 0)."""
    worst = 0.0
    for name, param in params:
        if getattr(param, "tp_shard", None) is not None:
            continue
        for tensor in (param.detach(), param.grad):
            if tensor is None:
                continue
            copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, tensor.contiguous(), group=group)
            worst = max(worst, max((c - copies[0]).abs().max().item() for c in copies))
    return worst
