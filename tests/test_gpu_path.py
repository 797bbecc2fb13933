"""What the CUDA path needs, shown on the CPU where the mechanism allows it (the rest is in `make gpu-check`).

A tensor that is not in host memory cannot be turned into bytes with `.numpy()`: `_NotOnCPU` behaves like a CUDA
tensor there (its `.numpy()` raises as CUDA's does, `.cpu()` gives the host copy), so a save whose gathered tensors
live on the accelerator is exercised without one.
"""

from __future__ import annotations

import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build


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
