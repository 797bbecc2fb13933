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

from .. import when_imported

__all__ = ["enable"]


def enable() -> None:
    """Make PEFT split-model aware, now or when `peft` is first imported."""
    when_imported("peft", _install)


def _install() -> None:
    from .patches import install

    install()
