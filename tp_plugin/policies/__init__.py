"""Built-in policies, one small module per model family; importing this package registers them."""

from . import bert, gpt2, llama, moe, opt_bloom, parallel_blocks, phi  # noqa: F401
