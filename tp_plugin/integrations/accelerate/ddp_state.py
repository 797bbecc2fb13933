"""Accelerate's `save_state` / `load_state` under DDP for a split model.

Under DDP, Accelerate's `save_accelerator_state` writes the models and optimizers of process 0 only: with TP
shards, the other TP ranks' shards would be lost, and `load_accelerator_state` would load rank 0's into them.
While `Accelerator.save_state` / `load_state` run for a split model (`active`), the two functions in
`accelerate.accelerator`'s namespace take the models and optimizers out of Accelerate's hands: each TP rank's
model and optimizer state is its own DCP checkpoint over its data-parallel group, as under FSDP2
(`fsdp_state.save_model_state`, in `tp_plugin_model_<i>/tp-rank-<r>-of-<tp>` and
`tp_plugin_optimizer_<i>/tp-rank-<r>-of-<tp>`); schedulers, data loaders, RNG states, the scaler and custom objects stay
Accelerate's.
"""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar

from .. import patching
from .fsdp_state import load_model_state, load_optimizer_state, save_model_state, save_optimizer_state

_MODULE = "accelerate.accelerator"
_ACTIVE: ContextVar = ContextVar("tp_plugin_ddp_state", default=None)


@contextlib.contextmanager
def active(accelerator):
    """Within: the accelerator whose split models the wrapped functions save or load."""
    token = _ACTIVE.set(accelerator)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _split_models(accelerator) -> list:
    from ...state import split_mesh

    models, optimizers = accelerator._models, accelerator._optimizers
    unsplit = [type(m).__name__ for m in models if split_mesh(m) is None]
    if unsplit or len(optimizers) > len(models):
        raise ValueError(f"tp_plugin: Accelerator.save_state/load_state under DDP with a split model needs every "
                         f"prepared model split by tp_plugin and one optimizer per model (got unsplit {unsplit}, "
                         f"{len(models)} models, {len(optimizers)} optimizers)")
    return models


def _wrap_save(original):
    @functools.wraps(original)
    def save_accelerator_state(output_dir, model_states, optimizers, *args, **kwargs):
        accelerator = _ACTIVE.get()
        if accelerator is None:
            return original(output_dir, model_states, optimizers, *args, **kwargs)
        mesh = accelerator._tp_plugin_mesh
        models = _split_models(accelerator)
        for i, model in enumerate(models):
            save_model_state(model, output_dir, i, mesh)
        for i, optimizer in enumerate(accelerator._optimizers):
            save_optimizer_state(optimizer, models[i], output_dir, i, mesh)
        return original(output_dir, [], [], *args, **kwargs)
    return save_accelerator_state


def _wrap_load(original):
    @functools.wraps(original)
    def load_accelerator_state(input_dir, models, optimizers, *args, **kwargs):
        accelerator = _ACTIVE.get()
        if accelerator is None:
            return original(input_dir, models, optimizers, *args, **kwargs)
        mesh = accelerator._tp_plugin_mesh
        split = _split_models(accelerator)
        for i, model in enumerate(split):
            load_model_state(model, input_dir, i, mesh)
        for i, optimizer in enumerate(accelerator._optimizers):
            load_optimizer_state(optimizer, split[i], input_dir, i, mesh)
        return original(input_dir, [], [], *args, **kwargs)
    return load_accelerator_state


_WRAPPERS = {"save_accelerator_state": _wrap_save, "load_accelerator_state": _wrap_load}


def install() -> None:
    patching.wrap_in_module(_MODULE, _WRAPPERS)


def uninstall() -> None:
    patching.restore_in_module(_MODULE, _WRAPPERS)
