"""Start N ranks from a multiprocessing context, set each one up, collect results, never hang."""

from __future__ import annotations

import datetime
import os
import pickle
import traceback

import torch
import torch.distributed as dist


def init_rank(rank: int, world: int, port: int, timeout_s: float) -> None:
    """In a child: the torchrun-like environment, one thread, and a gloo process group over the parent's store."""
    os.environ.update(HF_HUB_OFFLINE="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def spawn(ctx, world: int, target, args: tuple, timeout_s: float):
    """Start `target(rank, world, port, queue, timeout_s, *args)` on `world` processes of `ctx`.
    Returns (store, queue, processes); the store must stay alive while the ranks run."""
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, store.port, queue, timeout_s, *args)) for r in range(world)]
    for p in procs:
        p.start()
    return store, queue, procs


def reap(procs, timeout_s: float = 10.0) -> None:
    """Join every rank; kill the ones that do not exit."""
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()
            p.join()


def _call(rank, world, port, queue, timeout_s, fn, args) -> None:
    try:
        init_rank(rank, world, port, timeout_s)
        # Pickled by value here: the queue's own pickler would share tensors through file descriptors that the
        # parent fetches from this process, which may have exited by then (connection reset).
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # report everything, including a peer's "connection reset", to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(ctx, world: int, fn, *args, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world, *args)` on `world` ranks of `ctx`; return the per-rank results in rank order, or
    raise with every rank's traceback (the first one is often only a peer's "connection reset")."""
    store, queue, procs = spawn(ctx, world, _call, (fn, args), timeout_s)
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout_s + 30)
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors[rank] = value
    except Exception as exc:  # a rank died without reporting (segfault, OOM kill) or hung past the timeout
        errors[-1] = f"not every rank reported: {exc!r}; got ranks {sorted(results) + sorted(errors)}"
    finally:
        reap(procs)
        del store
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{report}")
    return [results[r] for r in range(world)]
