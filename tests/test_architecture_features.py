"""Architectures with features of their own: gpt-oss (experts with biases, attention sinks), StarCoder 1 (multi-query
fused c_attn), MPT (ALiBi through `position_bias`), CodeGen (qkv in 4 head blocks), Mamba-2 mixers split by heads (a
pure Mamba-2 model and the hybrids Bamba and Falcon-H1, whose single group of B/C spans ranks), Mamba (1) mixers
split by channels, Zamba's per-head mixers, LFM3's short convolutions, LongCat-Flash's zero experts, Inkling's
embedding that normalises after the lookup (kept whole), Gemma 3n's activation sparsity (mean and std over the split
intermediate dim), and vision-language models (Llava, Qwen2.5-VL, Mllama): parity with the unsplit model at tp=2 and
tp=4, the collectives they issue, an ordinary checkpoint from the split, and LoRA on a split VLM.

Tolerances: fp32; the split only reorders floating-point sums, so logits, loss and every gradient agree within a
few ulps of values of order 1 (observed <= 6e-7 relative). We allow 1e-5 relative (to max(1, |unsplit|)), far
below the O(1e-2..1) errors of a bias added once per rank, a mis-sliced head, group or sink, or a norm whose
statistics miss the other ranks' features (each checked to fail that way while this was written).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tests.dist
import tp_plugin
from tests.dist import run_ranks

for _module in ("peft",):
    if _module not in tests.dist.PRELOAD:
        tests.dist.PRELOAD.append(_module)

TOL = 1e-5
CAUSAL = ["gpt_oss", "gpt_bigcode", "mpt", "codegen", "mamba2", "bamba", "falcon_h1", "mamba", "zamba", "lfm3",
          "longcat_flash", "inkling_text", "gemma3n_text"]
VLMS = ["llava", "qwen2_5_vl", "mllama"]


def _check_many(rank, world, names, vlm):
    from tp_plugin.tools.verify import check_one

    return {name: check_one(name, world, vlm=vlm) for name in names}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("vlm", [False, True], ids=["causal", "vlm"])
def test_feature_architectures_match_unsplit(tp, vlm):
    names = VLMS if vlm else CAUSAL
    results = run_ranks(tp, _check_many, names, vlm, timeout_s=300)[0]
    for name in names:
        r = results[name]
        assert r.status == "match", (name, tp, r.status, r.detail)
        assert max(r.errors["logits"], r.errors["loss"], r.errors["grads"]) <= TOL, (name, tp, r.errors)
        assert r.sharded > 0.35, (name, tp, r.policy, r.sharded)  # the new layouts are split, not kept whole
        c = r.collectives
        assert c["fwd"] >= c["min_fwd"] and c["bwd"] >= c["min_bwd"], (name, c)
        # Megatron's minimum where no KV head or Mamba group is shared between ranks (GQA 2 KV heads up to tp=2)
        if name in ("mamba2", "mpt", "codegen") or (tp == 2 and name in ("llava", "mllama")):
            assert c["fwd"] == c["min_fwd"] and c["bwd"] == c["min_bwd"], (name, tp, c)  # Megatron's minimum


def test_collectives_above_the_minimum_have_their_reason():
    """gpt-oss: the routing weights' gradient is reduced once more per MoE block (and nothing else: the down bias
    added after the reduction costs no collective); Bamba: its single group's B/C gradients and norm
    statistics are summed over the ranks (forward: one norm all-reduce per mixer)."""
    results = run_ranks(2, _check_many, ["gpt_oss", "bamba"], False, timeout_s=300)[0]
    oss, bamba = results["gpt_oss"].collectives, results["bamba"].collectives
    layers = 2
    assert oss["fwd"] == oss["min_fwd"] and oss["bwd"] == oss["min_bwd"] + layers, oss
    assert oss["reasons"] == ["MoE routing weights (their gradient reduced)"], oss
    assert bamba["fwd"] == bamba["min_fwd"] + layers, bamba
    assert any("Mamba groups" in reason for reason in bamba["reasons"]), bamba


def _save_split(rank, world, name, out):
    from tp_plugin.tools.tiny_models import build_tiny

    model = build_tiny(name, tp=world)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=world)
    tp_plugin.save_pretrained(model, out)
    return {k: v.clone() for k, v in ref.state_dict().items()} if rank == 0 else None


@pytest.mark.parametrize("name", ["gpt_oss", "bamba"])
def test_save_pretrained_of_a_split_model_is_the_unsplit_checkpoint(name, tmp_path):
    """Mamba2Heads and the biased experts name their tensors per module (`in_proj.weight`, `gate_up_proj_bias`):
    the consolidated checkpoint holds every tensor whole, equal to the unsplit model's."""
    from transformers import AutoModelForCausalLM

    expected = run_ranks(2, _save_split, name, str(tmp_path))[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).state_dict()
    for key, value in expected.items():
        assert torch.equal(reloaded[key], value), key


def _lora_vlm(rank, world):
    from peft import LoraConfig, get_peft_model

    from tests.peft_parity import grad_error
    from tests.test_peft import _lora_params, _randomize_lora
    from tp_plugin.tools.tiny_vlms import build_tiny_vlm, vlm_inputs

    model = build_tiny_vlm("llava", tp=world)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=world)
    config = dict(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    torch.manual_seed(5)
    split = get_peft_model(model, LoraConfig(**config))
    torch.manual_seed(5)
    ref = get_peft_model(ref, LoraConfig(**config))
    group = model.tp_plugin_state.mesh.tp_group
    _randomize_lora(split, ref, group)  # B starts at zero: every LoRA path carries a gradient
    inputs = vlm_inputs(model)
    out, ref_out = split(**inputs), ref(**inputs)
    out.loss.backward()
    ref_out.loss.backward()
    return (out.loss - ref_out.loss).abs().item(), grad_error(split, ref, group), len(_lora_params(split))


def test_lora_on_the_language_model_of_a_split_vlm():
    for loss_err, grad_err, count in run_ranks(2, _lora_vlm):
        assert count == 3 * 2 * 2, count  # 3 targets x 2 layers x (A, B)
        assert loss_err <= TOL and grad_err <= TOL, (loss_err, grad_err)


def _codegen_8_heads(name):
    from transformers import AutoModelForCausalLM

    from tp_plugin.tools.tiny_models import _perturb, tiny_config

    config = tiny_config("codegen")
    config.n_head, config.n_embd, config.rotary_dim = 8, 128, 8  # 8 heads: 4 blocks x 2, one per rank per block
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _perturb(model)
    return model.float().eval()


def _codegen(rank, world):
    from tp_plugin.tools.verify import check_one

    return check_one("codegen", world, load=_codegen_8_heads)


def test_codegen_splits_its_head_blocks():
    """With heads in multiples of 4 x tp the attention is split (the tiny default's 4 heads keep it whole)."""
    r = run_ranks(2, _codegen)[0]
    assert r.status == "match" and r.policy == "codegen" and r.sharded > 0.99, (r.status, r.policy, r.detail)
    assert max(r.errors["logits"], r.errors["loss"], r.errors["grads"]) <= TOL, r.errors
