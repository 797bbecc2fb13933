"""`python -m bench` (or `make bench`): every section in one run; markdown printed, JSON + markdown written.

    python -m bench                   # the full grid (about 35 minutes on 2 cores)
    python -m bench --quick           # toy sizes, seconds
    python -m bench --sections step   # only some of: step, profile, memory, gpu, generate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from . import report
from .comm_count import megatron_minimum
from .shapes import config

# (shape, layers or None for all, seq, dtype, batch): a grid on which no single shape decides, in about 30 minutes on
# 2 cores. It spans 2 to 30 layers, hidden 576 to 2048, GQA ratios 1, 3, 4 and 7, vocabularies 32k to 152k,
# tied and untied embeddings, seq 128 to 1024, batch 1 to 4, fp32 and bf16; the last two are shapes where the
# vocabulary dominates the step (SmolLM2's 49k at batch 2 x 256; a 128k vocabulary on a hidden-512 body). The SmolLM2 shape (9/3 heads:
# transformers' TP cannot split it) has a dividing-heads twin (12/4) so that transformers' TP runs; bigger shapes
# keep fewer layers so one step stays within seconds on one core; bf16 runs at seq 128 (bf16 matmuls are
# slower than fp32 on this CPU).
FULL_GRID = [("smollm2-135m", None, 256, "fp32", 1), ("smollm2-135m-h12", None, 256, "fp32", 1),
             ("smollm2-135m-h12", 4, 1024, "fp32", 1), ("smollm2-135m-h12", 4, 256, "fp32", 4),
             ("llama-0.5b-mha", 4, 256, "fp32", 1), ("qwen2.5-0.5b", 4, 256, "fp32", 1),
             ("llama3.2-1b", 2, 256, "fp32", 1), ("smollm2-135m-h12", 2, 128, "bf16", 1),
             ("smollm2-135m-h12", 8, 256, "fp32", 2), ("llama3-vocab-h512", None, 1024, "fp32", 1)]
QUICK_GRID = [("toy", None, 32, "fp32", 1), ("toy-h4", None, 32, "fp32", 2)]
# The configs (indexes into the grid) and variants whose step time is broken down by part of the model.
BREAKDOWN_CONFIGS = (1, 2, 5)
BREAKDOWN_VARIANTS = ("unsplit", "tp_plugin", "tp_plugin+loss_parallel", "tp_plugin+sp")
# generate(): the whole dividing-heads SmolLM2 shape (transformers' TP needs dividing heads), batch 1 and 8
GENERATE = dict(shape="smollm2-135m-h12", layers=None, batches=(1, 8), prompt=128, new_tokens=64)
QUICK_GENERATE = dict(shape="toy-h4", layers=None, batches=(1, 2), prompt=16, new_tokens=8)
from .step import VARIANTS


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _megatron_min(job: dict) -> dict:
    import torch

    cfg = config(job["shape"], job["layers"])
    # tp_plugin's loss is vocab-parallel in every mode (the logits stay deferred); DeepSpeed AutoTP keeps a tied
    # LM head vocabulary-sharded and computes its loss vocab-parallel too
    loss_parallel = job["variant"].startswith("tp_plugin") or \
        (job["variant"] == "deepspeed_autotp" and cfg.tie_word_embeddings)
    return megatron_minimum(cfg, batch=job["batch"], seq=job["seq"], dtype=getattr(torch, {"fp32": "float32",
                            "bf16": "bfloat16"}[job["dtype"]]), tp=2, loss_parallel=loss_parallel,
                            sequence_parallel=job["variant"].endswith("+sp"))


def run_steps(grid, *, warmup: int, steps: int, ckpt_root: str, timeout_s: float,
              on_config=lambda rows: None, variants=VARIANTS) -> list[dict]:
    from .step import run_variant, save_checkpoint

    rows: list[dict] = []
    for shape, layers, seq, dtype, batch in grid:
        base = dict(shape=shape, layers=layers, seq=seq, dtype=dtype, batch=batch, warmup=warmup, steps=steps)
        base["ckpt"] = save_checkpoint(base, ckpt_root)
        for variant in variants:
            job = {**base, "variant": variant}
            row = {**run_variant(job, timeout_s=timeout_s), "loadavg_after": os.getloadavg()[0]}
            if variant != "unsplit":
                row["megatron_min"] = _megatron_min(job)
            _log(f"{report.config_name(report.config_key(row))} {variant}: "
                 + (f"failed: {row['error']}" if "error" in row else
                    f"{row['step_s']:.3f} s/step, peak {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s wall"))
            rows.append(row)
        on_config(rows)
    return rows


def run_breakdown(grid, *, timeout_s: float) -> list[dict]:
    from tests.dist import run_ranks

    from .breakdown import breakdown_rank

    rows = []
    for shape, layers, seq, dtype, batch in grid:
        for variant in BREAKDOWN_VARIANTS:
            job = dict(shape=shape, layers=layers, seq=seq, dtype=dtype, batch=batch, variant=variant)
            try:
                result = run_ranks(1 if variant == "unsplit" else 2, breakdown_rank, job, timeout_s=timeout_s)[0]
            except AssertionError as exc:
                result = {"error": str(exc).splitlines()[-1][:200]}
            rows.append({**job, **result})
            _log(f"breakdown {report.config_name(report.config_key(job))} {variant}: "
                 + (result.get("error") or f"{result['wall_s']:.2f} s"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds); results go to --out/quick.*")
    parser.add_argument("--sections", default="step,profile,memory,gpu,generate")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant (median reported)")
    parser.add_argument("--configs", default=None, help="comma-separated indexes into the grid (default: all; "
                        "the profile section then breaks down each of them)")
    parser.add_argument("--variants", default=None, help="comma-separated variants of the step section "
                        f"(default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    sections = set(args.sections.split(","))
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.configs:
        grid = [grid[int(i)] for i in args.configs.split(",")]
    timeout_s = 120.0 if args.quick else 600.0
    ckpt_root = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-checkpoints")
    results: dict = {"machine": report.machine(), "grid": grid, "warmup": args.warmup, "steps": args.steps}
    stem = os.path.join(args.out, "quick" if args.quick else "latest")
    t0 = time.time()
    m = results["machine"]
    head = [f"Measured {m['date_utc']} UTC on {m['nproc']} × {m['cpu']} ({m['simd']}), {m['mem_gib']} GiB, "
            f"torch {m['torch']}, 1 thread per rank, median of {args.steps} steps after {args.warmup} "
            f"warm-up; load average at start {m['loadavg_start']:.1f}."]
    parts: dict[str, list[str]] = {}

    def write() -> str:
        """(Re)write JSON + markdown with what is done so far, so a cut-short run still leaves its results."""
        m["loadavg_end"] = os.getloadavg()[0]
        results["wall_s"] = time.time() - t0
        order = ["step", "profile", "generate", "memory", "gpu"]
        md = head + [line for key in order for line in parts.get(key, [])]
        md += ["", f"Load average at end {m['loadavg_end']:.1f}; whole run {results['wall_s']:.0f} s."]
        text = "\n".join(md) + "\n"
        os.makedirs(args.out, exist_ok=True)
        for ext, content in ((".json", json.dumps(results, indent=1, default=str)), (".md", text)):
            with open(stem + ext + ".partial", "w") as f:
                f.write(content)
            os.replace(stem + ext + ".partial", stem + ext)
        return text

    if "memory" in sections:
        from .memmodel import memory_table

        _log("memory model")
        if args.quick:
            results["memory"] = memory_table(("toy-h4",), (1, 2, 4), seq=64)
        else:
            results["memory"] = memory_table(("llama3-8b", "llama3-70b"), (1, 2, 4, 8), seq=4096)
        parts["memory"] = ["", "### Memory model: rank 0 of tp, meta device + fake process group (bf16 weights and "
                           "grads, fp32 AdamW states, measured saved-for-backward activations)", "",
                           report.memory_table_md(results["memory"])]
        write()
    if "gpu" in sections:
        from .gpu import gpu_section

        _log("gpu")
        results["gpu"] = gpu_section()
        parts["gpu"] = ["", "### GPU", "", report.gpu_md(results["gpu"])]
        write()
    if "profile" in sections:
        _log("profile")
        chosen = grid if args.quick or args.configs else [grid[i] for i in BREAKDOWN_CONFIGS if i < len(grid)]
        results["breakdown"] = run_breakdown(chosen, timeout_s=timeout_s)
        parts["profile"] = ["", "### Where a step's time goes (torch.profiler, rank 0, one step; `bench/breakdown.py`)",
                            "", report.breakdown_table(results["breakdown"])]
        write()
    if "generate" in sections:
        from .generate import run_generate

        _log("generate")
        spec = QUICK_GENERATE if args.quick else GENERATE
        results["generate"] = run_generate(spec["shape"], spec["layers"], batches=spec["batches"],
                                           prompt=spec["prompt"], new_tokens=spec["new_tokens"],
                                           ckpt_root=ckpt_root, timeout_s=timeout_s, log=_log)
        parts["generate"] = ["", f"### generate(): greedy, KV cache, prompt {spec['prompt']}, {spec['new_tokens']} new "
                             f"tokens, TP=2 on 2 CPU ranks (`bench/generate.py`)", "",
                             report.generate_table(results["generate"])]
        write()
    if "step" in sections:
        _log("training step: " + "; ".join(report.config_name(g) for g in grid))

        def on_config(rows):
            results["step"], results["goals"] = rows, report.goals(rows)
            parts["step"] = ["", "### Training step, TP=2 on 2 CPU ranks (gloo)", "", report.step_table(rows),
                             "", report.load_line(rows),
                             "", "### Goals", "", report.goals_table(rows),
                             "", "### Collectives per rank per training step", "", report.comm_table(rows)]
            write()
        run_steps(grid, warmup=args.warmup, steps=args.steps, ckpt_root=ckpt_root, timeout_s=timeout_s,
                  on_config=on_config, variants=args.variants.split(",") if args.variants else VARIANTS)
    text = write()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
