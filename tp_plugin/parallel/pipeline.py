"""Pipeline stages x tensor parallelism x data parallelism on `torch.distributed.pipelining`.

    mesh = init_device_mesh("cuda", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    pipe = tp_plugin.pipeline(model, mesh=mesh, microbatches=8, schedule="1F1B")
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
    for input_ids in loader:                        # this data-parallel replica's batch, on every rank of it
        loss = pipe.step(input_ids, labels=input_ids)
        pipe.clip_grad_norm_(1.0)
        optimizer.step(); optimizer.zero_grad()
    tp_plugin.save_pretrained(pipe, out_dir)        # one ordinary HF checkpoint, from all stages

Each rank holds its stages (`stages.py`: the model with other stages' layers taken out), split over its TP group
by `parallelize`. A step runs the schedule over the micro-batches; the loss is computed on the last stage (from
vocabulary shards with `loss_parallel=True`) as the sum over tokens divided by the batch's token count, so the
micro-batches add up to the unsplit model's mean (`scale_grads=False`). After the schedule: a tied embedding's
two copies (first and last stage) get the sum of their gradients (an all-reduce over the "pp" dim: the stages
in between add zeros), and the gradients are averaged over the "dp" dim (DDP's arithmetic, one bucketed
all-reduce after the last micro-batch, as DDP does under `no_sync` accumulation), or FSDP2 shards each stage
over "dp" (`data_parallel="fsdp2"`). ZeRO-1 is
`torch.distributed.optim.ZeroRedundancyOptimizer(pipe.parameters(), optimizer_class=..., process_group=pipe.dp_group)`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..grad_norm import grad_norm
from ..sharding import TPSplitError
from .stages import Stage, carve, layer_ranges

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved1f1b": "ScheduleInterleaved1F1B"}


class Pipeline:
    """This rank's stages of a pipelined, tensor-parallel causal LM and the schedule that runs them."""

    def __init__(self, stages: list[Stage], stage_indices: list[int], num_stages: int, mesh: DeviceMesh,
                 microbatches: int, schedule: str, data_parallel: str = "ddp"):
        self.stages, self.stage_indices, self.num_stages = stages, stage_indices, num_stages
        self.data_parallel = data_parallel
        self.mesh, self.microbatches, self.schedule_name = mesh, microbatches, schedule
        self.pp_group = mesh.get_group("pp")
        names = mesh.mesh_dim_names
        data = [n for n in names if n not in ("pp", "tp")]
        self.dp_group = mesh.get_group(data[0]) if data else None
        self.dp_size = mesh.size(names.index(data[0])) if data else 1
        self.tp_group = mesh.get_group("tp") if "tp" in names else None
        self._tokens = None
        self._schedule = None  # built at the first step: the stages may still be on the meta device here
        self._tied = [p for s in stages for p in _tied_weight(s)]

    # ---- what a training loop uses --------------------------------------------------------------------------

    @property
    def first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def parameters(self):
        seen = set()
        for stage in self.stages:
            for p in stage.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    @property
    def schedule(self):
        if self._schedule is None:
            self._schedule = self._build_schedule()
        return self._schedule

    def train(self, mode: bool = True) -> Pipeline:
        for stage in self.stages:
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    def step(self, input_ids: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        """One forward and backward over `microbatches` micro-batches of this replica's batch (call on every
        rank of it with the same batch). Returns the batch's mean token loss on every rank."""
        self._check_batch(input_ids, labels)
        device = next(self.parameters()).device
        self._tokens = (labels[:, 1:] != -100).sum().to(device)
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(input_ids.to(device), target=labels.to(device) if self.last else None,
                               losses=losses if self.last else None)
        elif self.last:
            self.schedule.step(target=labels.to(device), losses=losses)
        else:
            self.schedule.step()
        self._sync_gradients()
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=device)
        dist.all_reduce(loss, group=self.pp_group)  # the last stage's loss, on every stage
        return loss

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the unsplit model's gradient norm: the TP-correct norm of each stage's gradients, summed over
        the stages (a tied weight counted once, on the first stage). Returns the norm before clipping."""
        if norm_type != 2.0:
            raise NotImplementedError("pipe.clip_grad_norm_: only the 2-norm")
        tied = {id(p) for p in self._tied} if not self.first else set()
        counted = [p for p in self.parameters() if id(p) not in tied]
        total = grad_norm(counted, tp_group=self.tp_group).pow(2)
        dist.all_reduce(total, group=self.pp_group)
        total = total.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                _local(p.grad).mul_(coef)
        return total

    def save_pretrained(self, save_directory, *, max_shard_size: int | str = "5GB") -> None:
        """One ordinary HF checkpoint from every stage (call on every rank; `tp_plugin.save_pretrained(pipe, dir)`
        comes here)."""
        from ..runtime.arrival import arrive_together
        from ..checkpoint.save import ARRIVE_FIX
        from .pipeline_save import save_pipeline

        arrive_together("save_pretrained", ARRIVE_FIX)
        save_pipeline(self, save_directory, max_shard_size=max_shard_size)

    # ---- inside a step ----------------------------------------------------------------------------------------

    def _check_batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Before any stage communicates, on every rank alike (one all-gather of 3 int64 over the world): the
        ranks of a data-parallel replica (all its stages and TP ranks) got the same batch, every batch splits
        into the micro-batches, and its shape is the first step's (the stages' buffers are sized once)."""
        from ..checks import _gather, _inputs_digest

        mine = [input_ids.shape[0], input_ids.shape[-1], _inputs_digest((input_ids, labels), {})]
        everyone = _gather(mine, dist.group.WORLD)
        dp_of = {int(r): c for c, r in _coordinates(self.mesh, "dp")}
        replicas: dict[int, set] = {}
        for rank, (_, _, digest) in enumerate(everyone):
            replicas.setdefault(dp_of[rank], set()).add(digest)
        split = [r for r in replicas if len(replicas[r]) > 1]
        if split:
            raise RuntimeError(f"tp_plugin pipeline: the ranks of data-parallel replica(s) {split} got different "
                               f"batches; every stage and TP rank of a replica must be given the same input_ids and "
                               f"labels (only replicas differ: shard the data over pipe.dp_group, e.g. "
                               f"DistributedSampler(num_replicas=pipe.dp_size, rank=pipe.mesh.get_local_rank('dp')))")
        shapes = {(rows, seq) for rows, seq, _ in everyone}
        bad = sorted({rows for rows, _ in shapes if rows % self.microbatches})
        first = getattr(self, "_shape", None) or next(iter(shapes))
        if bad or shapes != {first}:
            raise TPSplitError(f"pipe.step: batches of shapes {sorted(shapes)} (sequences, tokens) across the ranks; "
                               f"every step needs {first} on every rank (the stages' buffers are sized at the first "
                               f"step), with sequences a multiple of microbatches={self.microbatches}: pad or drop "
                               f"the last, shorter batch")
        self._shape = first

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = self.stages[-1].model
        return model.loss_function(logits, labels, vocab_size=model.config.vocab_size,
                                   num_items_in_batch=self._tokens)

    def _build_schedule(self):
        from torch.distributed import pipelining

        kind = SCHEDULES[self.schedule_name.lower().replace("_", "").replace("-", "")]
        device = next(self.parameters()).device
        stages = [pipelining.PipelineStage(s, i, self.num_stages, device, group=self.pp_group)
                  for s, i in zip(self.stages, self.stage_indices)]
        cls = getattr(pipelining, kind)
        return cls(stages if kind == "ScheduleInterleaved1F1B" else stages[0], n_microbatches=self.microbatches,
                   loss_fn=self._loss, scale_grads=False)

    def _sync_gradients(self) -> None:
        self._sum_tied()
        if self.dp_size > 1 and self.data_parallel == "ddp":  # DDP's mean over the replicas, one flat all-reduce
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.dp_size)
                dist.all_reduce(flat, group=self.dp_group)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _sum_tied(self) -> None:
        """The input embedding tied to the head: its first-stage and last-stage copies get the sum of their
        gradients. Every stage of the "pp" dim joins the all-reduce (middle stages with zeros)."""
        shape = self._tied_shape
        if shape is None:
            return
        mine = [p for p in self._tied if p.grad is not None]  # (FSDP2: this data-parallel rank's rows)
        buf = _local(mine[0].grad).clone() if mine else torch.zeros(shape, device=next(self.parameters()).device)
        dist.all_reduce(buf, group=self.pp_group)
        for p in self._tied:
            if p.grad is not None:
                _local(p.grad).copy_(buf)

    def shard_data_parallel(self) -> None:
        """FSDP2 over the "dp" dim, stage by stage (each decoder layer of the stage, then the stage's model);
        parameters stay gathered between micro-batches (`reshard_after_forward=False`), gradients are
        reduce-scattered once, in the last micro-batch's backward (the schedule turns the sync off before)."""
        import contextlib

        from torch.distributed.fsdp import fully_shard

        from .fsdp import check_data_mesh, decoder_layers, keep_tags
        from ..state import tp_state

        dp_mesh = self.mesh["dp"]
        for stage in self.stages:
            state = tp_state(stage.model)
            if state is not None and state.mesh is not None:
                check_data_mesh(dp_mesh, state.mesh, "pipeline(data_parallel='fsdp2')")
            # the Stage is the root: its forward (not the model's, which the stage bypasses) gathers the rest
            with keep_tags(stage.model) if state is not None else contextlib.nullcontext():
                for layer in decoder_layers(stage.model):
                    fully_shard(layer, mesh=dp_mesh, reshard_after_forward=False)
                fully_shard(stage, mesh=dp_mesh, reshard_after_forward=False)
        self._tied = [p for s in self.stages for p in _tied_weight(s)]
        self._tied_shape = _tied_shape(self)
        self.data_parallel = "fsdp2"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _tied_weight(stage: Stage) -> list[torch.Tensor]:
    """The tied embedding weight this stage holds (first stage: input embedding; last: head), if tied."""
    model = stage.model
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    holder = model.get_input_embeddings() if stage.first else model.get_output_embeddings() if stage.last else None
    weight = getattr(holder, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) else []


def pipeline(model: nn.Module, *, mesh: DeviceMesh, microbatches: int = 8, schedule: str = "1F1B",
             split: list[int] | None = None, stages_per_rank: int | None = None,
             loss_parallel: bool = False, data_parallel: str = "ddp") -> Pipeline:
    """Split an (unsplit) causal LM into pipeline stages over the mesh's "pp" dim and each stage over its "tp"
    dim; return the `Pipeline` that trains it.

    `mesh`: ("pp", "dp", "tp"), ("pp", "tp") or ("pp", "dp"). `schedule`: "GPipe", "1F1B" or "Interleaved1F1B"
    (then `stages_per_rank`, default 2, stages per rank, rank r holding stages r, r + pp, ...). `split`: decoder
    layers per stage (default: balanced by parameter count). `loss_parallel=True`: the loss from vocabulary
    shards (no gather of the logits). `data_parallel`: "ddp" (the gradients averaged over "dp" after the
    schedule; ZeRO-1 by wrapping the optimizer) or "fsdp2" (`Pipeline.shard_data_parallel`).
    """
    from ..launch_config import configured_sequence_parallel
    from ..parallelize import parallelize

    if configured_sequence_parallel():
        raise TPSplitError("tp_plugin.pipeline: sequence parallelism is asked for by the launch configuration "
                           "(TP_PLUGIN_SEQUENCE_PARALLEL / the DeepSpeed config), and pipeline stages do not support "
                           "it yet (its hooks live on the first and last decoder layers of the whole model); unset it")
    names = tuple(mesh.mesh_dim_names or ())
    if "pp" not in names:
        raise TPSplitError(f"tp_plugin.pipeline: the mesh {names} has no 'pp' dim; build it with "
                           f"init_device_mesh(device, (pp, dp, tp), mesh_dim_names=('pp', 'dp', 'tp'))")
    if data_parallel not in ("ddp", "fsdp2"):
        raise TPSplitError(f"tp_plugin.pipeline(data_parallel={data_parallel!r}): 'ddp' or 'fsdp2'")
    kind = schedule.lower().replace("_", "").replace("-", "")
    if kind not in SCHEDULES:
        raise TPSplitError(f"tp_plugin.pipeline(schedule={schedule!r}): one of GPipe, 1F1B, Interleaved1F1B")
    per_rank = stages_per_rank or (2 if kind == "interleaved1f1b" else 1)
    if kind != "interleaved1f1b" and per_rank != 1:
        raise TPSplitError(f"tp_plugin.pipeline: stages_per_rank={per_rank} needs schedule='Interleaved1F1B'")
    pp_size, pp_rank = mesh.size(names.index("pp")), mesh.get_local_rank("pp")
    num_stages = pp_size * per_rank
    if kind == "interleaved1f1b" and microbatches % pp_size:
        raise TPSplitError(f"tp_plugin.pipeline: Interleaved1F1B needs microbatches ({microbatches}) divisible by "
                           f"the pipeline degree ({pp_size})")
    ranges = layer_ranges(model, num_stages, split)
    indices = [pp_rank + k * pp_size for k in range(per_rank)]
    mesh = _pp_dp_tp(mesh)
    stages = []
    for k, index in enumerate(indices):
        stage_model = model if k == per_rank - 1 else copy.deepcopy(model)  # (copied while still unsplit)
        first, last = index == 0, index == num_stages - 1
        if mesh.size(2) > 1:  # split first, carve after: the plan is the whole model's, names stay the same
            parallelize(stage_model, mesh=mesh[("dp", "tp")], loss_parallel=loss_parallel, sequence_parallel=False)
        carve(stage_model, ranges[index], first=first, last=last)
        stages.append(Stage(stage_model, first=first, last=last))
    pipe = Pipeline(stages, indices, num_stages, mesh, microbatches, schedule)
    pipe._tied_shape = _tied_shape(pipe)
    pipe.layer_ranges = ranges
    if data_parallel == "fsdp2" and not any(p.is_meta for p in pipe.parameters()):
        pipe.shard_data_parallel()  # (on meta, `from_pretrained` shards after loading)
    return pipe


def _coordinates(mesh: DeviceMesh, dim: str):
    """(coordinate along `dim`, global rank) for every rank of the mesh."""
    layout = mesh.mesh.movedim(mesh.mesh_dim_names.index(dim), 0)
    return [(c, r) for c in range(layout.shape[0]) for r in layout[c].flatten().tolist()]


def _pp_dp_tp(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh as ("pp", "dp", "tp"): a missing "dp" or "tp" dim becomes a dim of size 1 (new groups: every
    rank calls this)."""
    names = tuple(mesh.mesh_dim_names)
    if names == ("pp", "dp", "tp"):
        return mesh
    unknown = set(names) - {"pp", "dp", "tp"}
    if unknown or names.index("pp") != 0:
        raise TPSplitError(f"tp_plugin.pipeline: mesh dims {names}; use ('pp', 'dp', 'tp'), ('pp', 'tp') or "
                           f"('pp', 'dp'), in that order")
    sizes = {n: mesh.size(i) for i, n in enumerate(names)}
    layout = mesh.mesh.reshape(sizes["pp"], sizes.get("dp", 1), sizes.get("tp", 1))
    return DeviceMesh(mesh.device_type, layout, mesh_dim_names=("pp", "dp", "tp"))


def _tied_shape(pipe: Pipeline):
    """The local shape of the tied embedding (known to every stage, so the middle ones can add zeros)."""
    local = [tuple(_local(p).shape) for p in pipe._tied]
    everyone = [None] * dist.get_world_size(pipe.pp_group)
    dist.all_gather_object(everyone, local[0] if local else None, group=pipe.pp_group)
    shapes = {s for s in everyone if s is not None}
    return next(iter(shapes)) if shapes else None
