"""Step time and peak memory per rank: tp_plugin vs. DeepSpeed's own AutoTP, both at TP=2 under ZeRO-1.

    python bench/deepspeed_step.py                    # SmolLM2-135M shape, random weights, seq 256, 2 ranks
    python bench/deepspeed_step.py --layers 4 --steps 4   # a quick smoke run

Both variants train the same seeded model, one optimizer step at a time, on the same batch, in fresh
process pairs (so the peak RSS of one does not hide the other's), with the same DeepSpeed config:
    tp_plugin: the model is split by `tp_plugin.parallelize` and handed to `deepspeed.initialize` as is;
    autotp:    the unsplit model is handed to `deepspeed.initialize`, whose AutoTP splits it (every rank
               builds the whole model first: that is how DeepSpeed AutoTP works).
`tp_plugin_lp` is tp_plugin with `loss_parallel=True` (the loss from vocabulary shards, no full logits).
Reported per rank: median step time after warm-up (forward + backward + step), and peak RSS (ru_maxrss,
includes building the model). Ratios are tp_plugin / autotp (< 1: tp_plugin is faster / smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["tp_plugin", "tp_plugin_lp", "autotp"]  # tp_plugin_lp: loss_parallel=True (no full logits)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=4, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def smollm2_config(layers: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                    head_dim=64, max_position_embeddings=2048, rope_theta=100000.0,
                                    tie_word_embeddings=True, attn_implementation="sdpa")


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers

    import tp_plugin

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(smollm2_config(args.layers))
    if args.variant.startswith("tp_plugin"):
        model = tp_plugin.parallelize(model, tp_size=2, loss_parallel=args.variant == "tp_plugin_lp")
    config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2},
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=config)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    local_params = sum(p.numel() for p in engine.module.parameters())
    result = {"rank": rank, "median_s": statistics.median(times[args.warmup:]),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "losses": losses, "local_params": local_params}
    all_results = [None] * dist.get_world_size()
    dist.all_gather_object(all_results, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(all_results))
    engine.destroy()
    dist.destroy_process_group()


def launch(variant: str, args, tmp: Path) -> list[dict]:
    out = tmp / f"{variant}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--variant", variant, "--out", str(out), "--layers", str(args.layers), "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE")
                   else None)
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    if args.variant:
        return worker(args)
    print(f"model: SmolLM2-135M shape, {args.layers} layers, random weights; seq {args.seq}, batch {args.batch}; "
          f"TP=2 (2 gloo ranks) under DeepSpeed ZeRO-1; {args.warmup} warm-up + {args.steps} measured steps")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for v in VARIANTS:
            results[v] = launch(v, args, Path(tmp))
            # the machine may be shared: a high load average means noisy step times
            print(f"{v}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'variant':12} {'rank':>4} {'local params':>13} {'step (median)':>14} {'peak RSS':>10}  losses")
    for variant, ranks in results.items():
        for r in ranks:
            print(f"{variant:12} {r['rank']:>4} {r['local_params']:>13,} {r['median_s']:>12.3f} s "
                  f"{r['peak_rss_mb']:>7.0f} MB  {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    for variant in VARIANTS[:-1]:
        for r_tp, r_ds in zip(results[variant], results["autotp"]):
            print(f"rank {r_tp['rank']}: {variant} / autotp  step time x{r_tp['median_s'] / r_ds['median_s']:.2f}  "
                  f"peak RSS x{r_tp['peak_rss_mb'] / r_ds['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
