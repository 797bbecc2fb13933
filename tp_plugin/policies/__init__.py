"""Built-in policies, one small module per model family; importing this package registers them.

May import: `tp_plugin.policy`, `styles/` and `sharding` only (plan time; tests/test_layering.py).
"""

from . import bert, gpt2, llama, moe, opt_bloom, parallel_blocks, phi  # noqa: F401
