"""What tp_plugin's consistency checks cost, next to what they guard: a training step, an evaluation forward and
a `generate()` call of the same split model.

    python -m bench.checks_cost [--shape smollm2-135m] [--seq 256] [--batch 1] [--new-tokens 32]

Two CPU ranks (gloo, 1 thread each), TP=2. Per rank, the median over repeats of:
* a training step (forward + backward + AdamW), an eval-mode forward of the same batch, and a greedy
  `generate()` of `--new-tokens` tokens from the batch's first 64 tokens, each after a warm-up;
* the first-training-forward check (digest of the batch and the RNG state, one all-gather of 2 int64);
* the input check of an evaluation's first forward and of a `generate()` prompt (a digest, one all-gather of
  one int64);
* the RNG re-synchronisation `generate()` does first (one broadcast of the generator states);
* the arrival check before a save, a `generate()` or a resize (key-value store round trips, no collective).
`generate()` pays the prompt check, the RNG sync and the arrival check, once per call.
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


def _rank(rank, world, shape, seq, batch, new_tokens):
    import transformers

    import tp_plugin
    from tp_plugin import checks
    from tp_plugin.runtime.arrival import arrive_together
    from tp_plugin.runtime import rng

    from .shapes import config

    torch.manual_seed(0)
    model = tp_plugin.parallelize(transformers.LlamaForCausalLM(config(shape)), tp_size=2)
    model.train()
    group = tp_plugin.tp_state(model).mesh.tp_group
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(1))
    prompt = ids[:, :64]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def evaluate():
        with torch.no_grad():
            model(ids)

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    step()  # warm-up, and the real first-forward check
    result = {"step": _median_time(step, 3)}
    model.eval()
    evaluate()
    generate()
    result.update({"eval forward": _median_time(evaluate, 3), "generate()": _median_time(generate, 3),
                   "first-forward check": _median_time(lambda: checks.check_first_training_forward(
                       (ids,), {"labels": ids}, group), 20),
                   "eval forward check": _median_time(lambda: checks.check_same_inputs(
                       (ids,), {}, group, "bench"), 20),
                   "generate() prompt check": _median_time(lambda: checks.check_same_inputs(
                       (prompt,), {"max_new_tokens": new_tokens}, group, "bench"), 20),
                   "generate() RNG sync": _median_time(lambda: rng.sync_from_tp_rank0(group), 20),
                   "arrival check": _median_time(lambda: arrive_together("bench", "-", group=group), 20)})
    return result


def main(argv=None) -> None:
    from tests.dist import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    results = run_ranks(2, _rank, args.shape, args.seq, args.batch, args.new_tokens, timeout_s=1800)
    slowest = {name: max(r[name] for r in results) for name in results[0]}
    print(f"{args.shape}, batch {args.batch} x seq {args.seq}, fp32, TP=2 on 2 CPU ranks: training step "
          f"{slowest['step']:.3f} s, eval forward {slowest['eval forward']:.3f} s, generate() of "
          f"{args.new_tokens} tokens from 64 {slowest['generate()']:.3f} s\n")
    print("| check | when | time (ms, slowest rank) | x what it guards |\n|---|---|---:|---:|")
    guards = {"first-forward check": ("once per run", "step"),
              "eval forward check": ("the first forward of each evaluation", "eval forward"),
              "generate() prompt check": ("once per generate()", "generate()"),
              "generate() RNG sync": ("once per generate()", "generate()"),
              "arrival check": ("once per save / generate() / resize", "generate()")}
    for name, (how, guarded) in guards.items():
        t = slowest[name]
        print(f"| {name} | {how} | {1e3 * t:.2f} | {t / slowest[guarded]:.2e} x one {guarded} |")
    per_call = sum(slowest[n] for n in ("generate() prompt check", "generate() RNG sync", "arrival check"))
    print(f"\nall that generate() adds: {1e3 * per_call:.2f} ms = {100 * per_call / slowest['generate()']:.3f}% "
          f"of one call")


if __name__ == "__main__":
    main()
