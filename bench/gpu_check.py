"""`make gpu-check`: the checks that need a GPU, in one run that finishes in a few minutes on one H100.

    python -m bench.gpu_check [--quick] [--out bench/results/gpu_check]

Writes `<out>.json` and `<out>.md`. On a machine without CUDA, sections 1, 2 and 5 run on the CPU with toy shapes
(a smoke test of the code, not a GPU result: the device field says "no CUDA device"), sections 3 and 4 say
"skipped: no CUDA device" and a toy planner run and a toy fused-loss step stand in for them:

1. correctness of the CUDA path: 2 ranks on the one GPU with the gloo backend (NCCL refuses two ranks on one
   device), a tiny Llama split at tp=2 against the unsplit model (logits, loss, every gradient; plain TP and
   sequence-parallel at a length tp does not divide); the CUDA generators seeded differently on each rank before
   the split and drawn from after it (equal draws: the split synchronised them); sampling after per-rank seeds
   equal on both ranks; `save_pretrained` of the split model and a reload in plain transformers (same logits);
2. the engines: 4 ranks (tp 2 x dp 2) on the GPU, one AdamW step under DDP over the data-parallel group and one
   under FSDP2 (`tp_plugin.fully_shard`), each against the unsplit model's step on the same global batch;
3. per-rank compute at tp = 1, 2, 4, 8 for Llama-3-8B-shaped blocks in bf16 with a fake process group (this
   process is rank 0 of tp; no communication): step time against the unsplit time / tp, and peak memory against
   the planner's prediction for the same setup (`tp_plugin.tools.planner`: parameters, gradients, AdamW states in the
   parameters' dtype, activations);
4. the vocabulary at length: the same stack at seq 8192 with Llama 3's 128k vocabulary at tp = 1, 2, 4, 8, the
   loss fused with the head (the default), and at tp 2 also with the logits computed in every forward
   (`defer_logits=False`): step time and peak memory;
5. `generate()` per-token latency at tp=2 (2 ranks on the GPU, gloo; greedy, KV cache, prompt 128, 64 new
   tokens, batch 1 and 8) next to the unsplit model in one process.

What one GPU cannot cover is listed in the results (`not_covered`): NCCL itself, above all.

The GPU machines have no network: this needs only torch, transformers and tp_plugin's own files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .gpu import _rank0_step
from .shapes import config

SKIPPED = "skipped: no CUDA device"


def _tiny(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=72, intermediate_size=98, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                                   max_position_embeddings=64, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _correctness_rank(rank, world, port, queue, timeout_s, device, out_dir):
    import copy

    from transformers import AutoModelForCausalLM

    from tp_plugin import parallelize, save_pretrained, testing, tp_state
    from tp_plugin.runtime.comm import gather_whole

    testing.init_rank(rank, world, port, timeout_s)
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        ref = _tiny().to(device)
        sp_model = parallelize(copy.deepcopy(ref), tp_size=2, sequence_parallel=True)
        torch.manual_seed(100 + rank)  # different generators on the two ranks (CPU and CUDA) before this split
        model = parallelize(copy.deepcopy(ref), tp_size=2)
        group = tp_state(model).mesh.tp_group
        drawn = [None] * 2  # the split gave both ranks TP rank 0's generators: the same numbers now
        dist.all_gather_object(drawn, torch.rand(16, device=device).cpu(), group=group)
        ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)

        def grad_error(split, unsplit):
            err, ref_params = 0.0, dict(unsplit.named_parameters())
            for name, p in split.named_parameters():
                grad = p.grad
                if getattr(p, "tp_shard", None) is not None:
                    grad = gather_whole(p.grad, p.tp_shard, group)
                err = max(err, (grad - ref_params[name].grad).abs().max().item())
            return err

        # sequence parallelism first, at 13 tokens (padded to 14 inside the model), against its own reference
        sp_ref, sp_ids = copy.deepcopy(ref), torch.cat([ids, ids[:, :1]], dim=1)
        sp_out, sp_ref_out = sp_model(sp_ids, labels=sp_ids), sp_ref(sp_ids, labels=sp_ids)
        sp_out.loss.backward()
        sp_ref_out.loss.backward()
        sp_err = max((sp_out.logits - sp_ref_out.logits).abs().max().item(), grad_error(sp_model, sp_ref))
        out, ref_out = model(ids, labels=ids), ref(ids, labels=ids)
        out.loss.backward()
        ref_out.loss.backward()
        grad_err = grad_error(model, ref)
        torch.manual_seed(100 + rank)  # per-rank seeds again, then sampling (generate synchronises them)
        model.eval()
        sampled = model.generate(ids[:1, :5], do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0).cpu()
        save_pretrained(model, out_dir)  # every rank; rank 0 writes (the gathered CUDA tensors copied to the host)
        with torch.no_grad():
            split_logits = model(ids).logits
            reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
            save_err = (reloaded(ids).logits - split_logits).abs().max().item()
        queue.put((rank, {"logits_err": (out.logits - ref_out.logits).abs().max().item(),
                          "loss_err": abs(out.loss.item() - ref_out.loss.item()), "grad_err": grad_err,
                          "sequence_parallel_err": sp_err, "rng_draws_equal": torch.equal(drawn[0], drawn[1]),
                          "sampled": sampled.tolist(), "save_reload_err": save_err}))
    except BaseException as exc:  # noqa: BLE001  (reported in the results)
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def _ranks(world: int, target, *args, timeout_s: float = 300.0) -> list[dict]:
    """`target(rank, world, port, queue, timeout_s, *args)` on `world` fresh processes; their results in rank
    order."""
    from tp_plugin import testing

    store, queue, procs = testing.spawn(mp.get_context("spawn"), world, target, args, timeout_s)
    try:
        results = dict(queue.get(timeout=timeout_s) for _ in range(world))
    finally:
        testing.reap(procs)
        del store
    return [results[r] for r in range(world)]


def correctness(device: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        r0, r1 = _ranks(2, _correctness_rank, device, out_dir)
    if "error" in r0 or "error" in r1:
        return {"error": r0.get("error") or r1.get("error")}
    sp_err = max(r0["sequence_parallel_err"], r1["sequence_parallel_err"])
    save_err = max(r0["save_reload_err"], r1["save_reload_err"])
    return {"logits_err": r0["logits_err"], "loss_err": r0["loss_err"], "grad_err": max(r0["grad_err"], r1["grad_err"]),
            "sequence_parallel_err": sp_err, f"{device}_rng_draws_equal_after_split": r0["rng_draws_equal"],
            "sampling_equal_after_per_rank_seeds": r0["sampled"] == r1["sampled"], "save_reload_err": save_err,
            "ok": r0["logits_err"] < 1e-4 and r0["grad_err"] < 1e-4 and sp_err < 1e-4 and r0["rng_draws_equal"]
            and r0["sampled"] == r1["sampled"] and save_err < 1e-4}


def _engines_rank(rank, world, port, queue, timeout_s, device):
    """One AdamW step at tp 2 x dp 2 under DDP (over the data-parallel group) and under FSDP2, against the
    unsplit model's step on the same global batch (DDP and FSDP2 average the replicas' gradients, so the
    reference's loss is the mean of the replicas' losses)."""

    from torch.nn.parallel import DistributedDataParallel

    import tp_plugin
    from tp_plugin import testing

    testing.init_rank(rank, world, port, timeout_s)
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        ids = torch.randint(3, 101, (4, 12), generator=torch.Generator().manual_seed(2)).to(device)
        probe = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
        ref = _tiny().to(device)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        ref_loss = sum(ref(ids[2 * i:2 * i + 2], labels=ids[2 * i:2 * i + 2]).loss for i in range(2)) / 2
        ref_loss.backward()
        ref_opt.step()
        with torch.no_grad():
            want = ref.eval()(probe).logits
        row = {}
        for engine in ("ddp", "fsdp2"):
            model = tp_plugin.parallelize(_tiny().to(device), tp_size=2)
            mesh = tp_plugin.tp_state(model).mesh
            if engine == "ddp":
                wrapped = DistributedDataParallel(model, process_group=mesh.dp_group)
            else:
                wrapped = tp_plugin.fully_shard(model)
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
            local = ids[2 * mesh.dp_rank:2 * mesh.dp_rank + 2]
            loss = wrapped(local, labels=local).loss
            loss.backward()
            opt.step()
            losses = [None] * mesh.dp_size
            dist.all_gather_object(losses, loss.item(), group=mesh.dp_group)
            with torch.no_grad():
                got = wrapped.eval()(probe).logits
            row[engine] = {"loss_err": abs(sum(losses) / len(losses) - ref_loss.item()),
                           "logits_err_after_step": (got - want).abs().max().item()}
            del wrapped, model, opt
        queue.put((rank, row))
    except BaseException as exc:  # noqa: BLE001  (reported in the results)
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def engines(device: str) -> dict:
    rows = _ranks(4, _engines_rank, device)
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"error": errors[0]}
    result = {e: {k: max(r[e][k] for r in rows) for k in rows[0][e]} for e in ("ddp", "fsdp2")}
    result["ok"] = all(v < 1e-4 for e in ("ddp", "fsdp2") for v in result[e].values())
    return {"setup": "tiny Llama, tp 2 x dp 2 = 4 ranks on one device over gloo, one AdamW step (lr 1e-3), "
            "global batch 4", **result}


def _predicted_gib(shape: str, layers: int, tp: int, batch: int, seq: int) -> float:
    """The planner's numbers for what `_rank0_step` runs: bf16 weights, grads and AdamW states (torch keeps the
    states in the parameters' dtype), plus the activations measured on meta."""
    from tp_plugin.tools import planner

    cfg = config(shape, layers)
    acts = planner.activation_bytes(cfg, tp, batch, seq, torch.bfloat16)
    plan = planner.split_degrees(planner.meta_model(cfg, torch.bfloat16), tp)[tp]
    params = max(plan.rank_parameters)
    return (params * 2 * 4 + acts["outside"] + layers * acts["per_layer"]) / 2 ** 30


def compute(quick: bool) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": SKIPPED}
    layers, seq = (2, 512) if quick else (4, 2048)
    rows = []
    for tp in (1, 2, 4, 8):
        row = _rank0_step(tp, layers=layers, batch=1, seq=seq, steps=3 if quick else 5)
        row["predicted_gib"] = _predicted_gib("llama3-8b", layers, tp, 1, seq)
        row["memory_vs_prediction"] = row["peak_gib"] / row["predicted_gib"]
        rows.append(row)
    for row in rows:
        row["time_vs_ideal"] = row["step_s"] / (rows[0]["step_s"] / row["tp"])
    return {"device": torch.cuda.get_device_name(), "shape": f"llama3-8b blocks x {layers}, batch 1, seq {seq}, "
            "bf16, AdamW", "rows": rows}


def long_vocab(quick: bool) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": SKIPPED}
    layers, seq = (2, 2048) if quick else (4, 8192)
    rows = [{"mode": "fused", **_rank0_step(tp, layers=layers, batch=1, seq=seq, steps=2 if quick else 3)}
            for tp in (1, 2, 4, 8)]
    rows.append({"mode": "eager logits", **_rank0_step(2, layers=layers, batch=1, seq=seq, steps=2 if quick else 3,
                                                       defer_logits=False)})
    for row in rows:
        row["time_vs_ideal"] = row["step_s"] / (rows[0]["step_s"] / row["tp"])
        row["memory_vs_ideal"] = row["peak_gib"] / (rows[0]["peak_gib"] / row["tp"])
    return {"device": torch.cuda.get_device_name(), "shape": f"llama3-8b blocks x {layers}, vocab 128256 untied, "
            f"batch 1, seq {seq}, bf16, AdamW (tp 1: the unsplit model, transformers' own loss)", "rows": rows}


def _generate_rank(rank, world, port, queue, timeout_s, split, batch, prompt, new, device):
    import transformers

    from tp_plugin import parallelize, testing

    if split:
        testing.init_rank(rank, world, port, timeout_s)
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        torch.manual_seed(0)
        shape = "smollm2-135m-h12" if device == "cuda" else "toy-h4"
        model = transformers.LlamaForCausalLM(config(shape)).to(torch.bfloat16).to(device).eval()
        if split:
            parallelize(model, tp_size=2)
        ids = torch.randint(3, 1000, (batch, prompt), device=device)
        times = []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            _sync(device)
            times.append(time.perf_counter() - t0)
        queue.put((rank, {"ms_per_token": 1e3 * statistics.median(times[1:]) / new}))
    except BaseException as exc:  # noqa: BLE001
        queue.put((rank, {"error": repr(exc)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def generate_latency(quick: bool, device: str) -> dict:
    prompt, new = (32, 16) if quick or device != "cuda" else (128, 64)
    rows = []
    for batch in (1, 8):
        single = _ranks(1, _generate_rank, False, batch, prompt, new, device)[0]  # the unsplit model: one process
        split = _ranks(2, _generate_rank, True, batch, prompt, new, device)
        rows.append({"batch": batch, "unsplit_ms_per_token": single.get("ms_per_token"),
                     "tp2_ms_per_token": max(r.get("ms_per_token", float("nan")) for r in split),
                     "errors": [r["error"] for r in [single, *split] if "error" in r]})
    shape = "smollm2-135m (12 heads)" if device == "cuda" else "toy (CPU smoke)"
    return {"shape": f"{shape}, bf16, greedy, prompt {prompt}, {new} new tokens; unsplit = one process; tp=2 = 2 "
            f"ranks on one device over gloo (on one GPU the collectives go through the host: an upper bound)",
            "rows": rows}


# What a run on one GPU cannot show, and where each is covered instead.
NOT_COVERED = [
    "NCCL itself: two ranks cannot share one GPU under NCCL, so the ranks here talk over gloo with CUDA tensors; "
    "which tensors reach a collective under NCCL (CUDA only), the current-device binding and the one-GPU-per-rank "
    "check are CPU tests (tests/test_gpu_path.py)",
    "collective speed and the overlap of TP communication with compute over NVLink / InfiniBand (gloo on one "
    "device goes through the host)",
    "multi-node layouts: a TP group across hosts, pipeline stages across nodes",
    "DeepSpeed ZeRO on GPUs: the GPU machines have no deepspeed (the CPU suite runs ZeRO-1/2/3 over gloo)",
    "memory per rank of a real TP group at 8B scale (section 3 measures rank 0's compute and memory with a fake "
    "process group instead)",
]


def cpu_smoke() -> dict:
    """The compute sections' code paths on toy shapes on the CPU (no GPU here): the planner's numbers for a
    fake-process-group rank 0, and that rank's training step with the fused loss (its loss equals tp 1's only in
    being finite: the fake group's collectives do nothing)."""
    from tp_plugin.tools import planner

    cfg = config("toy-h4")
    rows = []
    for tp in (1, 2, 4):
        acts = planner.activation_bytes(cfg, tp, 1, 16, torch.float32)
        plan = planner.split_degrees(planner.meta_model(cfg, torch.float32), tp)[tp]
        rows.append({"tp": tp, "params_rank0": plan.rank_parameters[0], "activations_per_layer": acts["per_layer"]})
    steps = [_rank0_step(tp, shape="toy-h4", layers=None, batch=1, seq=64, steps=1, device="cpu",
                         dtype=torch.float32) for tp in (1, 2)]
    return {"toy": rows, "fused_loss_step": steps}


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({results['date']}, {results['device']})", ""]
    for name in ("correctness", "engines", "compute", "long_vocab", "generate", "cpu_smoke"):
        section = results.get(name)
        if section is None:
            continue
        lines += [f"## {name}", "", "```", json.dumps(section, indent=2), "```", ""]
    lines += ["## not covered by one GPU", "", *[f"- {item}" for item in results.get("not_covered", [])], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a faster run)")
    parser.add_argument("--out", default="bench/results/gpu_check", help="output path without extension")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "device": torch.cuda.get_device_name() if cuda else "no CUDA device",
               "torch": torch.__version__}
    device = "cuda" if cuda else "cpu"  # without CUDA: sections 1 and 3 run on toy shapes on the CPU (smoke)
    for name, run in (("correctness", lambda: correctness(device)), ("engines", lambda: engines(device)),
                      ("compute", lambda: compute(args.quick)), ("long_vocab", lambda: long_vocab(args.quick)),
                      ("generate", lambda: generate_latency(args.quick, device))):
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001  (one failing section must not hide the others)
            results[name] = {"error": repr(exc)}
        print(f"{name}: {json.dumps(results[name])[:300]} ({time.perf_counter() - start:.0f} s)", flush=True)
    results["not_covered"] = NOT_COVERED
    if not cuda:
        results["cpu_smoke"] = cpu_smoke()
        print(f"cpu_smoke: {json.dumps(results['cpu_smoke'])[:300]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
