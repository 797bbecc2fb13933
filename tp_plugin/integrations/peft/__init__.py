"""LoRA on split models with ordinary PEFT code.

    model = tp_plugin.parallelize(model, tp_size=2)
    model = peft.get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))   # or "all-linear"
    ...train...
    model.save_pretrained(out)       # on every rank; rank 0 writes the ordinary, unsplit adapter
    PeftModel.from_pretrained(split_model, out)   # each rank loads its slices

Nothing to call: `tp_plugin.parallelize` calls `enable()`, which patches PEFT as soon as it is imported (now,
if it already is; otherwise from an import hook, so scripts that never use PEFT never pay for importing it).
See `layers.py` for the TP LoRA rules and `patches.py` for what is patched and why.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["enable"]


def enable() -> None:
    """Make PEFT split-model aware, now or when `peft` is first imported."""
    if "peft" in sys.modules:
        _install()
    elif importlib.util.find_spec("peft") is not None and not any(
            isinstance(f, RunAfterImport) and f.name == "peft" for f in sys.meta_path):
        sys.meta_path.insert(0, RunAfterImport("peft", _install))


def _install() -> None:
    from .patches import install

    install()


class RunAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when module `name` is being imported, runs `callback` right after it executes."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; let the normal finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_callback
        return spec
