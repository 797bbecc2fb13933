"""PEFT beyond plain LoRA on split models: DoRA, LoRA on the vocabulary-parallel embedding, trainable tokens and
IA3, each against the same seeded PEFT adapter on the unsplit model.

Every case runs one scenario (`_parity`): the adapter is created with non-trivial weights (`init_lora_weights=False`
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
from tests.dist import run_ranks
from tests.models import batch, build, full_param
from tests.test_peft import _grad_error, _replicated_identical

for _module in ("peft", "deepspeed"):  # imported once in the forkserver, not once per rank
    if _module not in tests.dist.PRELOAD:
        tests.dist.PRELOAD.append(_module)

ATOL = 1e-5
GRAD_ATOL = 2e-5
WEIGHT_ATOL = 5e-4  # trained weights: see the module docstring
STEPS = 3
ADAPTER_KEYS = ("lora_", "ia3_", "trainable_tokens_", "modules_to_save")


def _config(kind: str, **kwargs):
    import peft

    if kind == "ia3":
        return peft.IA3Config(init_ia3_weights=False, **kwargs)
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def _adapter_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _replica_error(model, group) -> float:
    """Max difference over the TP group of every replicated trainable weight and its gradient (must be 0)."""
    return _replicated_identical(model, group, _adapter_params(model))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a, b) -> float:
    """Max abs difference relative to the values' scale (at least 1): a few fp32 ulps whatever their size."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _parity(rank, world, arch, tp, kind, kwargs, out_dir, opts=None):
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
    split = get_peft_model(model, _config(kind, **kwargs))
    torch.manual_seed(123)
    ref = get_peft_model(ref, _config(kind, **kwargs))
    group = model.tp_plugin_state.mesh.tp_group
    r = {"kinds": sorted({type(m).__name__ for m in split.modules() if "TP" in type(m).__name__})}
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in _adapter_params(split)]
    assert names and names == [n for n, _ in _adapter_params(ref)], (names, [n for n, _ in _adapter_params(ref)])
    bias_too = kwargs.get("bias", "none") != "none"
    assert all(any(k in n for k in ADAPTER_KEYS) or (bias_too and n.endswith("bias")) for n in names), names
    r["n_params"] = len(names)
    # factors drawn at full size from the same seed, broadcast from TP rank 0, then sliced: the unsplit ones,
    # exactly; DoRA's magnitude is computed (a norm: its sums reordered)
    init = {n: (full_param(p, group) - ref_params[n]).abs().max().item() for n, p in _adapter_params(split)}
    r["init_err"] = max([e for n, e in init.items() if "magnitude" not in n], default=0.0)
    r["init_magnitude_err"] = max([e for n, e in init.items() if "magnitude" in n], default=0.0)
    ids = batch(seed=3)
    split.eval(), ref.eval()  # logits without dropout (trained below with the same masks in both)
    r["logits_err"] = _rel(_logits(split, ids), _logits(ref, ids))

    opts = [torch.optim.AdamW([p for _, p in _adapter_params(m)], lr=1e-2) for m in (split, ref)]
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
        r["grad_err"] = max(r["grad_err"], _grad_error(split, ref, group))
        r["replica_err"] = max(r["replica_err"], _replica_error(split, group))
        # the new weights' tags (split / replicated / held by several ranks) give clipping the unsplit norm
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in _adapter_params(ref)]))
        r["norm_err"] = max(r.get("norm_err", 0.0), abs(grad_norm(split).item() - ref_norm.item()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        r["losses"].append(pair)
    for m in (split, ref):
        m.eval()
    trained = {n: (full_param(p, group) - ref_params[n]).abs().max().item() for n, p in _adapter_params(split)}
    r["trained_err"] = max(trained.values())
    r["worst_trained"] = max(trained.items(), key=lambda kv: kv[1])
    split_logits, ref_logits = _logits(split, ids), _logits(ref, ids)
    r["trained_logits_err"] = _rel(split_logits, ref_logits)

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
    r["plain_err"] = _rel(_logits(plain, ids), split_logits)
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
            for n, saved_value in _saved_by_param(loaded, saved).items()])
        r["load_logits_err"] = max(r["load_logits_err"], _rel(_logits(loaded, ids), split_logits))
        r["load_tags"] &= all(hasattr(p, "tp_shard") for n, p in loaded.named_parameters()
                              if any(k in n for k in ADAPTER_KEYS))

    # merging: each merged shard is the slice of the unsplit merged weight. Compared with `plain`, which holds the
    # split model's trained adapter exactly (the unsplit run's differs by AdamW noise, see the module docstring).
    merged, plain_merged = split.merge_and_unload(), plain.merge_and_unload()
    merged_plain_params = dict(plain_merged.named_parameters())
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(merged_plain_params)
    r["merge_err"] = max(_rel(full_param(p, group), merged_plain_params[n]) for n, p in merged.named_parameters())
    # (not the unmerged logits: merging an embedding LoRA also changes the LM head tied to it, unsplit as split)
    r["merge_logits_err"] = _rel(_logits(merged, ids), _logits(plain_merged, ids))
    r["merge_changed"] = _rel(_logits(merged, ids), _logits(build(arch, tp, **build_kwargs), ids))
    return r


def _saved_by_param(model, saved: dict) -> dict:
    """The saved tensor of each adapter parameter of `model` (PEFT drops the adapter name, DoRA's `.weight`)."""
    out = {}
    for name, _ in model.named_parameters():
        key = name.replace(".modules_to_save.default", "").replace(".default", "")
        key = key.removesuffix(".weight") if "lora_magnitude_vector" in key else key
        if key in saved:
            out[name] = saved[key]
    return out


def _check(results, expect_kinds):
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


DORA = {
    # llama all-linear: q/k/v/gate/up column-parallel (m split with the rows), o/down row-parallel (norm summed)
    "llama": ("llama", 2, dict(target_modules="all-linear", use_dora=True), {}),
    # gpt2: transposed Conv1D weights (fused c_attn split per q/k/v; its base bias enters DoRA's `result - bias`).
    # Not bias="all": the key bias has an exactly-zero gradient, whose ulp noise AdamW turns into lr-sized steps.
    "gpt2": ("gpt2", 2, dict(target_modules="all-linear", use_dora=True), {}),
    # dropout: PEFT's DoRA recomputes the base term on the dropped-out input; same masks in both runs
    "llama-dropout": ("llama", 2, dict(target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True,
                                       lora_dropout=0.2), dict(dropout_seeded=True)),
    # tp=4 > 2 KV heads: k/v rows held by two ranks each, so m's and B's gradient rows are summed over holders
    "llama-tp4-shared-kv": ("llama", 4, dict(target_modules=["k_proj", "v_proj", "o_proj"], use_dora=True), {}),
    # sequence parallelism: the row layers reduce-scatter, so their replicated m sees this rank's tokens only
    "llama-sequence-parallel": ("llama", 2, dict(target_modules=["v_proj", "o_proj", "down_proj"], use_dora=True),
                                dict(split=dict(sequence_parallel=True))),
}


@pytest.mark.parametrize("case", list(DORA))
def test_dora_matches_unsplit(case, tmp_path):
    arch, tp, kwargs, opts = DORA[case]
    results = run_ranks(tp, _parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    _check(results, ["TPLoraColumnLinear", "TPLoraRowLinear"] if "o_proj" in str(kwargs) or tp == 2 else [])
    assert any("lora_magnitude_vector" in k for k in results[0]["saved_keys"])


EMBEDDING = {
    # the tied LM head keeps the base weight (as unsplit); q/o LoRA beside it. vocab 101 -> 51 + 50 rows + 1 pad
    "llama-tied": ("llama", 2, dict(target_modules=["embed_tokens", "q_proj", "o_proj"]), {}),
    # untied head, rslora scaling, tp=4 (26 rows per rank, the last one padded with 3 zero rows)
    "llama-tp4-untied": ("llama", 4, dict(target_modules=["embed_tokens"], use_rslora=True),
                         dict(build=dict(tied=False))),
    # gemma scales the embedding (embed_scale): the LoRA term is scaled like the base lookup
    "gemma-scaled": ("gemma", 2, dict(target_modules=["embed_tokens", "v_proj"]), {}),
}


@pytest.mark.parametrize("case", list(EMBEDDING))
def test_embedding_lora_matches_unsplit(case, tmp_path):
    arch, tp, kwargs, opts = EMBEDDING[case]
    results = run_ranks(tp, _parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    _check(results, ["TPLoraEmbedding"])
    # PEFT saves the embedding's base weight with an embedding LoRA: gathered to its full, unsplit rows
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in results[0]["saved_keys"])


TOKENS = {
    # new rows for tokens of both ranks' vocabulary ranges (5, 7 | 63, 98; all in the training batch), LoRA on q
    # beside them; the tied LM head writes the same rows (PEFT ties its token adapter to the embedding's)
    "llama-tied": ("llama", 2, dict(target_modules=["q_proj"], trainable_token_indices=[63, 5, 98, 7]), {}),
    # untied head: only the embedding's rows; tp=4, the tokens on ranks 0, 2, 3, 3 (rank 1 holds none)
    "llama-tp4-untied": ("llama", 4, dict(target_modules=["o_proj"], trainable_token_indices=[5, 98, 63, 100]),
                         dict(build=dict(tied=False))),
}


@pytest.mark.parametrize("case", list(TOKENS))
def test_trainable_tokens_match_unsplit(case, tmp_path):
    arch, tp, kwargs, opts = TOKENS[case]
    results = run_ranks(tp, _parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    _check(results, ["TPTrainableTokensLayer"])
    assert any("trainable_tokens_delta" in k for k in results[0]["saved_keys"])


MODULES_TO_SAVE = {
    # PEFT trains a deep copy of each: a split copy of the row-parallel o_proj and of the vocabulary-split LM head
    # (tied: the copy gets its own weight, as unsplit), saved gathered; LoRA on q beside them
    "llama-o_proj-and-tied-head": ("llama", 2, dict(target_modules=["q_proj"], modules_to_save=["o_proj", "lm_head"]),
                                   {}),
    # tp=4, untied: a column-parallel layer with replicated KV rows and the vocabulary-split input embedding
    "llama-tp4-k_proj-and-embedding": ("llama", 4, dict(target_modules=["o_proj"],
                                                        modules_to_save=["k_proj", "embed_tokens"]),
                                       dict(build=dict(tied=False))),
}


@pytest.mark.parametrize("case", list(MODULES_TO_SAVE))
def test_modules_to_save_of_split_layers_match_unsplit(case, tmp_path):
    arch, tp, kwargs, opts = MODULES_TO_SAVE[case]
    results = run_ranks(tp, _parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    _check(results, ["TPLoraColumnLinear" if tp == 2 else "TPLoraRowLinear"])


IA3 = {
    # PEFT's llama default: k/v output-scaled (column, l split with the rows), down input-scaled (row, l split)
    "llama-default": ("llama", 2, {}, {}),
    # every case: column output (q), column input (up: l replicated, gradient summed), row output (o: after the
    # reduction), row input (down)
    "llama-all-cases": ("llama", 2, dict(target_modules=["q_proj", "up_proj", "o_proj", "down_proj"],
                                         feedforward_modules=["up_proj", "down_proj"]), {}),
    # gpt2: transposed Conv1D weights; the fused c_attn (l split per q/k/v) and both c_proj
    "gpt2": ("gpt2", 2, dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"],
                             feedforward_modules=["mlp.c_proj"]), {}),
    # tp=4 > 2 KV heads: rows of k/v held by two ranks each sum l's gradient over their holders
    "llama-tp4-shared-kv": ("llama", 4, dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"]), {}),
    # sequence parallelism: o's output vector is applied to this rank's tokens only (its gradient summed)
    "llama-sequence-parallel": ("llama", 2, dict(target_modules=["q_proj", "up_proj", "o_proj", "down_proj"],
                                                 feedforward_modules=["up_proj", "down_proj"]),
                                dict(split=dict(sequence_parallel=True))),
}


@pytest.mark.parametrize("case", list(IA3))
def test_ia3_matches_unsplit(case, tmp_path):
    arch, tp, kwargs, opts = IA3[case]
    results = run_ranks(tp, _parity, arch, tp, "ia3", kwargs, str(tmp_path / "adapter"), opts)
    _check(results, ["TPIA3ColumnLinear", "TPIA3RowLinear"])
    assert results[0]["config_type"] == "IA3"


def _counts(rank, world):
    """Collectives of one forward and one backward of llama at tp=2, per adapter kind."""
    from peft import get_peft_model

    from tests.collective_counter import CollectiveCounter

    linears = ["q_proj", "v_proj", "o_proj", "down_proj"]
    configs = {"lora": dict(target_modules=linears), "dora": dict(target_modules=linears, use_dora=True),
               "lora+embedding": dict(target_modules=linears + ["embed_tokens"])}
    counts = {}
    for name, kwargs in configs.items():
        model = get_peft_model(tp_plugin.parallelize(build("llama", 2), tp_size=2), _config("lora", **kwargs))
        ids = batch()
        with CollectiveCounter() as fwd:
            loss = model(input_ids=ids, labels=ids).loss
        with CollectiveCounter() as bwd:
            loss.backward()
        counts[name] = {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts), "fwd_bytes": fwd.ring_bytes["all_reduce"]}
    return counts


def test_collectives_dora_adds_one_norm_all_reduce_per_row_layer_embedding_lora_none():
    for c in run_ranks(2, _counts):
        lora, dora, emb = c["lora"], c["dora"], c["lora+embedding"]
        # DoRA: one [out] all-reduce of the squared norms per row-parallel layer (o, down: 2 per block, 2 blocks);
        # backward as plain LoRA (the norm is detached; m's gradient is complete on every rank)
        assert dora["fwd"] == dict(lora["fwd"], all_reduce=lora["fwd"]["all_reduce"] + 4), (dora, lora)
        assert dora["bwd"] == lora["bwd"], (dora["bwd"], lora["bwd"])
        # embedding LoRA: its lookup rides on the embedding's all-reduce (same count, r=4 more numbers per token);
        # backward: B needs no sum, but now the first block's input gradient is needed (all-reduced), where with
        # the embedding frozen nothing upstream wanted it
        assert emb["fwd"] == lora["fwd"] and emb["fwd_bytes"] > lora["fwd_bytes"], (emb, lora)
        assert emb["bwd"] == dict(lora["bwd"], all_reduce=lora["bwd"]["all_reduce"] + 1), (emb["bwd"], lora["bwd"])


def _patches(rank, world):
    import inspect

    import peft.utils.save_and_load as save_and_load
    from peft.tuners.ia3 import IA3Model
    from peft.utils.other import TrainableTokensWrapper

    def snapshot():
        return [inspect.getattr_static(IA3Model, "_create_new_module"),
                inspect.getattr_static(TrainableTokensWrapper, "init_modules"),
                save_and_load.has_valid_embedding_base_layer]

    tp_plugin.integrations.uninstall()  # earlier tests of the harness may have split models in this process
    before = snapshot()
    tp_plugin.parallelize(build("llama", 2), tp_size=2)
    during = snapshot()
    tp_plugin.integrations.uninstall()
    return [a is b for a, b in zip(before, during)], [a is b for a, b in zip(before, snapshot())], \
        isinstance(during[0], staticmethod)


def test_variant_patches_are_installed_by_the_split_and_undone_by_uninstall():
    for changed, restored, static in run_ranks(2, _patches):
        assert not any(changed) and all(restored), (changed, restored)
        assert static  # IA3's dispatcher stays a staticmethod (PEFT calls it on the instance)


def _zero(rank, world, kwargs, kind):
    """TP=2 x DP=2 under DeepSpeed ZeRO-2: the split adapter vs. the unsplit one on the same global batch."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from peft import get_peft_model

    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2)
    torch.manual_seed(123)
    split = get_peft_model(model, _config(kind, **kwargs))
    torch.manual_seed(123)
    ref = get_peft_model(ref, _config(kind, **kwargs))
    mesh = model.tp_plugin_state.mesh
    trainable = [p for _, p in _adapter_params(split)]
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
              "tensor_parallel": {"autotp_size": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=split, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    ref_opt = torch.optim.AdamW([p for _, p in _adapter_params(ref)], lr=1e-2)
    ids = batch(seed=0, batch_size=4)          # the global batch; this replica takes its half (same on both TP ranks)
    mine = ids[mesh.dp_rank * 2:(mesh.dp_rank + 1) * 2]
    losses, grad_err = [], 0.0
    for _ in range(STEPS):
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        grads = {n: safe_get_full_grad(p) for n, p in split.named_parameters() if p.requires_grad}  # DP-averaged
        grad_err = max(grad_err, _grad_error(split, ref, mesh.tp_group, grads))
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh.dp_group)
        losses.append((mean.item() / mesh.dp_size, ref_loss.item()))
    replica_err = _replica_error(split, mesh.tp_group)
    engine.destroy()
    return {"losses": losses, "grad_err": grad_err, "replica_err": replica_err}


@pytest.mark.parametrize("kind,kwargs", [("lora", dict(target_modules=["q_proj", "o_proj"], use_dora=True)),
                                         ("lora", dict(target_modules=["embed_tokens", "v_proj"])),
                                         ("ia3", dict(target_modules=["v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))],
                         ids=["dora", "embedding", "ia3"])
def test_tp2_dp2_zero2_matches_unsplit(kind, kwargs):
    for r in run_ranks(4, _zero, kwargs, kind, timeout_s=240):
        split, ref = zip(*r["losses"])
        assert ref[0] - ref[-1] > 100 * ATOL, r["losses"]
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["grad_err"] <= GRAD_ATOL, r["grad_err"]
        # ZeRO-2 partitions the optimizer over DP; the gathered TP-replicated weights stay identical
        assert r["replica_err"] == 0.0, r["replica_err"]
