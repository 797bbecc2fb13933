"""Run a test function on N gloo ranks forked from a preloaded forkserver.

    def _check(rank, world, tp):            # module level, so it can be found by name in the child
        ...
        return {"max_err": ...}

    def test_it():
        results = run_ranks(4, _check, 2)   # one result per rank; raises with every rank's traceback

The forkserver imports torch and transformers once, so each rank starts in about 0.1 s. The parent owns the
rendezvous store (port chosen by the OS, no races between tests), and the process group has a timeout, so
a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import traceback

import torch.distributed as dist

PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "tp_plugin", "tests.dist"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _rank_main(rank: int, world: int, port: int, fn, args, queue, timeout_s: float) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # Pickled by value here: the queue's own pickler would share tensors through file descriptors that the
        # parent fetches from this process, which may have exited by then (connection reset).
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # report everything, including a peer's "connection reset", to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world, *args)` on `world` ranks; return the per-rank results in rank order."""
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, fn, args, queue, timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
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
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{report}")
    return [results[r] for r in range(world)]
