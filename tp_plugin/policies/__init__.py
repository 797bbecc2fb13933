"""Built-in policies, one small module per model family; importing this package registers them."""

from . import gpt2, llama  # noqa: F401
