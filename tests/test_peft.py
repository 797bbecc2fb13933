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

import tests.dist
import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, full_param
from tests.peft_parity import grad_error, replicated_identical

# Import peft and deepspeed once in the forkserver (pytest imports every test module before the first test
# starts it) instead of once per rank per test: about 4 s and 2 s each on this machine.
for _module in ("peft", "deepspeed"):
    if _module not in tests.dist.PRELOAD:
        tests.dist.PRELOAD.append(_module)

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
    bias_too = lora_kwargs.get("bias", "none") != "none"  # PEFT's bias="all"/"lora_only" trains base biases
    assert trainable and all("lora_" in n or (bias_too and n.endswith("bias")) for n in trainable), trainable

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (split, ref)]
    from tp_plugin.grad_norm import grad_norm

    losses, grad_err, replica_err, norm_err = [], 0.0, 0.0, 0.0
    ids = batch(seed=0)
    for step in range(STEPS):
        pair = []
        for m, opt in zip((split, ref), opts):
            if dropout_seeded:
                torch.manual_seed(1000 + step)  # same dropout masks in both runs (see ShardedInputDropout)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            pair.append(loss.item())
        grad_err = max(grad_err, grad_error(split, ref, group))
        # the LoRA factors' tags make tp_plugin's clipping norm the unsplit model's
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.requires_grad]))
        norm_err = max(norm_err, abs(grad_norm(split).item() - ref_norm.item()))
        replica_err = max(replica_err, replicated_identical(split, group, _lora_params(split)))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        replica_err = max(replica_err, replicated_identical(split, group, _lora_params(split)))
        losses.append(pair)
    return {"init_err": init_err, "losses": losses, "grad_err": grad_err, "replica_err": replica_err,
            "norm_err": norm_err, "n_lora": len(names)}


TRAIN_CASES = {
    # llama: q/k/v/gate/up column-parallel inside regions, o/down row-parallel; rslora scaling.
    "llama-all-linear-rslora": ("llama", 2, dict(use_rslora=True), False),
    # gpt2: transposed Conv1D weights; biases on B (lora_bias) and every base bias trained (bias="all").
    "gpt2-all-linear-biases": ("gpt2", 2, dict(lora_bias=True, bias="all"), False),
    # named targets, dropout > 0 with the same seeds: the sharded dropout draws the unsplit model's masks.
    "llama-named-dropout": ("llama", 2, dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                             lora_dropout=0.2), True),
    # tp=4 > 2 KV heads: k/v rows held by two ranks each, so B's gradient rows are summed over their holders.
    "llama-tp4-shared-kv": ("llama", 4, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), False),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_lora_training_matches_unsplit(case):
    arch, tp, lora_kwargs, dropout_seeded = TRAIN_CASES[case]
    for r in run_ranks(tp, _train, arch, tp, lora_kwargs, dropout_seeded):
        assert r["init_err"] == 0.0, r["init_err"]
        assert r["replica_err"] == 0.0, f"replicated LoRA factors drifted apart across TP ranks: {r['replica_err']}"
        split, ref = zip(*r["losses"])
        assert ref[-1] < ref[0] - 0.05, f"the reference run did not learn: {ref}"  # the test can see drift
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["grad_err"] <= GRAD_ATOL, r["grad_err"]
        # |norm difference| <= the 2-norm of the gradient differences (<= 2e-5 each, a few hundred nonzero);
        # a replicated factor counted twice, or a shard once, moves this norm (~0.5-1) by ~0.1
        assert r["norm_err"] <= 1e-4, r["norm_err"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _save_load_merge(rank, world, arch, out_dir, lora_kwargs):
    import json
    import os

    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    split, ref, mesh = _split_and_ref(arch, 2, lora_kwargs)
    group = mesh.tp_group
    _randomize_lora(split, ref, group)
    ids = batch(seed=3)
    result = {}

    # 1. save on every rank -> rank 0 writes the ordinary adapter, unsplit shapes, the values of the unsplit one.
    split.save_pretrained(out_dir)
    saved = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(ref)
    assert sorted(saved) == sorted(expected), set(saved) ^ set(expected)
    assert all(saved[k].shape == expected[k].shape for k in saved), {k: saved[k].shape for k in saved}
    result["saved_err"] = max((saved[k] - expected[k]).abs().max().item() for k in saved)
    config = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    result["saved_targets"] = sorted(config["target_modules"])
    result["files"] = sorted(os.listdir(out_dir))
    result["leftovers"] = [f for f in os.listdir(os.path.dirname(out_dir)) if f.startswith(".tp_plugin")]

    # 2. plain PEFT loads it into the unsplit model (no tp_plugin involved): equal logits.
    split_logits, ref_logits = _logits(split, ids), _logits(ref, ids)
    plain = PeftModel.from_pretrained(build(arch, 2), out_dir)
    result["plain_vs_split"] = (_logits(plain, ids) - split_logits).abs().max().item()
    result["split_vs_ref"] = (split_logits - ref_logits).abs().max().item()
    result["scale"] = ref_logits.abs().max().item()

    # 3. the ordinary adapter loads onto a fresh split model (each rank takes its slices), both load paths.
    for low_mem in (False, True):
        fresh = tp_plugin.parallelize(build(arch, 2), tp_size=2)
        loaded = PeftModel.from_pretrained(fresh, out_dir, low_cpu_mem_usage=low_mem)
        assert all(hasattr(p, "tp_shard") for _, p in _lora_params(loaded)), "tags lost on load"
        ref_params = dict(ref.named_parameters())
        result[f"load_param_err_{low_mem}"] = max(
            (full_param(p, group) - ref_params[n]).abs().max().item() for n, p in _lora_params(loaded))
        result[f"load_logits_err_{low_mem}"] = (_logits(loaded, ids) - ref_logits).abs().max().item()

    # 4. merge_and_unload on the split model: each merged shard is the slice of the unsplit merged weight.
    merged, ref_merged = split.merge_and_unload(), ref.merge_and_unload()
    ref_params = dict(ref_merged.named_parameters())
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(ref_params)
    result["merge_err"] = max((full_param(p, group) - ref_params[n]).abs().max().item()
                              for n, p in merged.named_parameters())
    result["merge_logits_err"] = (_logits(merged, ids) - ref_logits).abs().max().item()
    result["merged_types"] = sorted({type(m).__name__ for m in merged.modules()} & {"ColumnParallelLinear",
                                                                                   "RowParallelLinear"})
    return result


@pytest.mark.parametrize("arch,lora_kwargs", [("llama", {}), ("gpt2", dict(lora_bias=True, bias="all"))])
def test_save_load_merge_are_ordinary_peft(arch, lora_kwargs, tmp_path):
    results = run_ranks(2, _save_load_merge, arch, str(tmp_path / "adapter"), lora_kwargs)
    for r in results:
        # Saved tensors are copies of shards cut from the same values: exact.
        assert r["saved_err"] == 0.0
        assert "adapter_config.json" in r["files"] and "adapter_model.safetensors" in r["files"], r["files"]
        assert not r["leftovers"], r["leftovers"]  # the writer's temp dir is gone
        tol = ATOL * max(1.0, r["scale"])
        assert r["split_vs_ref"] <= tol and r["plain_vs_split"] <= tol, r
        for low_mem in (False, True):
            assert r[f"load_param_err_{low_mem}"] == 0.0, r  # slices of the saved tensors: exact
            assert r[f"load_logits_err_{low_mem}"] <= tol, r
        # Merged weight = W + s * B @ A, computed per shard: the same products, summed in the same order.
        assert r["merge_err"] <= 1e-6, r["merge_err"]
        assert r["merge_logits_err"] <= tol, r
        assert r["merged_types"] == ["ColumnParallelLinear", "RowParallelLinear"], r["merged_types"]


def _unsupported(rank, world):
    import peft

    from tp_plugin import TPSplitError

    # (DoRA, LoRA on the embedding, trainable tokens and IA3 on the linears are supported: tests/test_peft_variants.py)
    cases = {
        "dora_embedding": lambda: peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True),
        "tied_head": lambda: peft.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True),
        "lm_head": lambda: peft.LoraConfig(target_modules=["lm_head"]),
        "ia3_embedding": lambda: peft.IA3Config(target_modules=["embed_tokens", "down_proj"],
                                                feedforward_modules=["down_proj"]),
        "loha": lambda: peft.LoHaConfig(target_modules=["q_proj"]),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "variant": lambda: peft.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5]),
        "pissa": lambda: peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"),
        "tokens_on_linear": lambda: peft.LoraConfig(target_modules=["q_proj"],
                                                    trainable_token_indices={"down_proj": [1, 2]}),
        # (modules_to_save of a split layer is supported; of a module holding split layers, refused)
        "save_mlp": lambda: peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["layers.0.mlp"]),
    }
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    messages = {}
    for name, make in cases.items():
        with pytest.raises(TPSplitError) as err:
            peft.get_peft_model(model, make())
        messages[name] = str(err.value)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())
    # The other order: adapters first, then split -> refused, saying which order to use.
    adapted = peft.get_peft_model(build("llama", 2), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TPSplitError) as err:
        tp_plugin.parallelize(adapted.get_base_model(), tp_size=2)
    messages["order"] = str(err.value)
    return messages


def test_unsupported_targets_and_methods_fail_clearly():
    expected = {"dora_embedding": ["use_dora", "model.embed_tokens", "VocabParallelEmbedding"],
                "tied_head": ["ensure_weight_tying", "VocabParallelLMHead"],
                "lm_head": ["lm_head", "VocabParallelLMHead"],
                "ia3_embedding": ["IA3Config", "model.embed_tokens", "VocabParallelEmbedding"],
                "loha": ["LOHA"], "prompt": ["PROMPT_TUNING"], "variant": ["alora_invocation_tokens"],
                "pissa": ["pissa"], "tokens_on_linear": ["trainable_token_indices", "down_proj", "RowParallelLinear"],
                "save_mlp": ["modules_to_save", "model.layers.0.mlp", "gate_proj"],
                "order": ["split the base model first", "get_peft_model"]}
    for messages in run_ranks(2, _unsupported):  # every rank raises, before any collective: no hang
        for case, words in expected.items():
            if case != "order":
                assert "unsupported" in messages[case], messages[case]
            for word in words:
                assert word in messages[case], (case, messages[case])


def _layer_parity(rank, world, sync_input_grad):
    """Column -> row MLP built from the parallel layers directly, with LoRA on both, vs. unsplit PEFT LoRA.

    Covers both ways a column layer's LoRA sums A's partial gradient: the base syncs its own input gradient
    (no policy here uses that today), or an enclosing region does (emulated by copy_to_tp on the input)."""
    from peft import LoraConfig, inject_adapter_in_model

    from tp_plugin.runtime.comm import copy_to_tp
    from tp_plugin.integrations.peft.layers import TPLoraColumnLinear, TPLoraRowLinear
    from tp_plugin.runtime.layers import ColumnParallelLinear, RowParallelLinear
    from tp_plugin.sharding import even_specs, shard_tensor, unshard_tensor

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Linear(11, 6))
    config = dict(r=3, lora_alpha=6, lora_bias=True)
    ref = inject_adapter_in_model(LoraConfig(target_modules=["0", "1"], **config), ref)
    group, tp = dist.group.WORLD, world
    col_specs, row_specs = even_specs(11, tp, 0, what="col"), even_specs(11, tp, 1, what="row")
    col = ColumnParallelLinear(ref[0].base_layer.weight, ref[0].base_layer.bias, col_specs[rank], group,
                               sync_input_grad=sync_input_grad)
    row = RowParallelLinear(ref[1].base_layer.weight, ref[1].base_layer.bias, row_specs[rank], group)
    split = torch.nn.Sequential(TPLoraColumnLinear(col, "default", LoraConfig(**config), r=3, lora_alpha=6),
                                TPLoraRowLinear(row, "default", LoraConfig(**config), r=3, lora_alpha=6))
    gen = torch.Generator().manual_seed(1)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, param in split.named_parameters():
            if "lora_" in name:
                ref_params[name].copy_(torch.randn(ref_params[name].shape, generator=gen) * 0.3)
                param.copy_(ref_params[name] if param.tp_shard is None else shard_tensor(ref_params[name],
                                                                                         param.tp_shard))
    x = torch.randn(4, 5, 6, generator=gen)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(4, 5, 6, generator=gen)
    out = split(xs if sync_input_grad else copy_to_tp(xs, group))
    (out * weight).sum().backward()
    ref_out = ref(xr)
    (ref_out * weight).sum().backward()
    def rel(a, b):  # relative to the values' scale: a few fp32 ulps, whatever the size of the numbers
        return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

    errors = {"out": rel(out, ref_out), "x.grad": rel(xs.grad, xr.grad)}
    for name, param in split.named_parameters():
        if param.requires_grad:
            grad = param.grad
            if param.tp_shard is not None:
                grads, specs = [None] * tp, [None] * tp
                dist.all_gather_object(grads, grad, group=group)
                dist.all_gather_object(specs, param.tp_shard, group=group)
                grad = unshard_tensor(grads, specs)
            errors[name] = rel(grad, ref_params[name].grad)
    return errors


@pytest.mark.parametrize("sync_input_grad", [True, False])
def test_lora_layers_match_unsplit_lora(sync_input_grad):
    for errors in run_ranks(2, _layer_parity, sync_input_grad):
        assert len(errors) == 2 + 2 * 3, errors  # output, input grad, A/B weights and B bias of both layers
        worst = max(errors.items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-6, f"{worst[0]} differs by {worst[1]:.2e} (relative): {errors}"


def _count(rank, world, arch):
    from peft import get_peft_model

    from tests.collective_counter import CollectiveCounter

    counts = {}
    for adapted in (False, True):
        model = tp_plugin.parallelize(build(arch, 2), tp_size=2)
        if adapted:
            model = get_peft_model(model, _lora())  # all-linear: every column and row layer gets LoRA
        ids = batch()
        with CollectiveCounter() as fwd:
            loss = model(input_ids=ids, labels=ids).loss
        with CollectiveCounter() as bwd:
            loss.backward()
        counts[adapted] = {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts),
                           "lora_layers": len(_lora_names(model)) if adapted else 0}
    return counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_adds_no_forward_collective_and_one_small_backward_one_per_layer(arch):
    for counts in run_ranks(2, _count, arch):
        base, lora = counts[False], counts[True]
        assert lora["fwd"] == base["fwd"], (lora["fwd"], base["fwd"])  # the row LoRA rides on the base all-reduce
        # one all-reduce per LoRA layer: the partial gradient of the replicated factor ([r, in] or [out, r], or
        # the [tokens, r] output gradient of A when the base syncs its own input gradient); and one fewer for
        # the base: with the embedding frozen, nothing needs the first block's input gradient.
        expected = dict(base["bwd"], all_reduce=base["bwd"]["all_reduce"] + lora["lora_layers"] - 1)
        assert lora["bwd"] == expected, (lora["bwd"], base["bwd"], lora["lora_layers"])


def test_peft_imported_after_parallelize_still_gets_patched(tmp_path, monkeypatch):
    """`parallelize` may run before `import peft`: enable() then leaves a one-shot import hook that installs the
    patches right after peft executes. Checked on a stand-in module (peft itself is already imported here)."""
    import sys

    from tp_plugin.integrations import RunAfterImport

    (tmp_path / "tp_plugin_fake_peft.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = RunAfterImport("tp_plugin_fake_peft")
    hook.add(lambda: seen.append(sys.modules["tp_plugin_fake_peft"].VALUE), "first")
    hook.add(lambda: seen.append("second"), "second")
    hook.add(lambda: seen.append("again"), "first")  # the same key: registered once
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import importlib.util

    assert importlib.util.find_spec("tp_plugin_fake_peft") is not None  # an availability probe, not an import
    assert seen == [] and hook in sys.meta_path
    import tp_plugin_fake_peft  # noqa: F401

    assert seen == [41, "second"] and hook not in sys.meta_path  # once, after the module body, then removed
    monkeypatch.delitem(sys.modules, "tp_plugin_fake_peft")
