"""Training step (forward + backward + AdamW step) per variant, measured inside each rank process.

Every variant builds the same seeded random model in fresh processes (forked from tests/dist.py's
preloaded forkserver, 1 thread per rank) and reports, per rank: the time of every step, the peak resident
memory (VmHWM) during training (the high-water mark is reset after setup, so building the full model
before splitting it is not counted; the setup peak is reported apart), the collectives of one step, and
the time to replay exactly those collectives alone (the communication part of the ideal).
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import re
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist

from .comm_count import Collective, CommCounter
from .shapes import config

# tp_plugin+no_overlap: the default path with overlap_comm=False, to measure what the overlap brings
VARIANTS = ["unsplit", "tp_plugin", "tp_plugin+no_overlap", "tp_plugin+loss_parallel", "tp_plugin+sp",
            "tp_plugin+loss_parallel+sp", "deepspeed_autotp", "transformers_tp"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(job: dict):
    import transformers

    torch.manual_seed(0)
    cfg = config(job["shape"], job.get("layers"))
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(DTYPES[job["dtype"]])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _setup(job: dict):
    """(module to call, step function) for one variant; the step returns the loss as a float."""
    variant, dtype = job["variant"], DTYPES[job["dtype"]]
    lr = 1e-4
    if variant == "transformers_tp":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(job["ckpt"], tp_plan="auto", dtype=dtype)
    elif variant.startswith("tp_plugin"):  # the route the README leads with: each rank reads only its slices
        import tp_plugin

        ckpt = job.get("ckpt") or save_checkpoint(job, os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                    "bench-checkpoints"))
        model = tp_plugin.from_pretrained(ckpt, tp_size=2, torch_dtype=dtype,
                                          loss_parallel="loss_parallel" in variant,
                                          sequence_parallel=variant.endswith("+sp"),
                                          overlap_comm="no_overlap" not in variant)
    else:
        model = build_model(job)
    model.train()
    if variant == "deepspeed_autotp":
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": job["batch"], "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2},
                     # no clipping: the other variants do not clip either (DeepSpeed clips at 1.0 by default)
                     "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if job["dtype"] == "bf16":
            ds_config["bf16"] = {"enabled": True}
        # a torch AdamW (DeepSpeed's own AdamW would compile a CPU fused Adam first); DeepSpeed remaps it
        # onto the AutoTP shards
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

        def step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss.item()
        return engine.module, step

    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


def _replay(calls: list[Collective], repeats: int = 3) -> float:
    """Median time of issuing exactly these collectives (sizes, dtypes, order) back to back."""
    world = dist.get_world_size()
    if world == 1:
        return 0.0
    # Ranks may record different sizes (uneven shards): replay the largest at each position on every rank.
    lists = [None] * world
    dist.all_gather_object(lists, [(c.kind, c.numel, c.dtype) for c in calls if c.kind != "barrier"])
    if len({len(x) for x in lists}) > 1 or any(len({(k, d) for k, _, d in col}) > 1 for col in zip(*lists)):
        return float("nan")  # the ranks issue different collectives: no common replay
    buffers = [(col[0][0], torch.zeros(max(n for _, n, _ in col), dtype=col[0][2])) for col in zip(*lists)]
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for kind, buf in buffers:
            if kind == "all_gather":
                dist.all_gather(list(torch.empty(world, buf.numel(), dtype=buf.dtype)), buf)
            elif kind == "broadcast":
                dist.broadcast(buf, src=0)
            elif kind == "reduce_scatter":
                dist.reduce_scatter_tensor(torch.empty(buf.numel() // world, dtype=buf.dtype), buf)
            else:
                dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_step(rank: int, world: int, job: dict) -> dict:
    """Per-rank body: set up the variant, time warm-up + measured steps, count one step, replay its comm."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(job.get("threads", 1))
    start_rss_kb = _status_kb("VmRSS")  # torch + transformers imported (forked from the preloaded server)
    t_setup = time.perf_counter()
    model, step = _setup(job)
    setup_s = time.perf_counter() - t_setup
    params = {id(p): _local(p) for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    setup_peak_kb = _status_kb("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap (e.g. the unsplit weights) back before the reset
    _reset_peak_rss()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (job["batch"], job["seq"]), generator=gen)
    times, losses = [], []
    for _ in range(job["warmup"] + job["steps"]):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)
    train_peak_kb = _status_kb("VmHWM")
    counter = CommCounter()
    if world > 1:  # a single process has nothing to count (and its steps are the slowest)
        with counter:
            step(ids)
    comm_s = _replay(counter.calls)
    return {"rank": rank, "times": times, "losses": losses, "setup_s": setup_s, "param_bytes": param_bytes,
            "setup_peak_kb": setup_peak_kb, "start_rss_kb": start_rss_kb, "train_peak_kb": train_peak_kb, "comm": counter.summary(),
            "comm_calls": [(c.kind, c.numel, str(c.dtype).removeprefix("torch.")) for c in counter.calls],
            "comm_replay_s": comm_s}


def save_checkpoint(job: dict, root: str) -> str:
    """The seeded model saved once (fp32) for transformers' `from_pretrained(tp_plan="auto")`."""
    path = os.path.join(root, f"{job['shape']}-L{job.get('layers') or 'all'}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:  # the ranks of one run may ask at once: one saves
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(path, "config.json")):
            model = build_model({**job, "dtype": "fp32"})
            tmp = path + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
            model.save_pretrained(tmp)
            os.replace(tmp, path)
    return path


def run_variant(job: dict, *, timeout_s: float = 600.0) -> dict:
    """Run one variant in fresh rank processes; a failure is a result (its error), not an exception."""
    from tests.dist import run_ranks

    world = 1 if job["variant"] == "unsplit" else 2
    t0 = time.perf_counter()
    try:
        ranks = run_ranks(world, rank_step, job, timeout_s=timeout_s)
    except AssertionError as exc:
        print(f"{job['variant']} failed; the ranks' tracebacks:\n{str(exc)[-4000:]}", file=sys.stderr)
        return {**job, "error": _first_error(str(exc)), "wall_s": time.perf_counter() - t0}
    timed = slice(job["warmup"], None)
    per_step = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))][timed]
    return {**job, "world": world, "step_s": statistics.median(per_step), "step_s_all": per_step,
            "peak_rss_mb": max(r["train_peak_kb"] for r in ranks) / 1024,
            "setup_peak_rss_mb": max(r["setup_peak_kb"] for r in ranks) / 1024,
            "start_rss_mb": max(r["start_rss_kb"] for r in ranks) / 1024,
            "peak_above_start_mb": max(r["train_peak_kb"] - r["start_rss_kb"] for r in ranks) / 1024,
            "param_mb": max(r["param_bytes"] for r in ranks) / 2 ** 20,
            "loss0": ranks[0]["losses"][0], "comm": ranks[0]["comm"], "comm_per_rank": [r["comm"] for r in ranks],
            "comm_calls_rank0": ranks[0]["comm_calls"],
            "comm_replay_s": max(r["comm_replay_s"] for r in ranks),
            "setup_s": max(r["setup_s"] for r in ranks), "wall_s": time.perf_counter() - t0}


def _first_error(report: str) -> str:
    """The most telling line of the ranks' tracebacks: the first exception that is not a peer's disconnect."""
    lines = [ln.strip() for ln in report.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    cause = [ln for ln in errors if not re.search(r"Connection (reset|closed)|timed out|Timeout", ln)]
    return ((cause or errors)[0] if errors else lines[-1])[:300]
