"""Sequence parallelism: the split model with `sequence_parallel=True` against the unsplit model.

Tolerances are test_parity's (fp32, 1e-5): sequence parallelism changes which rank sums which rows, never what
is computed, so the results differ by a few ulps; a wrong scatter, a missing gradient sum of a norm weight or
a padding token leaking into attention gives errors of order 0.1-1.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, max_errors
from tests.test_parity import _assert_close
from tests.test_parity import _parity as parity


def _require(arch: str) -> None:
    import transformers

    if arch not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:  # make test-versions: older
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")  # releases lack newer families


def _parity(rank, world, arch, tp, seq, loss_parallel):
    result = parity(rank, world, arch, tp, "causal_lm", True, loss_parallel, True, seq)
    assert result["sequence_parallel"]  # the model ran the sequence-parallel layout (training mode), not plain TP
    return result


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_parity(arch, tp):
    _require(arch)
    # seq 12 divides by 2 and 4; 13 does not (padded at the end, stripped from every output)
    _assert_close(run_ranks(tp, _parity, arch, tp, 12, False))
    _assert_close(run_ranks(tp, _parity, arch, tp, 13, False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parity_loss_parallel(arch):
    _assert_close(run_ranks(2, _parity, arch, 2, 13, True))


def _parity_moe(rank, world, seq):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=101, hidden_size=48, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=12, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                         output_router_logits=True, router_aux_loss_coef=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=True)
    model.train(), ref.train()
    assert model.tp_plugin_state.sequence.active()
    ids = batch(seq=seq)
    mask = torch.ones_like(ids)
    # left padding: the router's auxiliary loss reads the mask over [batch, seq] tokens. The outputs at padded
    # positions are undefined (their queries attend to no key: eager attention spreads them evenly over every
    # key, the appended padding included), so they are not compared, and neither is the first real token's
    # label, which is predicted from a padded position.
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    out, ref_out = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    real = mask.bool()
    return {"loss": (out.loss - ref_out.loss).abs().item(), "ref_loss": ref_out.loss.item(),
            "aux": (out.aux_loss - ref_out.aux_loss).abs().item(),
            "logits": (out.logits - ref_out.logits)[real].abs().max().item(),
            "logits_scale": ref_out.logits.abs().max().item(),
            "grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group)}


def test_parity_moe_experts_and_router_logits():
    _require("qwen3_moe")
    # the experts gather the tokens (and the chosen experts) of the whole sequence, the router runs on this
    # rank's tokens (its weight gradient summed over the group), the router logits come back in [batch, seq] order
    for r in run_ranks(2, _parity_moe, 13):
        assert r["aux"] <= 1e-6, r["aux"]
    _assert_close(run_ranks(2, _parity_moe, 13))


def _count(rank, world, arch, sequence_parallel, gloo_shortcut=False):
    from tests.collective_counter import CollectiveCounter
    from tp_plugin.runtime import comm

    comm.GLOO_REDUCE_SCATTER_BY_ALL_REDUCE = gloo_shortcut  # count the collectives NCCL would run
    model = build(arch, 2)
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=sequence_parallel)
    model.train()
    ids = batch(seq=64)
    model(ids, labels=ids).loss.backward()  # the first training forward's one-off check
    with CollectiveCounter() as fwd:
        loss = model(ids, labels=ids).loss
    with CollectiveCounter() as bwd:
        loss.backward()
    return {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts), "fwd_bytes": dict(fwd.ring_bytes),
            "bwd_bytes": dict(bwd.ring_bytes), "layers": model.config.num_hidden_layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_collectives(arch):
    plain, sp = run_ranks(2, _count, arch, False)[0], run_ranks(2, _count, arch, True)[0]
    n = sp["layers"]
    # forward: the embedding's all-reduce (replicated, then split at the first layer), per block 2 all-gathers
    # (attention and MLP entries) + 2 reduce-scatters (their exits), 1 all-gather after the last layer, and the
    # fused head and loss's 2 all-reduces of [tokens] floats (the logits are not read, so never gathered)
    assert sp["fwd"] == {"all_reduce": 1 + 2, "all_gather": 2 * n + 1, "reduce_scatter": 2 * n}
    # backward: per block 2 reduce-scatters (entries) + 2 all-gathers (exits) + 2 all-gathers that fetch the
    # regions' inputs again (kept as this rank's tokens only), 1 all-gather for the first layer's split; the
    # LM head's input gradient; and the gradient sums of the parameters that saw this rank's tokens only:
    # llama 2 RMSNorm weights per block, gpt2 2 LayerNorms (weight, bias) + 2 row-parallel biases per block
    partial = {"llama": 2, "gpt2": 6}[arch] * n
    assert sp["bwd"] == {"all_reduce": 1 + partial, "all_gather": 4 * n + 1, "reduce_scatter": 2 * n}
    # bytes each rank sends: the entries and exits move what the all-reduces they replace moved; what is added
    # is the backward re-gather of the regions' inputs (the price of keeping only this rank's tokens, as in
    # Megatron), the first layer's split and the final gather (once per model), and the small norm sums
    hidden_bytes = 2 * 64 * model_hidden(arch) * 4  # [batch 2, seq 64, hidden] fp32
    regather = 2 * n * hidden_bytes / 2
    once = 2 * hidden_bytes / 2
    plain_total = sum(plain["fwd_bytes"].values()) + sum(plain["bwd_bytes"].values())
    sp_total = sum(sp["fwd_bytes"].values()) + sum(sp["bwd_bytes"].values())
    norms = sp["bwd_bytes"]["all_reduce"] - hidden_bytes  # all but the LM head's input gradient (2 (p-1)/p N)
    assert abs(sp_total - regather - once - norms - plain_total) <= 1e-6 * plain_total, (sp_total, plain_total)
    # on gloo (these CPU ranks) each reduce-scatter runs as an all-reduce, which gloo does faster
    gloo = run_ranks(2, _count, arch, True, True)[0]
    assert gloo["fwd"] == {"all_reduce": 1 + 2 + 2 * n, "all_gather": 2 * n + 1}
    assert gloo["bwd"] == {"all_reduce": 1 + partial + 2 * n, "all_gather": 4 * n + 1}


def model_hidden(arch: str) -> int:
    return 72


# ---- activations ------------------------------------------------------------------------------------------------

def test_activation_bytes_per_rank_are_unsplit_over_tp():
    # bytes autograd saves for backward in one training forward, per decoder layer, on TP rank 0 (meta device,
    # fake process group of tp ranks, bf16). Without SP the norms' inputs, the residual stream and the
    # column-parallel layers' inputs are kept whole on every rank; with SP every one of them is this rank's
    # tokens, and the regions' gathered inputs are not kept (fetched again in backward).
    import transformers

    from tp_plugin.tools.planner import activation_bytes

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_attention_heads=16,
                                      num_key_value_heads=8, vocab_size=1024, num_hidden_layers=2)
    unsplit = activation_bytes(config, 1, 1, 256, torch.bfloat16)["per_layer"]
    for tp in (2, 4, 8):
        plain = activation_bytes(config, tp, 1, 256, torch.bfloat16)["per_layer"]
        sp = activation_bytes(config, tp, 1, 256, torch.bfloat16, sequence_parallel=True)["per_layer"]
        assert sp <= 1.1 * unsplit / tp, (tp, sp / (unsplit / tp))
        assert plain >= 1.25 * unsplit / tp  # what SP removes: the replicated part, 1.3x (tp=2) to 3.2x (tp=8)


def _client_parity(rank, world, case):
    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=True)
    kwargs = {}
    ids = batch(seq=13)
    if case.startswith("checkpointing"):
        for m in (model, ref):
            m.gradient_checkpointing_enable({"use_reentrant": case.endswith("reentrant")})
    if case == "packed":  # two sequences packed in each row: positions restart at 0 where the second begins
        kwargs["position_ids"] = torch.cat([torch.arange(6), torch.arange(7)]).expand(2, 13)
    model.train(), ref.train()
    assert model.tp_plugin_state.sequence.active()
    out, ref_out = model(ids, labels=ids, **kwargs), ref(ids, labels=ids, **kwargs)
    out.loss.backward()
    ref_out.loss.backward()
    return {"loss": (out.loss - ref_out.loss).abs().item(), "ref_loss": ref_out.loss.item(),
            "logits": (out.logits - ref_out.logits).abs().max().item(),
            "logits_scale": ref_out.logits.abs().max().item(),
            "grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group)}


@pytest.mark.parametrize("case", ["checkpointing", "checkpointing-reentrant", "packed"])
def test_clients(case):
    _assert_close(run_ranks(2, _client_parity, case))


def _generate(rank, world):
    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=True)
    ids = batch(seq=7)
    model.train()
    model(ids, labels=ids).loss.backward()  # a sequence-parallel training step first
    tokens = {}
    for mode in ("train", "eval"):  # RL trainers generate in training mode
        getattr(model, mode)(), getattr(ref, mode)()
        tokens[mode] = (model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                        ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    return {mode: torch.equal(a, b) for mode, (a, b) in tokens.items()}


def test_generate_gives_the_unsplit_tokens():
    for r in run_ranks(2, _generate):
        assert r == {"train": True, "eval": True}


def _save(rank, world, out):
    from transformers import AutoModelForCausalLM

    model = tp_plugin.parallelize(build("gpt2", 2), tp_size=2, sequence_parallel=True)
    model.train()
    ids = batch(seq=13)
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.save_pretrained(out)  # HF's own method, on every rank
    model.eval()
    with torch.no_grad():
        mine = model(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        return (plain(ids).logits - mine).abs().max().item()


def test_save_pretrained_is_the_ordinary_checkpoint(tmp_path):
    # after a sequence-parallel step (norm and bias gradients summed over the group), the saved model reloads in
    # plain transformers with the split model's logits (fp32 round trip, TP summation order: 1e-5)
    assert max(run_ranks(2, _save, str(tmp_path))) <= 1e-5
