"""Bad input: a clear error on every rank, before any collective runs (so never a hang)."""

from __future__ import annotations

import pytest
import torch
import transformers

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import build


def _expect_error(model_fn, tp_size):
    """Run parallelize on this rank; return the error message and how many collectives ran before it."""
    model = model_fn()
    with CollectiveCounter() as counter:
        try:
            tp_plugin.parallelize(model, tp_size=tp_size)
        except tp_plugin.TPSplitError as exc:
            return str(exc), sum(counter.counts.values())
    return None, sum(counter.counts.values())


def _heads_do_not_split():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=36, intermediate_size=40, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=3, head_dim=6))  # 3 KV heads cannot be spread or replicated over 4 ranks


def _bad_heads(rank, world):
    return _expect_error(_heads_do_not_split, 4)


def _bad_world(rank, world):
    return _expect_error(lambda: build("llama", 2), 3)


def _twice(rank, world):
    """Split again another way (here: with loss_parallel) is refused; the same split again is a no-op (what a
    script that calls parallelize does under `tp-plugin launch`, which split the model at from_pretrained)."""
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    assert tp_plugin.parallelize(model, tp_size=2) is model and tp_plugin.parallelize(model) is model
    with CollectiveCounter() as counter:
        try:
            tp_plugin.parallelize(model, tp_size=2, loss_parallel=True)
        except tp_plugin.TPSplitError as exc:
            return str(exc), sum(counter.counts.values())
    return None, sum(counter.counts.values())


def _deepspeed_split(rank, world):
    import deepspeed
    from deepspeed.module_inject.layers import LinearLayer

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group
    model = build("llama", 2)
    attn = model.model.layers[0].self_attn
    attn.q_proj = LinearLayer(attn.q_proj, mp_group=torch.distributed.group.WORLD)  # DeepSpeed AutoTP's layer
    return _expect_error(lambda: model, 2)


def _transformers_split(rank, world, path):
    # transformers' own tensor parallelism shards with DTensor at load time
    model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    return _expect_error(lambda: model, 2)


CASES = {
    "heads": (4, _bad_heads, "cannot be split over 4 ranks"),
    "world": (4, _bad_world, "does not divide the world size 4"),
    "twice": (2, _twice, "already split by tp_plugin"),
    "deepspeed": (2, _deepspeed_split, "DeepSpeed AutoTP"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_on_every_rank_before_any_collective(case):
    world, fn, words = CASES[case]
    for message, collectives in run_ranks(world, fn):
        assert message is not None and words in message, message
        assert collectives == 0


def test_transformers_tp_plan_model_is_refused(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    for message, collectives in run_ranks(2, _transformers_split, str(tmp_path)):
        assert message is not None and "DTensor" in message, message
        assert collectives == 0


def test_unknown_architecture_names_how_to_register():
    class Opaque(transformers.PreTrainedModel):  # no blocks, no embeddings: nothing a policy could split
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.conv = torch.nn.Conv2d(1, 1, 1)

    config = transformers.PretrainedConfig()
    config.model_type = "opaque-net"
    with pytest.raises(tp_plugin.TPSplitError, match="register_policy"):
        tp_plugin.parallelize(Opaque(config), tp_size=1)


def test_tp_without_process_group_says_how_to_launch():
    with pytest.raises(tp_plugin.TPSplitError, match="torchrun --nproc_per_node 2"):
        tp_plugin.parallelize(build("llama", 2), tp_size=2)


def test_single_process_tp1_is_a_validated_no_op():
    model = build("llama", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert tp_plugin.parallelize(model, tp_size=1) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "tp_size=1" in tp_plugin.inspect(model)
    with pytest.raises(tp_plugin.TPSplitError, match="6 query heads / 3 KV heads cannot be split over 4 ranks"):
        from tp_plugin.plan import resolve_plan
        from tp_plugin.policy import get_policy
        resolve_plan(_heads_do_not_split(), get_policy("llama"), 4)
