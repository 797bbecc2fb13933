"""What the CUDA path needs, shown on the CPU where the mechanism allows it (the rest is in `make gpu-check`).

A tensor that is not in host memory cannot be turned into bytes with `.numpy()`: `_NotOnCPU` behaves like a CUDA
tensor there (its `.numpy()` raises as CUDA's does, `.cpu()` gives the host copy), so a save whose gathered tensors
live on the accelerator is exercised without one. The same stand-in plays "on the device NCCL takes": under
`_nccl_like`, the library's way onto the collective device (`tp_plugin.runtime.devices.to_collective` /
`empty_for_collective`) hands out `_NotOnCPU` tensors, and send / recv refuse any other tensor, as NCCL refuses
CPU tensors. The device rules themselves (`bind_current_device`, one GPU per rank, the mesh's device type) run
for real with torch.cuda's answers replaced.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build
from tp_plugin.runtime import devices
from tp_plugin.sharding import TPSplitError


class _NotOnCPU(torch.Tensor):
    """Stands in for a CUDA tensor: no `.numpy()` until copied to the host with `.cpu()`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def _save_with_device_tensors(rank, world, out):
    from transformers import AutoModelForCausalLM

    import tp_plugin.checkpoint.save as save

    original = save.gather_full
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2).eval()
    save.gather_full = lambda *args: None if (full := original(*args)) is None else full.as_subclass(_NotOnCPU)
    try:
        tp_plugin.save_pretrained(model, out)
    finally:
        save.gather_full = original
    ids = batch(seed=2)
    with torch.no_grad():
        split = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    return (split - plain).abs().max().item()


def test_save_of_tensors_gathered_on_the_accelerator(tmp_path):
    """The consolidated save copies each gathered tensor to the host before writing it (on CUDA it would raise
    in `.numpy()` on rank 0 and leave the others waiting); the reloaded model gives the split model's logits."""
    for err in run_ranks(2, _save_with_device_tensors, str(tmp_path / "out")):
        assert err <= 1e-5, err


@contextlib.contextmanager
def _nccl_like(*names: str):
    """Point-to-point ops (`names` of torch.distributed) take only tensors that came through the collective
    device, as NCCL takes only CUDA tensors; the library's way there hands out `_NotOnCPU` tensors."""
    saved = {n: getattr(dist, n) for n in names}
    saved_devices = devices.to_collective, devices.empty_for_collective

    def strict(name, original):
        def call(tensor, *args, **kwargs):
            if not isinstance(tensor, _NotOnCPU):
                raise RuntimeError(f"{name}: a tensor on {tensor.device} reached an NCCL-like collective "
                                   f"(NCCL takes CUDA tensors only)")
            return original(tensor.as_subclass(torch.Tensor), *args, **kwargs)
        return call

    try:
        for name, original in saved.items():
            setattr(dist, name, strict(name, original))
        devices.to_collective = lambda t, group=None: t.as_subclass(_NotOnCPU)
        devices.empty_for_collective = lambda shape, dtype, group=None: torch.empty(shape, dtype=dtype).as_subclass(
            _NotOnCPU)
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
        devices.to_collective, devices.empty_for_collective = saved_devices


def _pipeline_save_nccl_like(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    pipe = tp_plugin.pipeline(build("llama", 2, layers=4), mesh=mesh, microbatches=2)
    with _nccl_like("send", "recv"):
        tp_plugin.save_pretrained(pipe, out)
    return rank


def test_pipeline_save_sends_and_receives_on_the_collective_device(tmp_path):
    """A pipeline save moves each tensor to the collective device before `send` (and receives into a buffer
    there): NCCL refuses the CPU tensors it used to send. The checkpoint is the unsplit model's (logits 1e-5)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_ranks(4, _pipeline_save_nccl_like, str(out), timeout_s=200)
    ids = batch(seed=3)
    with torch.no_grad():
        want = build("llama", 2, layers=4)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert (want - got).abs().max().item() <= 1e-5


class _FakeCuda:
    """torch.cuda's answers for a machine with `count` GPUs, current device `current` (set_device recorded)."""

    def __init__(self, monkeypatch, *, count=8, current=0, model_on=None):
        self.current, self.calls = current, []
        monkeypatch.setattr(devices, "uses_nccl", lambda group=None: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        if model_on is not None:
            monkeypatch.setattr(devices, "model_device", lambda model: torch.device("cuda", model_on))

    def set_device(self, index):
        self.calls.append(index)
        self.current = index


def _bind_rules(rank, world):
    """The rules of `bind_current_device` in a process with a (gloo) process group; torch.cuda faked."""
    results = {}
    for case, kwargs, local in [("model on cuda:1, current cuda:0", dict(model_on=1), None),
                                ("model on cuda:1, current cuda:2", dict(model_on=1, current=2), None),
                                ("model on the CPU, LOCAL_RANK=3", {}, "3"),
                                ("model on the CPU, LOCAL_RANK=3, one visible GPU", dict(count=1), "3"),
                                ("model on cuda:0, current cuda:0", dict(model_on=0), None)]:
        with pytest.MonkeyPatch.context() as mp:
            cuda = _FakeCuda(mp, **kwargs)
            if local is not None:
                mp.setenv("LOCAL_RANK", local)
            try:
                devices.bind_current_device(torch.nn.Linear(2, 2), "a test")
                results[case] = cuda.calls
            except TPSplitError as exc:
                results[case] = str(exc)
    return results


def test_bind_current_device_makes_the_model_device_current_or_refuses():
    """Under NCCL the current CUDA device becomes the model's (or the launcher's LOCAL_RANK for a model on the
    CPU) while it is still torch's default cuda:0; a current device chosen otherwise is an error naming both."""
    results = run_ranks(1, _bind_rules)[0]
    assert results["model on cuda:1, current cuda:0"] == [1]
    refusal = results["model on cuda:1, current cuda:2"]
    assert isinstance(refusal, str) and "cuda:2" in refusal and "cuda:1" in refusal and "set_device(1)" in refusal
    assert results["model on the CPU, LOCAL_RANK=3"] == [3]
    assert results["model on the CPU, LOCAL_RANK=3, one visible GPU"] == []  # CUDA_VISIBLE_DEVICES chose already
    assert results["model on cuda:0, current cuda:0"] == []


def _shared_gpu(rank, world, devices_of_ranks):
    from tp_plugin.checks import check_one_gpu_per_rank

    with pytest.MonkeyPatch.context() as mp:
        _FakeCuda(mp, current=devices_of_ranks[rank])
        try:
            check_one_gpu_per_rank("a test")
            return None
        except TPSplitError as exc:
            return str(exc)


def test_two_ranks_on_one_gpu_fail_alike_before_any_collective():
    """Ranks of one host on the same current device (every rank left on cuda:0): the same error on every rank,
    from an exchange through the store (NCCL itself would fail only inside the first collective)."""
    same = run_ranks(2, _shared_gpu, [0, 0])
    assert same[0] == same[1] and "ranks [0, 1] all use cuda:0" in same[0], same
    assert run_ranks(2, _shared_gpu, [0, 1]) == [None, None]


def test_the_mesh_is_on_the_gpu_under_nccl_whatever_device_the_model_is_on(monkeypatch):
    """A model split on the CPU (or built on meta) and moved to its GPU later: under NCCL its mesh is "cuda",
    so FSDP2 keeps the shards on the GPU and its collectives run there; under gloo, the model's device."""
    model = torch.nn.Linear(2, 2)
    assert devices.mesh_device_type(model) == "cpu"
    monkeypatch.setattr(devices, "uses_nccl", lambda group=None: True)
    assert devices.mesh_device_type(model) == "cuda"
    assert devices.mesh_device_type(model.to("meta")) == "cuda"


def _wiring(rank, world, out):
    seen = []
    original = devices.bind_current_device
    devices.bind_current_device = lambda model, where: (seen.append(where), original(model, where))[1]
    try:
        model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
        ids = batch(seed=1)
        model.train()
        model(ids, labels=ids).loss.backward()
        model.eval()
        with torch.no_grad():
            model(ids)
            model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
        tp_plugin.save_pretrained(model, out)
    finally:
        devices.bind_current_device = original
    return seen


def test_every_entry_with_collectives_binds_the_current_device_first(tmp_path):
    """The split, the first training forward, the first evaluation forward, generate and the save each make the
    current device the model's before their collectives (the model may have moved since the split)."""
    for seen in run_ranks(2, _wiring, str(tmp_path / "out")):
        assert seen == ["parallelize", "the first training forward", "an evaluation forward", "generate()",
                        "save_pretrained"], seen


def _gathers(rank, world, sequence_parallel):
    from tp_plugin.testing.collectives import CollectiveCounter

    model = tp_plugin.parallelize(build("llama", 2), tp_size=2, sequence_parallel=sequence_parallel).train()
    ids = batch(seed=1)
    with CollectiveCounter() as counter:
        model(ids, labels=ids).loss.backward()
    return dict(counter.calls)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_all_gathers_go_into_one_buffer(sequence_parallel):
    """The forward and backward all-gathers (the LM head's logits, sequence parallelism's tokens) gather into one
    tensor: the list form costs two extra full copies per gather under NCCL (its own flat buffer copied out to the
    list, then the concatenation)."""
    for calls in run_ranks(2, _gathers, sequence_parallel):
        gathers = {k: v for k, v in calls.items() if k.startswith("all_gather") and k != "all_gather_object"}
        assert gathers and "all_gather" not in gathers, calls


def _weight_sync(rank, world, bucket):
    from tp_plugin.runtime import comm
    from tp_plugin.testing.collectives import CollectiveCounter

    comm.BROADCAST_BUCKET_BYTES = bucket
    torch.manual_seed(rank)  # different weights on each rank: the split broadcasts TP rank 0's
    model = build("llama", 2, seed=rank)
    sizes = []
    original = dist.broadcast
    dist.broadcast = lambda t, *a, **k: (sizes.append(t.numel() * t.element_size()), original(t, *a, **k))[1]
    try:
        with CollectiveCounter():
            tp_plugin.parallelize(model, tp_size=2)
    finally:
        dist.broadcast = original
    total = sum(p.numel() * p.element_size() for p in build("llama", 2).parameters())
    ids = batch(seed=1)
    with torch.no_grad():
        logits = model(ids).logits
    return {"sizes": sizes, "total": total, "logits": logits}


def test_weight_sync_broadcasts_in_bounded_buckets():
    """Ranks initialised differently get TP rank 0's weights in broadcasts of at most one bucket (or one large
    tensor, in place), never a flat copy of the whole model per dtype on each GPU; the result is rank 0's
    model: both ranks' logits equal the unsplit seed-0 model's (1e-5)."""
    bucket = 16 << 10
    results = run_ranks(2, _weight_sync, bucket)
    ids = batch(seed=1)
    with torch.no_grad():
        want = build("llama", 2, seed=0)(ids).logits
    largest = max(p.numel() * p.element_size() for p in build("llama", 2).parameters())
    for r in results:
        assert len(r["sizes"]) > 1 and max(r["sizes"]) <= max(bucket, largest) < r["total"], r["sizes"]
        assert (r["logits"] - want).abs().max().item() <= 1e-5
