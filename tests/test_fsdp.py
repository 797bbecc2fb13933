"""TP x FSDP2: `tp_plugin.fully_shard` over the data-parallel dim of a split model, in a plain training loop.

4 ranks = TP 2 x FSDP2 DP 2. Every rank also trains the unsplit model on the whole global batch (4 sequences;
data-parallel replica r gets sequences 2r, 2r+1), with the same optimizer and clipping. FSDP2 averages the two
replicas' gradients (each the mean over its equal token count), which is the unsplit model's mean over the global
batch. The losses differ only in the order of fp32 sums (TP's partial sums, FSDP's reduce-scatter): 1e-5
relative over 5 AdamW steps at lr 1e-3 (observed: 2.1e-7 at most), and so do the gradient norms that
`tp_plugin.clip_grad_norm_` computes from FSDP2's DTensor gradients (Adam's first steps move by the sign of
each gradient, so a gradient wrong in size but not in sign would hardly show in the losses; the norm shows it). The checkpoint saved from the FSDP2-wrapped
split model, loaded by plain transformers, gives the trained split model's logits (1e-5: the same weights, the
unsplit model's sums). A run where FSDP2 shards
over the whole world instead (mixing the TP ranks' different shards) is refused, and so is a split model
wrapped by torch's own `fully_shard` (its parameters lose the TP tags that clipping and saving read).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.models import batch, build

STEPS, LR, CLIP = 5, 1e-3, 0.5
TOL = 1e-5


def _global_batches(seed: int = 7) -> list[torch.Tensor]:
    return [batch(seed=seed + s, batch_size=4, seq=12) for s in range(STEPS)]


def _reference(arch: str, tp: int) -> dict[str, list[float]]:
    ref = build(arch, tp)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    losses, norms = [], []
    for ids in _global_batches():
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms}


def _train_fsdp(rank, world, arch, out_dir, sequence_parallel=False):
    import tp_plugin

    torch.set_num_threads(1)
    model = tp_plugin.parallelize(build(arch, 2), tp_size=2, sequence_parallel=sequence_parallel)
    tp_plugin.fully_shard(model)
    model.train()
    mesh = tp_plugin.tp_state(model).mesh
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for ids in _global_batches():
        local = ids[2 * mesh.dp_rank: 2 * mesh.dp_rank + 2]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        norms.append(tp_plugin.clip_grad_norm_(model, CLIP).item())
        opt.step()
        opt.zero_grad()
        replica_mean = loss.detach().clone()
        dist.all_reduce(replica_mean, group=mesh.dp_group)
        losses.append(replica_mean.item() / mesh.dp_size)
    tp_plugin.save_pretrained(model, out_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch(seed=99)).logits
    return {"losses": losses, "norms": norms, "logits": logits, "ref": _reference(arch, 2) if rank == 0 else None}


@pytest.mark.parametrize("arch,sequence_parallel", [("llama", False), ("gpt2", False), ("gpt2", True)])
def test_tp2_fsdp2_dp2_matches_unsplit_and_saves(arch, sequence_parallel, tmp_path):
    """With sequence parallelism, GPT-2's row-parallel biases (added to this rank's tokens only) get their
    gradients summed over the TP group by hooks registered at the split, which FSDP2's parameter swap would drop
    (`tp_plugin.runtime.grad_hooks` carries them): without that, the losses drift by 9e-4 at step 4."""
    import transformers

    results = run_ranks(4, _train_fsdp, arch, str(tmp_path / "out"), sequence_parallel, timeout_s=240)
    ref = results[0]["ref"]
    for r in results:
        assert len(r["losses"]) == STEPS
        for key in ("losses", "norms"):  # the norm: every gradient, as clip_grad_norm_ sees it
            for got, want in zip(r[key], ref[key]):
                assert abs(got - want) <= TOL * abs(want), (key, r[key], ref[key])
    # the saved checkpoint is the trained split model, unsplit: plain transformers gives its logits
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        logits = reloaded(input_ids=batch(seed=99)).logits
    torch.testing.assert_close(logits, results[0]["logits"], rtol=1e-5, atol=1e-5)


def _bf16_losses(rank, world):
    import tp_plugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.set_num_threads(1)
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    tp_plugin.fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32))
    model.train()
    mesh = tp_plugin.tp_state(model).mesh
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in _global_batches():
        local = ids[2 * mesh.dp_rank: 2 * mesh.dp_rank + 2]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        tp_plugin.clip_grad_norm_(model, CLIP)
        opt.step()
        opt.zero_grad()
        replica_mean = loss.detach().float().clone()
        dist.all_reduce(replica_mean, group=mesh.dp_group)
        losses.append(replica_mean.item() / mesh.dp_size)
    dtypes = {p.dtype for p in model.parameters()}  # the sharded (master) parameters stay fp32
    return {"losses": losses, "dtypes": sorted(str(d) for d in dtypes), "ref": _reference("llama", 2)["losses"]}


def test_fsdp2_mixed_precision_bf16_compute_fp32_master_weights():
    """FSDP2's MixedPrecisionPolicy: bf16 all-gathered weights and compute (TP collectives in bf16), fp32
    gradient reduction and master weights. The losses are the unsplit fp32 ones to bf16 precision (8 bits of
    mantissa, 4e-3 per rounding; over two layers and 5 steps, 2e-2 relative)."""
    results = run_ranks(4, _bf16_losses, timeout_s=240)
    for r in results:
        assert r["dtypes"] == ["torch.float32"], r["dtypes"]
        for got, want in zip(r["losses"], r["ref"]):
            assert abs(got - want) <= 2e-2 * abs(want), (r["losses"], r["ref"])


def _refused(rank, world, how):
    import tp_plugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    torch.set_num_threads(1)
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    try:
        if how == "world_mesh":
            tp_plugin.fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        else:
            torch_fully_shard(model, mesh=tp_plugin.tp_state(model).mesh.mesh["dp"])
            ids = batch(seed=3)
            model.train()
            model(input_ids=ids, labels=ids)
    except tp_plugin.TPSplitError as err:
        return str(err)
    return None


@pytest.mark.parametrize("how", ["world_mesh", "torch_fully_shard"])
def test_fsdp_misuse_is_refused_on_every_rank(how):
    messages = run_ranks(4, _refused, how)
    assert all(m is not None for m in messages), messages
    assert all(("tensor-parallel group" in m) if how == "world_mesh" else ("tp_plugin.fully_shard" in m)
               for m in messages), messages[0]
