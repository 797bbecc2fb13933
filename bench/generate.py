"""`generate()` latency at tp=2: greedy decoding with the KV cache, a prompt of 128 tokens and 64 new ones,
tp_plugin next to DeepSpeed's inference AutoTP (`deepspeed.init_inference`), transformers' `tp_plan="auto"` and
the unsplit model, each in fresh processes with 1 thread per rank, the same seeded random weights.

Per variant: the prefill time (a 1-token generate) and the per-token decode latency
((time of 64 new tokens - time of 1) / 63), medians of `repeats` runs, and whether the tokens equal the unsplit
model's (greedy decoding of the same weights: any difference is a bug, or a near-tie flipped by rounding).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

VARIANTS = ["unsplit", "tp_plugin", "deepspeed_inference", "transformers_tp"]


def _setup(job: dict):
    import transformers

    from .step import build_model

    variant = job["variant"]
    if variant == "transformers_tp":
        model = transformers.AutoModelForCausalLM.from_pretrained(job["ckpt"], tp_plan="auto", dtype=torch.float32)
        return model.eval()
    model = build_model(job).eval()
    if variant == "tp_plugin":
        import tp_plugin

        tp_plugin.parallelize(model, tp_size=2)
    elif variant == "deepspeed_inference":
        import deepspeed

        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                          replace_with_kernel_inject=False)
        model = engine.module
        # DeepSpeed's CPU shared-memory all-reduce kernel dies in forked ranks (no traceback); its documented
        # fallback, the process group's all-reduce, is what tp_plugin uses too: the same transport for both
        deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0
    return model


def _timed_generate(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:]


def generate_rank(rank: int, world: int, job: dict) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    model = _setup(job)
    ids = torch.randint(3, model.config.vocab_size, (job["batch"], job["prompt"]),
                        generator=torch.Generator().manual_seed(1))
    _timed_generate(model, ids, 4)  # warm-up
    prefill, full = [], []
    for _ in range(job["repeats"]):
        prefill.append(_timed_generate(model, ids, 1)[0])
        seconds, tokens = _timed_generate(model, ids, job["new_tokens"])
        full.append(seconds)
    return {"prefill_s": statistics.median(prefill), "generate_s": statistics.median(full),
            "per_token_s": (statistics.median(full) - statistics.median(prefill)) / (job["new_tokens"] - 1),
            "tokens": tokens.tolist()}


def run_generate(shape: str, layers, *, batches=(1, 8), prompt: int = 128, new_tokens: int = 64, repeats: int = 3,
                 ckpt_root: str, timeout_s: float = 600.0, log=print) -> list[dict]:
    from tests.dist import run_ranks

    from .step import _first_error, save_checkpoint

    rows = []
    for batch in batches:
        base = dict(shape=shape, layers=layers, seq=prompt, dtype="fp32", batch=batch, prompt=prompt,
                    new_tokens=new_tokens, repeats=repeats)
        base["ckpt"] = save_checkpoint(base, ckpt_root)
        reference = None
        for variant in VARIANTS:
            job = {**base, "variant": variant}
            try:
                result = run_ranks(1 if variant == "unsplit" else 2, generate_rank, job, timeout_s=timeout_s)[0]
            except AssertionError as exc:
                result = {"error": _first_error(str(exc))}
            if variant == "unsplit":
                reference = result.get("tokens")
            if "tokens" in result:
                result["same_tokens"] = result.pop("tokens") == reference
            rows.append({**job, **result})
            log(f"generate batch {batch} {variant}: " + (result.get("error") or
                f"{1e3 * result['per_token_s']:.1f} ms/token, prefill {1e3 * result['prefill_s']:.0f} ms"))
    return rows
