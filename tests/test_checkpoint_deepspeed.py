"""Saving from a DeepSpeed engine (tp=2 x dp=2): ZeRO-3 partitions each TP shard over the data-parallel group
(gathered with GatheredParameters first), ZeRO-1 leaves module parameters whole. Both checkpoints must load in
plain transformers as the unsplit model, bit for bit (no optimizer step is taken, so the weights are the initial
ones; fp32 throughout, same kernels: exact equality).
"""

from __future__ import annotations


import pytest
import torch
import transformers

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build


def _engine_save(rank, world, stage, out_hf, out_sharded):
    import deepspeed

    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "tensor_parallel": {"autotp_size": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    partitioned = any(hasattr(p, "ds_id") for p in engine.module.parameters())
    tp_plugin.save_pretrained(engine, out_hf)
    tp_plugin.save_sharded(engine, out_sharded)
    engine.destroy()
    return partitioned


@pytest.mark.parametrize("stage", [1, 3])
def test_save_from_deepspeed_engine(tmp_path, stage):
    partitioned = run_ranks(4, _engine_save, stage, str(tmp_path / "hf"), str(tmp_path / "sharded"), timeout_s=240)
    assert all(partitioned) == (stage == 3)  # the ZeRO-3 case really exercises the gather
    ids, ref = batch(), build("llama", 2)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert torch.equal(plain(ids).logits, ref(ids).logits)
    resharded = tp_plugin.from_pretrained(tmp_path / "sharded", tp_size=1, attn_implementation="eager")
    assert torch.equal(resharded(ids).logits, ref(ids).logits)
