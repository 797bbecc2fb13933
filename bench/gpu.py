"""GPU section: per-rank compute time and memory of 8B-shaped blocks at tp=2,4,8 on one CUDA device.

UNTESTED: written on a machine without a GPU (skipped there). A fake process group stands in for the tp
ranks (this process is rank 0 of tp; collectives do nothing), so the time is the communication-free
ceiling of one rank's share; it is compared with the unsplit model's time / tp (the per-FLOP rate).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .shapes import config


def _rank0_step(tp: int, *, layers: int, batch: int, seq: int, steps: int, shape: str = "llama3-8b",
                device: str = "cuda", dtype: torch.dtype = torch.bfloat16, defer_logits: bool = True) -> dict:
    """Rank 0's training step of a split `shape` (default mode: the loss fused with the head, the logits deferred;
    `defer_logits=False`: the logits computed in every forward). On the CPU (a smoke run) peak memory is not
    measured."""
    import transformers
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tp_plugin

    cuda = device == "cuda"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config(shape, layers)).to(dtype)
        tp_plugin.parallelize(model, tp_size=tp)
        if tp > 1:
            model.get_output_embeddings().defer_logits = defer_logits
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        # to_empty left the rotary buffers uninitialised: rebuild that module on the device
        with torch.device(device):
            model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps + 2):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"tp": tp, "step_s": statistics.median(times[2:]), "loss": loss.item(),
                "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
    finally:
        dist.destroy_process_group()
        if cuda:
            torch.cuda.empty_cache()


def gpu_section(*, layers: int = 4, batch: int = 1, seq: int = 2048, steps: int = 5) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    rows = [_rank0_step(tp, layers=layers, batch=batch, seq=seq, steps=steps) for tp in (1, 2, 4, 8)]
    for row in rows:
        row["time_vs_ideal"] = row["step_s"] / (rows[0]["step_s"] / row["tp"])
        row["memory_vs_ideal"] = row["peak_gib"] / (rows[0]["peak_gib"] / row["tp"])
    return {"device": torch.cuda.get_device_name(), "shape": f"llama3-8b, {layers} layers, batch {batch}, seq {seq}, "
            "bf16, AdamW", "rows": rows}
