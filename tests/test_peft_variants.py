"""PEFT beyond plain LoRA on split models: DoRA, LoRA on the vocabulary-parallel embedding, trainable tokens, IA3
and `modules_to_save` of split layers, each against the same seeded PEFT adapter on the unsplit model, through
the scenario and tolerances of tests/peft_parity.py; plus their collectives, their patches and ZeRO-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build
from tests.peft_parity import (ATOL, GRAD_ATOL, STEPS, adapter_config, adapter_params, check, grad_error, parity,
                               replica_error)


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
    results = run_ranks(tp, parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    check(results, ["TPLoraColumnLinear", "TPLoraRowLinear"] if "o_proj" in str(kwargs) or tp == 2 else [])
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
    results = run_ranks(tp, parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    check(results, ["TPLoraEmbedding"])
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
    results = run_ranks(tp, parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    check(results, ["TPTrainableTokensLayer"])
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
    results = run_ranks(tp, parity, arch, tp, "lora", kwargs, str(tmp_path / "adapter"), opts)
    check(results, ["TPLoraColumnLinear" if tp == 2 else "TPLoraRowLinear"])


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
    results = run_ranks(tp, parity, arch, tp, "ia3", kwargs, str(tmp_path / "adapter"), opts)
    check(results, ["TPIA3ColumnLinear", "TPIA3RowLinear"])
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
        model = get_peft_model(tp_plugin.parallelize(build("llama", 2), tp_size=2), adapter_config("lora", **kwargs))
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
    split = get_peft_model(model, adapter_config(kind, **kwargs))
    torch.manual_seed(123)
    ref = get_peft_model(ref, adapter_config(kind, **kwargs))
    mesh = model.tp_plugin_state.mesh
    trainable = [p for _, p in adapter_params(split)]
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
              "tensor_parallel": {"autotp_size": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=split, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    ref_opt = torch.optim.AdamW([p for _, p in adapter_params(ref)], lr=1e-2)
    ids = batch(seed=0, batch_size=4)          # the global batch; this replica takes its half (same on both TP ranks)
    mine = ids[mesh.dp_rank * 2:(mesh.dp_rank + 1) * 2]
    losses, grad_err = [], 0.0
    for _ in range(STEPS):
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        grads = {n: safe_get_full_grad(p) for n, p in split.named_parameters() if p.requires_grad}  # DP-averaged
        grad_err = max(grad_err, grad_error(split, ref, mesh.tp_group, grads))
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh.dp_group)
        losses.append((mean.item() / mesh.dp_size, ref_loss.item()))
    replica_err = replica_error(split, mesh.tp_group)
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
