"""The foundation's contracts: importing changes nothing, every patch is listed and reversible, a caller's mesh
is used as given, the sequence-parallel collective pairs are each other's duals, no import circle.

Tolerance for the mesh parity: the same split as `test_parity` (fp32, 1e-5), only the mesh is the caller's.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_under_accelerate_launch_has_no_side_effect():
    probe = ("import accelerate, sys, torch.distributed as d; p = accelerate.Accelerator.prepare; import tp_plugin\n"
             "print(d.is_initialized(), accelerate.Accelerator.prepare is p, "
             "any(type(f).__name__ == 'RunAfterImport' for f in sys.meta_path))")
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599",
               ACCELERATE_MIXED_PRECISION="no", PARALLELISM_CONFIG_TP_SIZE="2",
               ACCELERATE_USE_PARALLELISM_CONFIG="true")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False"], out.stdout  # no group, unpatched, no import hook


def _patches(rank, world):
    import accelerate
    import peft
    import peft.utils.save_and_load
    import trl.trainer.utils

    def snapshot():
        return (accelerate.Accelerator.prepare, accelerate.Accelerator.clip_grad_norm_, peft.PeftModel.save_pretrained,
                peft.tuners.tuners_utils.BaseTuner.inject_adapter, peft.utils.save_and_load.get_peft_model_state_dict,
                trl.trainer.utils._ChunkedLogProbFunction)

    tp_plugin.integrations.uninstall()  # the harness's earlier tests may have split models in this process
    before = snapshot()
    tp_plugin.parallelize(build("llama", 2), tp_size=2)
    during = snapshot()
    tp_plugin.integrations.uninstall()
    after = snapshot()
    os.environ["TP_PLUGIN_PATCHES"] = "none"
    try:
        tp_plugin.parallelize(build("llama", 2), tp_size=2)
        off = snapshot()
    finally:
        del os.environ["TP_PLUGIN_PATCHES"]
    return [a is b for a, b in zip(before, during)], after == before, off == before


def test_every_patch_is_installed_by_the_split_and_undone_by_uninstall():
    for changed, restored, off in run_ranks(2, _patches):
        assert not any(changed), changed  # all six replaced while a split model exists
        assert restored and off


def _with_mesh(rank, world, meta):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
    ref = build("llama", 2)
    if meta:
        with torch.device("meta"):
            model = type(ref)(ref.config)
        tp_plugin.parallelize(model, mesh=mesh)
        state = tp_plugin.tp_state(model)
        return (state.mesh.tp_size, state.mesh.dp_size, tuple(model.model.layers[0].self_attn.q_proj.weight.shape),
                model.model.layers[0].self_attn.q_proj.weight.is_meta)
    model = tp_plugin.parallelize(build("llama", 2), mesh=mesh)
    state = tp_plugin.tp_state(model)
    ids = batch(seed=10 + state.mesh.dp_rank)  # a batch per data-parallel replica
    err = (model(ids).logits - ref(ids).logits).abs().max().item()
    tp_ranks = dist.get_process_group_ranks(state.mesh.tp_group)
    dp_ranks = dist.get_process_group_ranks(state.mesh.dp_group)
    return state.mesh.tp_size, state.mesh.dp_size, tp_ranks, dp_ranks, err


def test_a_callers_3d_mesh_is_used_as_given():
    results = run_ranks(4, _with_mesh, False)
    for rank, (tp, dp, tp_ranks, dp_ranks, err) in enumerate(results):
        assert (tp, dp) == (2, 2) and err <= 1e-5, (tp, dp, err)
        assert tp_ranks == [rank - rank % 2, rank - rank % 2 + 1] and dp_ranks == [rank % 2, rank % 2 + 2]


def test_a_meta_model_splits_on_a_callers_mesh():
    for tp, dp, shape, is_meta in run_ranks(4, _with_mesh, True):
        assert (tp, dp) == (2, 2) and is_meta
        assert shape[0] in (6 * 8, 3 * 8)  # 9 heads / 3 KV heads of width 8: an uneven 6 + 3 split


def _sp_pairs(rank, world):
    from tp_plugin.comm import gather_along, reduce_scatter_along

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    gathered = gather_along(x, 1, group)
    grad_out = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(100 + rank))
    gathered.backward(grad_out)
    y = torch.randn(3, 4 * world, 5, generator=gen, requires_grad=True)
    scattered = reduce_scatter_along(y, 1, group)
    grad_in = torch.randn(scattered.shape, generator=torch.Generator().manual_seed(200 + rank))
    scattered.backward(grad_in)
    # every rank's inputs, to compute the expected values here
    xs, grads_out, ys, grads_in = ([torch.empty_like(t) for _ in range(world)] for t in (x, grad_out, y, grad_in))
    for bucket, t in ((xs, x), (grads_out, grad_out), (ys, y), (grads_in, grad_in)):
        dist.all_gather(bucket, t.detach().contiguous())
    errors = {
        "gather fwd": (gathered - torch.cat(xs, 1)).abs().max().item(),
        "gather bwd": (x.grad - sum(grads_out).chunk(world, 1)[rank]).abs().max().item(),
        "reduce-scatter fwd": (scattered - sum(ys).chunk(world, 1)[rank]).abs().max().item(),
        "reduce-scatter bwd": (y.grad - torch.cat(grads_in, 1)).abs().max().item(),
    }
    return errors


def test_sequence_parallel_collective_pairs_are_duals():
    for errors in run_ranks(2, _sp_pairs):
        assert max(errors.values()) <= 1e-6, errors  # sums of 2 fp32 values: exact up to rounding


def _module_imports(path: pathlib.Path, package: str) -> set[str]:
    """tp_plugin modules imported at module level (function-level imports are loads on use, not structure)."""
    tree = ast.parse(path.read_text())
    current = package + "." + ".".join(path.relative_to(ROOT / "tp_plugin").with_suffix("").parts)
    current = current.removesuffix(".__init__")
    is_package = path.name == "__init__.py"
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = current.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith(package):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_no_import_circle_and_the_core_imports_no_integration():
    files = {p: None for p in (ROOT / "tp_plugin").rglob("*.py")}
    names = {}
    for path in files:
        name = "tp_plugin." + ".".join(path.relative_to(ROOT / "tp_plugin").with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _module_imports(path, "tp_plugin") if m in names and m != name}
             for name, path in names.items()}
    # the package's own __init__ re-exports; a cycle through it is not a structural one
    graph = {n: {m for m in deps if m != "tp_plugin"} for n, deps in graph.items() if n != "tp_plugin"}
    visiting, done = set(), set()

    def visit(node, trail):
        if node in done:
            return
        assert node not in visiting, f"import circle: {' -> '.join(trail + [node])}"
        visiting.add(node)
        for dep in graph.get(node, ()):
            visit(dep, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
    core = ["tp_plugin.split", "tp_plugin.plan", "tp_plugin.layers", "tp_plugin.comm", "tp_plugin.sharding",
            "tp_plugin.mesh", "tp_plugin.policy", "tp_plugin.state", "tp_plugin.checks", "tp_plugin.rng"]
    for name in core:
        reached, todo = set(), [name]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in reached:
                    reached.add(dep)
                    todo.append(dep)
        assert not any(r.startswith("tp_plugin.integrations") for r in reached), (name, sorted(reached))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")
def test_cuda_rng_state_is_synchronised():
    def _rank(rank, world):
        torch.cuda.manual_seed(rank)
        torch.cuda.init()
        from tp_plugin import rng

        rng.sync_from_tp_rank0(dist.group.WORLD)
        return torch.rand(4, device="cuda").cpu()

    a, b = run_ranks(2, _rank)
    assert torch.equal(a, b)
