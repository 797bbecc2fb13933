"""Fine-tune SmolLM2-135M (or any local HF causal LM) split over tensor-parallel ranks with tp_plugin.

    torchrun --standalone --nproc_per_node 2 examples/demo_finetune.py [--steps 30] [--loss-parallel]

Runs on CPU with gloo. With --tp-size smaller than the world size, the TP groups are consecutive ranks and the
remaining axis is data parallel (gradients averaged here, by hand, to keep the demo free of other engines).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import time

import torch
import torch.distributed as dist
from tqdm import tqdm
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import tp_plugin
from demo_model import default_model_dir  # examples/ is on sys.path: it is the script's directory

CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "corpus.txt"
PROMPT = "Tensor parallelism splits"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="local HF model directory (default: converted SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel replica")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tp-size", type=int, help="default: the world size (pure tensor parallelism)")
    p.add_argument("--loss-parallel", action="store_true", help="vocab-parallel loss: no full logits on a rank")
    return p.parse_args()


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Endless [batch_size, seq_len] batches of the token stream, reshuffled each epoch.

    The seed must be the same on every rank of a TP group: they compute one model together, so they must
    see the same batch; only data-parallel replicas get different ones.
    """
    n = ids.numel() // seq_len
    chunks = ids[: n * seq_len].view(n, seq_len)
    if n < batch_size:
        raise ValueError(f"corpus has {n} chunks of {seq_len} tokens, fewer than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield chunks[idx]


def complete(model, tokenizer, prompt: str) -> str:
    """Greedy completion. Every rank must call this: each holds only part of the model."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)  # the model's device (a GPU after prepare)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # torchrun starts one process per core; more threads just fight over them
    if not dist.is_initialized():
        # A finite timeout turns a collective that never completes into an error instead of a hang.
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_size = args.tp_size or world
    if world % tp_size:
        raise SystemExit(f"--tp-size {tp_size} does not divide the world size {world}")
    dp_size, dp_rank = world // tp_size, rank // tp_size
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank != 0:
        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar, not one per rank
    torch.manual_seed(0)

    if args.model is None:
        if rank == 0:
            default_model_dir()  # converts the gguf on first use; the other ranks wait instead of racing
        dist.barrier()
        args.model = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # `torch_dtype` before 4.56
    model = tp_plugin.parallelize(model, tp_size=tp_size, loss_parallel=args.loss_parallel)
    log(tp_plugin.inspect(model))
    model.eval()
    log(f"before: {complete(model, tokenizer, PROMPT)!r}")

    ids = tokenizer(CORPUS.read_text(), return_tensors="pt").input_ids[0]
    data = batches(ids, args.seq_len, args.batch_size, seed=1234 + dp_rank)
    dp_group = model.tp_plugin_state.mesh.dp_group if dp_size > 1 else None  # ranks holding the same shards
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log(f"{ids.numel()} tokens, tp={tp_size} dp={dp_size}, {args.steps} steps of {args.batch_size}x{args.seq_len}")

    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), disable=rank != 0, desc="fine-tune")
    for step in bar:
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels itself
        loss.backward()
        if dp_group is not None:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= dp_size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 10 == 0 and rank == 0:
            tqdm.write(f"step {step}: loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start

    if losses:
        k = min(10, len(losses))
        log(f"{len(losses)} steps in {seconds:.1f} s ({seconds / len(losses):.2f} s/step)")
        log(f"mean loss, first {k} steps: {sum(losses[:k]) / k:.4f}   last {k} steps: {sum(losses[-k:]) / k:.4f}")
    model.eval()
    log(f"after:  {complete(model, tokenizer, PROMPT)!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
