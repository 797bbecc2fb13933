"""Checkpoint round trips: split -> save -> plain transformers; HF checkpoint -> tp_plugin.from_pretrained; per-rank
save -> load at other degrees (4 -> 2 -> 1).

Tolerances. A checkpoint loaded by *plain transformers* in one process holds bit-identical fp32 weights and runs
the same kernels as the unsplit reference, so its logits must be exactly equal (any mis-placed row shows up).
A model loaded *split* differs from the unsplit one only by the order of floating-point sums (row-parallel
all-reduce), as in tests/test_parity.py: 1e-5 absolute + 1e-5 relative, far below the ~0.1 a wrong slice gives.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import transformers

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, max_errors

ATOL = RTOL = 1e-5


def _plain_load(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def _split_and_save(rank, world, arch, tp, tied, out, max_shard_size):
    model = build(arch, tp, tied=tied)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp)
    tp_plugin.save_pretrained(model, out, max_shard_size=max_shard_size)
    if rank != 0:
        return None
    ids = batch()
    loaded = _plain_load(out)
    return {"err": (loaded(ids).logits - ref(ids).logits).abs().max().item(),
            "tied": loaded.lm_head.weight is loaded.model.embed_tokens.weight if arch != "gpt2" else
            loaded.lm_head.weight is loaded.transformer.wte.weight}


@pytest.mark.parametrize("arch,tp,world,tied,max_shard_size", [
    ("llama", 2, 2, True, "5GB"),   # 9 heads / 3 KV heads: uneven 6+3 split; tied embeddings stored once
    ("llama", 4, 4, False, "5GB"),  # 4 heads / 2 KV heads at tp=4: each KV head replicated on 2 ranks; untied
    ("gpt2", 2, 2, True, "5GB"),    # fused, transposed Conv1D c_attn split per q/k/v part
    ("llama", 2, 4, True, "30KB"),  # tp=2 x dp=2 (only replica 0 gathers) and many files + index
])
def test_split_save_loads_in_plain_transformers(tmp_path, arch, tp, world, tied, max_shard_size):
    out = tmp_path / "ckpt"
    result = run_ranks(world, _split_and_save, arch, tp, tied, str(out), max_shard_size)[0]
    assert result["err"] == 0.0, result  # bit-identical weights, same kernels: exact
    assert result["tied"] == tied
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_size == "30KB":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    else:
        assert files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def _load_split(rank, world, path, tp, grads):
    model = tp_plugin.from_pretrained(path, tp_size=tp, attn_implementation="eager")
    ref = _plain_load(path)
    assert not model.training  # like transformers' from_pretrained
    ids = batch()
    out, ref_out = model(ids, labels=ids), ref(ids, labels=ids)
    result = {"logits": (out.logits - ref_out.logits).abs().max().item(), "scale": ref_out.logits.abs().max().item(),
              "loss": (out.loss - ref_out.loss).abs().item(), "local_numel": sum(p.numel() for p in model.parameters()),
              "full_numel": sum(p.numel() for p in ref.parameters())}
    if grads:
        out.loss.backward()
        ref_out.loss.backward()
        result["grads"] = max(max_errors(model, ref, model.tp_plugin_state.mesh.tp_group).values())
        # the split's options, as for parallelize
        state = tp_plugin.tp_state(tp_plugin.from_pretrained(path, tp_size=tp, loss_parallel=True,
                                                             sequence_parallel=True, overlap_comm=False))
        result["options"] = (state.loss_parallel, state.sequence is not None, state.overlap_comm)
    return result


@pytest.mark.parametrize("arch,tp,tied,max_shard_size,grads", [
    ("llama", 2, True, "5GB", True),
    ("llama", 4, False, "5GB", False),   # replicated KV heads: two ranks read the same rows
    ("gpt2", 2, True, "5GB", False),     # each rank reads its q, its k, its v out of c_attn
    ("gemma", 2, True, "30KB", False),   # multi-file; non-persistent buffers (embed_scale, rotary) recomputed
    ("qwen3", 4, True, "5GB", False),    # replicated q/k norms read whole on every rank
])
def test_from_pretrained_matches_unsplit(tmp_path, arch, tp, tied, max_shard_size, grads):
    build(arch, tp, tied=tied).save_pretrained(tmp_path, max_shard_size=max_shard_size)  # plain transformers
    for r in run_ranks(tp, _load_split, str(tmp_path), tp, grads):
        assert r["logits"] <= ATOL + RTOL * r["scale"], r
        assert r["loss"] <= ATOL, r
        if grads:
            assert r["grads"] <= 2 * ATOL, r
            assert r["options"] == (True, True, False), r
        assert r["local_numel"] < 0.75 * r["full_numel"]  # each rank holds its shards, not the model


def _sharded_save(rank, world, arch, tp, out):
    model = build(arch, 4)  # head counts that split at 4, 2 and 1
    tp_plugin.parallelize(model, tp_size=tp)
    tp_plugin.save_sharded(model, out)


def _load_sharded(rank, world, arch, path, tp):
    model = tp_plugin.from_pretrained(path, tp_size=tp, attn_implementation="eager")
    ref = build(arch, 4)
    ids = batch()
    return (model(ids).logits - ref(ids).logits).abs().max().item(), ref(ids).logits.abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sharded_checkpoint_reshards_4_to_2_to_1(tmp_path, arch):
    ckpt = tmp_path / "sharded"
    run_ranks(4, _sharded_save, arch, 4, str(ckpt))
    meta = json.loads((ckpt / "tp_shards.json").read_text())
    assert meta["tp_size"] == 4 and len(list(ckpt.glob("tp-rank-*.safetensors"))) == 4
    for err, scale in run_ranks(4, _load_sharded, arch, str(ckpt), 4) + run_ranks(2, _load_sharded, arch, str(ckpt), 2):
        assert err <= ATOL + RTOL * scale
    plain = tp_plugin.from_pretrained(ckpt, tp_size=1, attn_implementation="eager")  # tp=1: an ordinary model
    assert type(plain) is type(build(arch, 4)) and not hasattr(plain, "tp_plugin_state")
    ids = batch()
    assert torch.equal(plain(ids).logits, build(arch, 4)(ids).logits)  # stitched back bit-identical


def test_sharded_save_at_tp2_dp2_writes_one_replica(tmp_path):
    ckpt = tmp_path / "sharded"
    run_ranks(4, _sharded_save, "llama", 2, str(ckpt))
    assert sorted(p.name for p in ckpt.glob("tp-rank-*")) == [f"tp-rank-0000{r}-of-00002.safetensors" for r in (0, 1)]
    ids = batch()
    plain = tp_plugin.from_pretrained(ckpt, attn_implementation="eager")
    assert torch.equal(plain(ids).logits, build("llama", 4)(ids).logits)


def test_offline_hf_cache(tmp_path):
    """A hub id resolves through the local HF cache layout (models--org--name/snapshots/<rev>), never the network."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    build("llama", 2).save_pretrained(snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(commit)
    model = tp_plugin.from_pretrained("tiny-org/tiny-llama", cache_dir=cache, attn_implementation="eager")
    ids = batch()
    assert torch.equal(model(ids).logits, build("llama", 2)(ids).logits)
    with pytest.raises(tp_plugin.checkpoint.CheckpointError, match="neither a local directory nor"):
        tp_plugin.from_pretrained("tiny-org/not-cached", cache_dir=cache)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_bin(rank, world, path):
    records = _Records()
    logging.getLogger("tp_plugin").addHandler(records)
    model = tp_plugin.from_pretrained(path, tp_size=2, attn_implementation="eager")
    ids = batch()
    ref = build("llama", 2)
    return (model(ids).logits - ref(ids).logits).abs().max().item(), records.messages


def test_bin_checkpoint_falls_back_to_load_then_split(tmp_path):
    model = build("llama", 2)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (err0, logs0), (err1, logs1) = run_ranks(2, _load_bin, str(tmp_path))
    assert max(err0, err1) <= ATOL * 10  # logits of order 1: sum-order noise only
    assert any("falling back to load-then-split" in m for m in logs0) and not logs1  # said once, by rank 0
    with pytest.raises(tp_plugin.checkpoint.CheckpointError, match="weights_only=True"):
        tp_plugin.from_pretrained(tmp_path, weights_only=False)


def test_dtype_follows_checkpoint_like_transformers(tmp_path):
    build("llama", 2).to(torch.bfloat16).save_pretrained(tmp_path)
    assert tp_plugin.from_pretrained(tmp_path).dtype == transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path).dtype == torch.bfloat16
    assert tp_plugin.from_pretrained(tmp_path, torch_dtype=torch.float32).dtype == torch.float32
