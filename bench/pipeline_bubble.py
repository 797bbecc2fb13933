"""The pipeline bubble at PP=2: `python -m bench.pipeline_bubble`

A Llama of 8 layers (hidden 256, vocabulary 256: the head's matmul and loss are a tenth of a layer, so stages
balanced by parameter count are balanced in work too, and the bench measures the schedule, not the split) split
into 2 stages on 2 gloo ranks (1 thread each, TP=1), 8 micro-batches,
1F1B and GPipe. The ideal step is the whole model's forward and backward over the same micro-batches on one rank
(measured in rank 0's process, alternating with the pipeline steps, 1 thread) divided over the 2 ranks, plus the schedule's bubble: (m + p - 1) / m
of the per-rank work for p stages and m micro-batches. Reported: measured / ideal (goal <= 1.25), on a grid of
sequence lengths. Medians of 11 steps after 3 warm-up steps; the two ranks share this machine's 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from tp_plugin import testing

GRID = ((8, 2, 64), (8, 2, 128), (8, 4, 128))  # (micro-batches, sequences per micro-batch, sequence length)
STEPS, WARMUP = 11, 3


def _model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).train()


def _batch(micro: int, per_micro: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 256, (micro * per_micro, seq), generator=torch.Generator().manual_seed(1))


def _unsplit_step(model, ids: torch.Tensor, micro: int) -> float:
    """The whole model's forward + backward over the micro-batches, one after the other (seconds)."""
    start = time.perf_counter()
    for chunk in ids.chunk(micro):
        (model(input_ids=chunk, labels=chunk).loss / micro).backward()
    seconds = time.perf_counter() - start
    model.zero_grad()
    return seconds


def _both(rank, world, micro, per_micro, seq, schedule):
    """Interleaved in time, so that this machine's drifting speed hits both alike: each round, rank 0 runs the
    unsplit model alone (rank 1 waits), then both ranks run one pipeline step."""
    import tp_plugin
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
    whole = _model() if rank == 0 else None
    pipe = tp_plugin.pipeline(_model(), mesh=mesh, microbatches=micro, schedule=schedule).train()
    ids, unsplit, piped = _batch(micro, per_micro, seq), [], []
    for _ in range(WARMUP + STEPS):
        if rank == 0:
            unsplit.append(_unsplit_step(whole, ids, micro))
        torch.distributed.barrier()
        start = time.perf_counter()
        pipe.step(ids, labels=ids)
        piped.append(time.perf_counter() - start)
        for p in pipe.parameters():
            p.grad = None
        torch.distributed.barrier()
    return {"unsplit": statistics.median(unsplit[WARMUP:]) if unsplit else None,
            "pipeline": statistics.median(piped[WARMUP:])}


def main() -> None:
    ctx = mp.get_context("forkserver")
    rows = []
    for micro, per_micro, seq in GRID:
        for schedule in ("1F1B", "GPipe"):
            ranks = testing.run_ranks(ctx, 2, _both, micro, per_micro, seq, schedule, timeout_s=900)
            whole, measured = ranks[0]["unsplit"], max(r["pipeline"] for r in ranks)
            ideal = whole / 2 * (micro + 2 - 1) / micro
            rows.append({"microbatches": micro, "per_microbatch": per_micro, "seq": seq, "schedule": schedule,
                         "unsplit_s": round(whole, 4), "ideal_s": round(ideal, 4), "measured_s": round(measured, 4),
                         "ratio": round(measured / ideal, 3)})
            print(f"m={micro} b={per_micro} seq={seq} {schedule:6s}: unsplit {whole:.3f} s, ideal {ideal:.3f} s, "
                  f"pipeline {measured:.3f} s -> {measured / ideal:.2f} x ideal", flush=True)
    out = Path(__file__).resolve().parent / "results" / "pipeline_bubble.json"
    out.write_text(json.dumps({"machine": "2-core CPU, gloo, 1 thread per rank", "rows": rows}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
