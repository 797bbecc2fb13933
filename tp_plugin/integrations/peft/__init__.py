"""LoRA, DoRA, IA3 and trainable tokens on split models with ordinary PEFT code.

    model = tp_plugin.parallelize(model, tp_size=2)
    model = peft.get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))   # or "all-linear"
    ...train...
    model.save_pretrained(out)       # on every rank; rank 0 writes the ordinary, unsplit adapter
    PeftModel.from_pretrained(split_model, out)   # each rank loads its slices

Nothing to call: `tp_plugin.parallelize` activates the integrations, which patch PEFT as soon as it is imported
(now, if it already is; otherwise from an import hook, so scripts that never use PEFT never pay for importing it).

    checks.py            what may be adapted on a split model (refusals name the module and the fix)
    layers.py            LoRA on the column- / row-parallel linears
    dora.py              DoRA on them (use_dora=True)
    embedding.py         LoRA on the vocabulary-parallel embedding
    trainable_tokens.py  trainable_token_indices on the vocabulary-parallel embedding / tied LM head
    ia3.py               IA3 on the parallel linears
    patches.py           what is patched in PEFT and why
"""

from __future__ import annotations

__all__ = ["install", "uninstall"]


def install() -> None:
    """Make PEFT split-model aware (run once peft is imported; see `tp_plugin.integrations.activate`)."""
    from .patches import install as install_patches

    install_patches()


def uninstall() -> None:
    import sys

    patches = sys.modules.get(__name__ + ".patches")
    if patches is not None:
        patches.uninstall()
