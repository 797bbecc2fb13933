"""Bad checkpoints fail with a clear error on every rank, before any collective; interrupted saves change nothing.

The multi-rank cases run with a short process-group timeout: a rank that raised while its peers went on into a
collective would turn the error into a hang, which `run_ranks` reports as a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tp_plugin
from tp_plugin.checkpoint import CheckpointError
from tp_plugin.checkpoint import io as ckpt_io
from tests.dist import run_ranks
from tests.models import batch, build


def _try_load(rank, world, path, tp):
    message = None
    try:
        tp_plugin.from_pretrained(path, tp_size=tp)
    except CheckpointError as exc:
        message = str(exc)
    # Every rank got here without a collective inside from_pretrained; meet once so that no rank tears the
    # process group down while a peer is still connecting.
    torch.distributed.barrier()
    return message


def _errors_on_every_rank(path, tp) -> str:
    messages = run_ranks(tp, _try_load, str(path), tp, timeout_s=30)
    assert all(messages) and len(set(messages)) == 1, messages  # every rank, the same message
    return messages[0]


@pytest.fixture()
def checkpoint(tmp_path):
    build("llama", 2).save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    msg = _errors_on_every_rank(checkpoint, 2)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "not in the checkpoint" in msg and "config" in msg


def test_wrong_shape(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 72)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    msg = _errors_on_every_rank(checkpoint, 2)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[16, 72]" in msg and "[24, 72]" in msg
    assert "model.safetensors" in msg and "config" in msg


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    msg = _errors_on_every_rank(checkpoint, 2)
    assert str(path) in msg and "truncated" in msg and "save the checkpoint again" in msg


def test_missing_shard_file_of_an_index(tmp_path):
    build("llama", 2).save_pretrained(tmp_path, max_shard_size="30KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    msg = _errors_on_every_rank(tmp_path, 2)
    assert victim.name in msg and "incomplete" in msg


def _save_sharded_tp2(rank, world, out):
    model = build("llama", 2)  # 9 heads / 3 KV heads: splits at 2 and 3, not at 4
    tp_plugin.parallelize(model, tp_size=2)
    tp_plugin.save_sharded(model, out)


def test_sharded_checkpoint_at_a_degree_the_model_cannot_split(tmp_path):
    run_ranks(2, _save_sharded_tp2, str(tmp_path))
    msg = _errors_on_every_rank(tmp_path, 4)
    assert "saved at tp=2" in msg and "not tp=4" in msg and "3 KV heads" in msg


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    first, second = build("llama", 2, seed=0), build("llama", 2, seed=1)
    tp_plugin.save_pretrained(first, out)
    (out / "tokenizer.json").write_text("{}")  # a file the user keeps next to the weights

    calls = {"n": 0}
    real_write = ckpt_io.StreamingWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption mid-write")
        real_write(self, name, tensor)

    monkeypatch.setattr(ckpt_io.StreamingWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        tp_plugin.save_pretrained(second, out, max_shard_size="30KB")
    monkeypatch.undo()
    assert calls["n"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary directory left behind"
    ids = batch()
    reloaded = tp_plugin.from_pretrained(out, attn_implementation="eager")
    assert torch.equal(reloaded(ids).logits, first(ids).logits)  # the previous checkpoint, whole

    tp_plugin.save_pretrained(second, out, max_shard_size="30KB")  # a complete save replaces it
    reloaded = tp_plugin.from_pretrained(out, attn_implementation="eager")
    assert torch.equal(reloaded(ids).logits, second(ids).logits)
    assert (out / "tokenizer.json").read_text() == "{}" and not (out / "model.safetensors").exists()


def test_save_target_is_a_file(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(CheckpointError, match="not a directory"):
        tp_plugin.save_pretrained(build("llama", 2), tmp_path / "x")
