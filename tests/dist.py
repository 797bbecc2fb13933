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

import multiprocessing as mp

from tp_plugin import testing

PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "tp_plugin", "tp_plugin.testing", "tests.dist"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world, *args)` on `world` ranks; return the per-rank results in rank order."""
    return testing.run_ranks(_context(), world, fn, *args, timeout_s=timeout_s)
