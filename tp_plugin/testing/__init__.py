"""The multi-rank harness shared by the test suite (`tests/dist.py`) and `tp-plugin verify`: N gloo ranks on
127.0.0.1, forked, one thread each, a rendezvous store owned by the parent (port chosen by the OS, so runs do
not race), and timeouts everywhere, so a bug fails instead of hanging.

May import: anything of the package (it drives split models); only tests and `tools/` import it.
"""

from .ranks import init_rank, reap, run_ranks, spawn

__all__ = ["init_rank", "spawn", "reap", "run_ranks"]
