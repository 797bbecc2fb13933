"""Per-rank training memory of big shapes at tp=1..8, in one process, without real ranks.

A fake process group (`torch.testing._internal.distributed.fake_pg`) of world size tp makes this process
"rank 0 of tp"; the model is built on the meta device and split by `tp_plugin.parallelize` (its weight sync
is skipped for meta params, its layers slice meta tensors), so nothing is allocated and no byte is sent.

* parameters and gradients: the local shards' sizes, in the training dtype (bf16);
* optimizer: AdamW's 2 states per local parameter, kept in fp32;
* activations: measured, not modelled: the bytes autograd saves for backward (`saved_tensors_hooks`) in one
  training forward with the vocab-parallel loss on the meta device, counting each storage once and leaving
  out parameters (saved weights are not activations). On the meta device SDPA would pick its math kernel
  (which saves [s, s] probabilities no real run keeps), so attention is routed to the CPU flash kernel, whose
  backward saves q, k, v, the output and the log-sum-exp, like the flash kernels used in practice.
* sequence parallelism (rows with `sp`): the activations are measured the same way, on the split model with
  `sequence_parallel=True`; its all-gather buffers are modelled: one region's gathered input ([batch, seq,
  hidden], gathered again in backward) is alive at a time, on top of what the plain TP path has, so
  `sp_buffers` = batch x seq x hidden x the dtype's bytes is added to the total.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tp_plugin.tools.planner import saved_bytes

from .shapes import config

GiB = 2 ** 30


def rank0_memory(shape: str, tp: int, *, batch: int, seq: int, layers: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, sequence_parallel: bool = False) -> dict:
    """Bytes on TP rank 0 of `tp` ranks for one training step of `shape` (fake process group, meta device)."""
    import transformers
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tp_plugin

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config(shape, layers)).to(dtype)
        sp = sequence_parallel and tp > 1
        tp_plugin.parallelize(model, tp_size=tp, loss_parallel=tp > 1, sequence_parallel=sp)
        params = {id(p): p for p in model.parameters()}.values()
        numel = sum(p.numel() for p in params)
        out = {"shape": shape, "tp": tp, "sp": sp, "batch": batch, "seq": seq,
               "layers": model.config.num_hidden_layers,
               "params": numel * dtype.itemsize, "grads": numel * dtype.itemsize, "optimizer": numel * 2 * 4,
               "activations": saved_bytes(model, batch, seq),
               "sp_buffers": batch * seq * model.config.hidden_size * dtype.itemsize if sp else 0}
    finally:
        dist.destroy_process_group()
    out["total"] = out["params"] + out["grads"] + out["optimizer"] + out["activations"] + out["sp_buffers"]
    return out


def memory_table(shapes=("llama3-8b", "llama3-70b"), tps=(1, 2, 4, 8), *, batch: int = 1, seq: int = 4096,
                 layers: int | None = None) -> list[dict]:
    rows = []
    for shape in shapes:
        base = None
        for tp, sp in [(tp, sp) for tp in tps for sp in (False, True) if tp > 1 or not sp]:
            row = rank0_memory(shape, tp, batch=batch, seq=seq, layers=layers, sequence_parallel=sp)
            base = base or row
            row["ratio_to_ideal"] = row["total"] / (base["total"] / tp)
            row["weights_ratio_to_ideal"] = (row["params"] + row["grads"] + row["optimizer"]) / \
                ((base["params"] + base["grads"] + base["optimizer"]) / tp)
            row["activations_ratio_to_ideal"] = row["activations"] / (base["activations"] / tp)
            rows.append(row)
    return rows
