"""The entry point: `parallelize` = the launch's preparation, the split (`split.py`), then the engines' wiring.

The split itself knows no engine. What this adds, in order, and only for a model split over more than one
rank: DeepSpeed's own hooks on the model (so `deepspeed.initialize` trains it on these groups), and the
patches of Accelerate, PEFT and TRL, each installed when its library is imported (`tp_plugin.integrations`
lists them and undoes them).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from . import integrations
from .launch_config import configured_sequence_parallel
from .integrations.accelerate import prepare_launch
from .integrations.deepspeed import prepare_model as prepare_for_deepspeed
from .policy import Policy
from .split import split_model
from .state import tp_state


def parallelize(model: nn.Module, tp_size: int | None = None, *, mesh: DeviceMesh | None = None,
                policy: Policy | None = None, loss_parallel: bool = False,
                sequence_parallel: bool | None = None, overlap_comm: bool = True) -> nn.Module:
    """Split `model` in place across the tensor-parallel group and return it.

    Without `mesh`: with world size W and `tp_size` T (default: the launch configuration's degree, else W),
    the ranks form W/T data-parallel replicas of T consecutive ranks (a ("dp", "tp") `DeviceMesh`). With
    `mesh`, a `DeviceMesh` you built: its "tp" dim is the TP group and its one other non-"pp" dim the
    data-parallel one (e.g. ("pp", "dp", "tp") or ("dp_shard", "tp")). In training mode `.logits` are computed
    only when read (`tp_plugin.runtime.logits`) and the causal-LM loss is computed from the hidden states and
    the head's vocabulary shard; `loss_parallel=True` makes logits that are read this rank's vocabulary shard
    instead of the all-gathered full logits (eval-mode forwards, `generate` included, return the full logits).

    `sequence_parallel=True` (default: the launch configuration's `TP_PLUGIN_SEQUENCE_PARALLEL`, or a DeepSpeed
    config's `"tp_plugin": {"sequence_parallel": true}`) splits the activations between tensor-parallel regions
    along the sequence in training mode (Megatron's sequence parallelism; see `tp_plugin.runtime.sequence`).

    `overlap_comm=True` runs each region's input-gradient reduction while its last column layer computes its
    weight gradient (`tp_plugin.runtime.overlap`); False runs them one after the other (same numbers, same collectives).
    """
    prepare_launch()  # `accelerate launch`: the yaml's TP degree is ours; gloo on a machine without GPU
    if sequence_parallel is None:
        sequence_parallel = configured_sequence_parallel()
    split_model(model, tp_size, mesh=mesh, policy=policy, loss_parallel=loss_parallel,
                sequence_parallel=sequence_parallel, overlap_comm=overlap_comm)
    state = tp_state(model)
    if state.mesh is not None and state.mesh.tp_size > 1:
        prepare_for_deepspeed(model)  # deepspeed.initialize then trains it on these groups, no AutoTP
        integrations.activate()  # Accelerate, PEFT and TRL learn about split models (tp_plugin.integrations)
    return model


def inspect(model: nn.Module) -> str:
    """The plan of a split model: which module got which style, and each rank's shard shapes."""
    state = tp_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has not been split by tp_plugin.parallelize")
    return str(state.plan)
