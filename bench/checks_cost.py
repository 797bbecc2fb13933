"""What tp_plugin's consistency checks cost, next to one training step of the same split model.

    python -m bench.checks_cost [--shape smollm2-135m] [--seq 256] [--batch 1]

Two CPU ranks (gloo, 1 thread each), TP=2. Per rank, the median over repeats of:
* a training step (forward + backward + AdamW) of the split model, after one warm-up step;
* the first-training-forward check (digest of the batch and the RNG state, one all-gather of 2 int64);
* the RNG re-synchronisation `generate()` does first (one broadcast of the generator states);
* the arrival check before a save, a `generate()` or a resize (key-value store round trips, no collective).
The check runs once per run and the others once per `generate()` / save, so the ratios below are to one step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank, world, shape, seq, batch):
    import transformers

    import tp_plugin
    from tp_plugin import checks, rng

    from .shapes import config

    torch.manual_seed(0)
    model = tp_plugin.parallelize(transformers.LlamaForCausalLM(config(shape)), tp_size=2)
    model.train()
    group = tp_plugin.tp_state(model).mesh.tp_group
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up, and the real first-forward check
    result = {"step": _median_time(step, 3),
              "first-forward check": _median_time(lambda: checks.check_first_training_forward((ids,), {"labels": ids},
                                                                                             group), 20),
              "generate() RNG sync": _median_time(lambda: rng.sync_from_tp_rank0(group), 20),
              "arrival check": _median_time(lambda: checks.arrive_together("bench", "-"), 20)}
    return result


def main(argv=None) -> None:
    from tests.dist import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    results = run_ranks(2, _rank, args.shape, args.seq, args.batch, timeout_s=1800)
    step = max(r["step"] for r in results)
    print(f"{args.shape}, batch {args.batch} x seq {args.seq}, fp32, TP=2 on 2 CPU ranks: step {step:.3f} s\n")
    print("| check | when | time (ms, slowest rank) | x one step |\n|---|---|---:|---:|")
    when = {"first-forward check": "once per run", "generate() RNG sync": "once per generate()",
            "arrival check": "once per save / generate() / resize"}
    for name, how in when.items():
        t = max(r[name] for r in results)
        print(f"| {name} | {how} | {1e3 * t:.2f} | {t / step:.2e} |")


if __name__ == "__main__":
    main()
