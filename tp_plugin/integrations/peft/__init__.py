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
        from .patches import install
        install()
    elif importlib.util.find_spec("peft") is not None and not any(isinstance(f, _InstallOnImport)
                                                                  for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnImport())


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when `peft` is being imported, wraps its loader to install the patches after."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; let the normal finders locate peft
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_install(module):
            exec_module(module)
            from .patches import install
            install()

        spec.loader.exec_module = exec_and_install
        return spec
