"""The HF Trainer on a split model: `TPTrainer` (or `TPTrainerMixin` in front of your own Trainer subclass).

    model = tp_plugin.parallelize(AutoModelForCausalLM.from_pretrained(path))   # degree from the launch config
    trainer = tp_plugin.TPTrainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model(out)                           # an ordinary HF checkpoint

Why a subclass: the Trainer learns the TP degree from `model._tp_size`, and that attribute also sends the model
down transformers' own TP code (which then fails, and refuses to resume a model it did not shard). The hooks,
each a method that defers to `Trainer` when the model is not split by tp_plugin (TP = 1):

* `get_tp_size` -> the mesh's TP degree: the Trainer's batch accounting (total batch = micro x accumulation x
  DP), its token-count normalisation of the loss and its loss scaling then use the DP size.
* data: the Trainer's accelerator shards its loaders over the DP group (tp_plugin's Accelerate hooks, with the
  mesh registered at `__init__`, before any loader is built); the first training forward checks, once, that
  the TP ranks got the same batch. DDP runs over the DP group (same hooks).
* evaluation and prediction: the loops gather through `accelerator.gather_for_metrics`, which on a split model
  gathers over the DP group (`accelerate_data`): `compute_metrics`, predictions and the eval loss see each
  sample once, the last batch's padding dropped.
* `max_grad_norm` clipping goes through `accelerator.clip_grad_norm_`, which tp_plugin makes use the unsplit
  model's norm; under DeepSpeed the engine clips (tp_plugin's DeepSpeed integration).
* `save_model` / checkpoints: every rank joins `tp_plugin.save_pretrained`, which writes ordinary consolidated HF
  weights; checkpoints add the optimizer state of each TP rank (`optimizer.tp-rank-R-of-T.pt`, written by DP
  replica 0: replicas hold equal states under DDP), the scheduler, and the Trainer's per-rank RNG states.
  Under DeepSpeed the engine's own checkpoint (per rank) is saved next to the weights, as the Trainer does.
* resume: `_load_from_checkpoint` reads each rank's slices of the consolidated weights in place, and the
  optimizer state of this TP rank, so a resumed run continues the uninterrupted one's losses.
* TRL (`class MyTrainer(TPTrainerMixin, SFTTrainer)`, likewise DPO, GRPO): TRL counts tokens and metrics with
  `gather_for_metrics` (one copy per replica, so its `_tp_size` stays 1); GRPO and RLOO gather rewards and counts
  over every process with `gather`, so around their generation, scoring and loss the accelerator counts
  data-parallel replicas instead (`trl.replica_view`).
  Their fused LM head is made vocab-parallel by the TRL integration (`tp_plugin/integrations/trl.py`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

from ..state import split_mesh
from .accelerate import install, register


def prepare_cpu_deepspeed() -> dict:
    """CPU only: `TrainingArguments(deepspeed=..., **prepare_cpu_deepspeed())` on a machine without GPU.

    transformers gives Accelerate no backend when DeepSpeed is on (`TrainingArguments._setup_devices`), and
    without a GPU Accelerate then counts one process. This initialises the shared `PartialState` with gloo and
    returns the TrainingArguments keyword that makes the Trainer use it; on a GPU machine it returns {}.
    """
    from accelerate import PartialState

    from .accelerate import _has_gpu

    if _has_gpu() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def optimizer_file(tp_rank: int, tp_size: int) -> str:
    return f"optimizer.tp-rank-{tp_rank}-of-{tp_size}.pt"


def load_consolidated(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Copy this rank's slices of an ordinary HF checkpoint into a split model, in place (the optimizer keeps
    its references to the parameters). Every tensor of the model must be in the checkpoint."""
    from ..checkpoint.build import key_in
    from ..checkpoint.io import CheckpointError
    from ..loading import open_source

    source = open_source(Path(directory))
    if source is None:
        raise CheckpointError(f"{directory} holds no safetensors checkpoint (model.safetensors or its index)")
    names, prefix = set(source.names()), getattr(model, "base_model_prefix", "")
    persistent = [(f"{m}.{a}" if m else a, b) for m, mod in model.named_modules() for a, b in mod._buffers.items()
                  if b is not None and a not in mod._non_persistent_buffers_set]
    try:
        for name, tensor in list(model.named_parameters()) + persistent:
            key = key_in(names, [name], prefix)
            if key is None:
                raise CheckpointError(f"{directory}: {name} is not in the checkpoint; resume from a checkpoint "
                                      f"saved from this model (tp_plugin.save_pretrained / TPTrainer)")
            data = source.read(key, getattr(tensor, "tp_shard", None))
            if tuple(data.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{directory}: {key} gives a shard of shape {list(data.shape)}, the split model "
                                      f"holds {list(tensor.shape)}: the checkpoint is of another model")
            with torch.no_grad():
                tensor.copy_(data)
    finally:
        source.close()


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")


class TPTrainerMixin:
    """Put in front of `Trainer` or of a Trainer subclass: `class MyTrainer(TPTrainerMixin, SFTTrainer)`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install()
        self._tp_mesh = split_mesh(self.model)
        if self._tp_mesh is not None:
            register(self.accelerator, self.model)  # before get_train_dataloader prepares a loader
            if hasattr(self, "_tp_size"):  # TRL reads it from Accelerate's parallelism config; its counts go
                self._tp_size = 1  # through gather_for_metrics, which counts each replica once

    # -- batch accounting ------------------------------------------------------------------------------------
    def get_tp_size(self) -> int:
        return self._tp_mesh.tp_size if self._tp_mesh is not None else super().get_tp_size()

    def _track_num_input_tokens(self, inputs):
        if self._tp_mesh is None:
            return super()._track_num_input_tokens(inputs)
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)  # gathers over the world: each TP rank counted the same batch
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self._tp_mesh.tp_size

    # -- TRL's online trainers (GRPO, RLOO): gathers count each data-parallel replica once ----------------------
    def _generate_and_score_completions(self, *args, **kwargs):
        with self._replica_view():
            return super()._generate_and_score_completions(*args, **kwargs)

    def _compute_loss(self, *args, **kwargs):
        with self._replica_view():
            return super()._compute_loss(*args, **kwargs)

    def _replica_view(self):
        if self._tp_mesh is None or not hasattr(super(), "_generate_and_score_completions"):
            return contextlib.nullcontext()
        from .trl import replica_view

        return replica_view(self, self._tp_mesh)

    # -- saving ----------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._tp_mesh is None:
            return super().save_model(output_dir, _internal_call)
        from ..checkpoint import save_pretrained

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _is_peft(self.model):  # LoRA: the ordinary (unsplit) adapter, gathered by tp_plugin's PEFT integration
            self.model.save_pretrained(output_dir)  # collective too: every rank calls it, rank 0 writes
        else:
            save_pretrained(self.model, output_dir)  # collective: every rank walks the same tensors (ZeRO-3 too)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._tp_mesh is None or self.is_deepspeed_enabled:  # DeepSpeed: the engine's per-rank checkpoint
            return super()._save_optimizer_and_scheduler(output_dir)
        mesh = self._tp_mesh
        os.makedirs(output_dir, exist_ok=True)
        if mesh.dp_rank == 0:
            torch.save(self.optimizer.state_dict(), os.path.join(output_dir, optimizer_file(mesh.tp_rank, mesh.tp_size)))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # -- resuming --------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._tp_mesh is None or _is_peft(model if model is not None else self.model):  # adapters: PEFT's load,
            # which tp_plugin's PEFT integration slices for each rank
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_consolidated(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._tp_mesh is None or self.is_deepspeed_enabled:
            return super()._load_best_model()
        load_consolidated(self.model, self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._tp_mesh is None or self.is_deepspeed_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        mesh = self._tp_mesh
        path = os.path.join(checkpoint, optimizer_file(mesh.tp_rank, mesh.tp_size))
        if not os.path.isfile(path):
            found = sorted(p.name for p in Path(checkpoint).glob("optimizer*.pt"))
            raise FileNotFoundError(f"{checkpoint} has no optimizer state for TP rank {mesh.tp_rank} of "
                                    f"{mesh.tp_size} ({path}); it has {found}. Resume with the TP degree the "
                                    f"checkpoint was saved with, or drop resume_from_checkpoint.")
        self.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


class TPTrainer(TPTrainerMixin, Trainer):
    """`transformers.Trainer` for a model split by `tp_plugin.parallelize` (see the module docstring)."""
