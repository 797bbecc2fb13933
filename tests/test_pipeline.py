"""Pipeline stages x TP (x DP) on `torch.distributed.pipelining`, against the unsplit model.

PP=2 x TP=2 (4 ranks) and PP=2 x TP=2 x DP=2 (8 ranks), Llama and GPT-2, both with tied embeddings (the first
stage's input embedding and the last stage's head are one weight in the unsplit model: their gradients are
summed between the stages). 5 AdamW steps with clipping at 0.5 by `pipe.clip_grad_norm_` on the same global
batch as the unsplit model (8 sequences per replica, 4 micro-batches). Losses and pre-clipping gradient norms
match to 1e-5 relative: only the order of fp32 sums differs (micro-batch accumulation, TP partial sums, the
DP average). Each rank holds its stage's layers only: parameters per rank are counted against 1/4 of the model
plus the tied embedding's second copy, on models whose layers dominate (the tiny parity models are mostly
embeddings, norms and biases that TP replicates).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.models import batch, build

STEPS, LR, CLIP, MICRO = 5, 1e-3, 0.5, 4
TOL = 1e-5
HEADS_FOR = 4  # tests.models' head counts made for tp=4 (4 heads / 2 KV heads, GPT-2 6 heads) split evenly at tp=2,
# so that the parameters per rank measure the pipeline's split, not an uneven head split


def _batches(dp: int) -> list[torch.Tensor]:
    return [batch(seed=11 + s, batch_size=8 * dp, seq=12) for s in range(STEPS)]


def _reference(arch: str, dp: int, layers: int, tied: bool = True) -> dict:
    model = build(arch, HEADS_FOR, layers=layers, tied=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for ids in _batches(dp):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": sum(p.numel() for p in model.parameters()),
            "embed": model.get_input_embeddings().weight.numel()}


def _train(rank, world, arch, dp, schedule, layers, out_dir, opts=None):
    import tp_plugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opts = opts or {}
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, dp, 2), mesh_dim_names=("pp", "dp", "tp"))
    pipe = tp_plugin.pipeline(build(arch, HEADS_FOR, layers=layers, tied=opts.get("tied", True)), mesh=mesh,
                              microbatches=MICRO, schedule=schedule, loss_parallel=opts.get("loss_parallel", False),
                              data_parallel=opts.get("data_parallel", "ddp"))
    pipe.train()
    if opts.get("zero1"):  # ZeRO-1 over the data-parallel replicas: each keeps half of the optimizer state
        opt = ZeroRedundancyOptimizer(list(pipe.parameters()), optimizer_class=torch.optim.AdamW,
                                      process_group=pipe.dp_group, lr=LR)
    else:
        opt = torch.optim.AdamW(pipe.parameters(), lr=LR)
    dp_rank = mesh.get_local_rank("dp")
    losses, norms = [], []
    for ids in _batches(dp):
        local = ids[8 * dp_rank: 8 * dp_rank + 8]
        loss = pipe.step(local, labels=local)
        norms.append(pipe.clip_grad_norm_(CLIP).item())
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss, group=mesh.get_group("dp"))
        losses.append(loss.item() / dp)
    probe = None
    if out_dir:
        tp_plugin.save_pretrained(pipe, out_dir)
        ids = batch(seed=99, batch_size=8, seq=12)
        probe = pipe.step(ids, labels=ids).item()  # the trained weights' loss on one batch (no update)
    params = sum(p.numel() for p in pipe.parameters())
    return {"losses": losses, "norms": norms, "params": params, "probe": probe,
            "ref": _reference(arch, dp, layers, opts.get("tied", True)) if rank == 0 else None}


def _check(results, dp):
    ref = results[0]["ref"]
    for r in results:
        for key in ("losses", "norms"):
            assert len(r[key]) == STEPS
            for got, want in zip(r[key], ref[key]):
                assert abs(got - want) <= TOL * abs(want), (key, r[key], ref[key])


@pytest.mark.parametrize("arch,schedule", [("llama", "1F1B"), ("gpt2", "GPipe")])
def test_pp2_tp2_matches_unsplit(arch, schedule):
    _check(run_ranks(4, _train, arch, 1, schedule, 4, None, timeout_s=300), 1)


def test_pp2_tp2_interleaved_matches_unsplit():
    """Interleaved 1F1B: 2 stages per rank (rank 0 holds stages 0 and 2, rank 1 stages 1 and 3); untied
    embeddings (the head is the last stage's own)."""
    _check(run_ranks(4, _train, "llama", 1, "Interleaved1F1B", 4, None, {"tied": False}, timeout_s=300), 1)


def test_pp2_tp2_loss_parallel_matches_unsplit():
    """The last stage's loss from vocabulary shards (`loss_parallel=True`: the logits are never gathered)."""
    _check(run_ranks(4, _train, "llama", 1, "1F1B", 4, None, {"loss_parallel": True}, timeout_s=300), 1)


def test_pp2_tp2_dp2_zero1_matches_unsplit():
    """ZeRO-1 across the replicas: torch's ZeroRedundancyOptimizer over `pipe.dp_group` (8 ranks)."""
    _check(run_ranks(8, _train, "llama", 2, "1F1B", 4, None, {"zero1": True}, timeout_s=400), 2)


def test_pp2_tp2_fsdp2_dp2_matches_unsplit_and_saves(tmp_path):
    """3D with FSDP2 as the data-parallel axis: each stage sharded over "dp" (GPT-2, tied embeddings: the two
    copies' gradients summed on FSDP2's local shards); the checkpoint gathers FSDP2's rows, then TP's."""
    import transformers

    results = run_ranks(8, _train, "gpt2", 2, "1F1B", 4, str(tmp_path / "out"), {"data_parallel": "fsdp2"},
                        timeout_s=400)
    _check(results, 2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = batch(seed=99, batch_size=8, seq=12)
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss.item()
    assert all(abs(r["probe"] - loss) <= TOL * loss for r in results), (loss, [r["probe"] for r in results])


def _mismatched(rank, world):
    import tp_plugin
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    pipe = tp_plugin.pipeline(build("llama", HEADS_FOR, layers=2), mesh=mesh, microbatches=MICRO).train()
    ids = batch(seed=rank if rank == 3 else 0, batch_size=8, seq=12)  # rank 3 (last stage, TP rank 1) differs
    try:
        pipe.step(ids, labels=ids)
    except RuntimeError as err:
        return str(err)
    return None


def test_mismatched_batches_in_a_replica_are_refused_on_every_rank():
    messages = run_ranks(4, _mismatched, timeout_s=120)
    assert all(m is not None and "replica(s) [0] got different batches" in m for m in messages), messages


def test_pp2_tp2_dp2_matches_unsplit_and_saves(tmp_path):
    import transformers

    results = run_ranks(8, _train, "gpt2", 2, "1F1B", 4, str(tmp_path / "out"), timeout_s=400)
    _check(results, 2)
    # the checkpoint written from both stages is the trained model: plain transformers gives the pipeline's loss
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert reloaded.config.n_layer == 4
    ids = batch(seed=99, batch_size=8, seq=12)
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss.item()
    assert all(abs(r["probe"] - loss) <= TOL * loss for r in results), (loss, [r["probe"] for r in results])


def _params_per_rank(rank, world, arch):
    import tp_plugin
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=8, n_head=8, n_positions=128)
    else:
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                          tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    pipe = tp_plugin.pipeline(model, mesh=mesh, microbatches=4)
    return {"params": sum(p.numel() for p in pipe.parameters()), "total": total, "embed": embed,
            "ranges": [list(r) for r in pipe.layer_ranges]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pp2_tp2_parameters_per_rank(arch):
    """Goal: per-rank parameters within 5% of a quarter of the model, plus the tied embedding's second copy (its
    TP shard) on the last stage. 8 layers of hidden 256, vocabulary 1000, tied embeddings."""
    results = run_ranks(4, _params_per_rank, arch, timeout_s=200)
    total, embed = results[0]["total"], results[0]["embed"]
    for rank, r in enumerate(results):
        assert r["params"] <= 1.05 * total / 4 + embed / 2, (rank, r, total / 4)
    assert sum(r["params"] for r in results) <= 1.02 * (total + embed), [r["params"] for r in results]


def _load_stages(rank, world, path):
    import tp_plugin

    torch.set_num_threads(1)
    pipe = tp_plugin.from_pretrained(path, tp_size=2, pp_size=2, pipeline_kwargs={"microbatches": MICRO})
    on_meta = [n for s in pipe.stages for n, p in s.named_parameters() if p.is_meta]
    layers = sorted({n.split(".layers.")[1].split(".")[0] for s in pipe.stages for n, _ in s.named_parameters()
                     if ".layers." in n})
    ids = batch(seed=5, batch_size=8, seq=12)
    loss = pipe.train().step(ids, labels=ids).item()
    return {"on_meta": on_meta, "layers": layers, "loss": loss}


def test_from_pretrained_pp_size_loads_each_stage_only(tmp_path):
    """`from_pretrained(..., pp_size=2)`: each rank builds on meta, keeps its stage's layers and reads only their
    slices (nothing left on meta, no other stage's layer); the loss is the unsplit model's (1e-5)."""
    model = build("llama", HEADS_FOR, layers=4)
    model.save_pretrained(tmp_path / "ckpt")
    ids = batch(seed=5, batch_size=8, seq=12)
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss.item()
    results = run_ranks(4, _load_stages, str(tmp_path / "ckpt"), timeout_s=200)
    assert [r["layers"] for r in results] == [["0", "1"], ["0", "1"], ["2", "3"], ["2", "3"]], results
    for r in results:
        assert not r["on_meta"] and abs(r["loss"] - want) <= TOL * want, (r, want)
