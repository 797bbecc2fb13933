"""Does an asynchronous all-reduce overlap with a matmul here? `python -m bench.overlap_micro`

2 gloo ranks, 1 thread each: the all-reduce of a region's input gradient ([tokens, hidden] fp32) next to the
weight-gradient matmul of a column layer (`grad^T @ x`), one after the other vs. the all-reduce started
asynchronously and waited for after the matmul (what `tp_plugin/runtime/overlap.py` does). Two alternating rounds each.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = ((256, 576, 576), (256, 1024, 2048), (1024, 576, 1536))  # (tokens, hidden, layer outputs)


def _rank(rank: int, tokens: int, hidden: int, out: int, iters: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grad, x, input_grad = torch.randn(tokens, out), torch.randn(tokens, hidden), torch.randn(tokens, hidden)

    def pair(overlapped: bool) -> None:
        if overlapped:
            work = dist.all_reduce(input_grad, async_op=True)
            grad.t() @ x
            work.wait()
        else:
            dist.all_reduce(input_grad)
            grad.t() @ x

    result = {False: [], True: []}
    for overlapped in (False, True, False, True):
        for _ in range(5):
            pair(overlapped)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            pair(overlapped)
        result[overlapped].append((time.perf_counter() - t0) / iters)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main() -> None:
    ctx = mp.get_context("spawn")
    print("| tokens × hidden (all-reduce MiB) | layer outputs | one after the other (ms) | overlapped (ms) | saved |")
    print("|---|---:|---:|---:|---:|")
    for i, (tokens, hidden, out) in enumerate(SHAPES):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, tokens, hidden, out, 30, 29600 + i, queue)) for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get(timeout=300)
        for p in procs:
            p.join()
        plain, over = min(result[False]), min(result[True])
        print(f"| {tokens} × {hidden} ({tokens * hidden * 4 / 2 ** 20:.1f}) | {out} | {1e3 * plain:.2f} | "
              f"{1e3 * over:.2f} | {100 * (1 - over / plain):.0f}% |")


if __name__ == "__main__":
    main()
