"""Fine-tune a causal LM with pipeline stages x tensor parallelism (x data parallelism) in a plain torch loop.

    torchrun --nproc_per_node 4 examples/pipeline_finetune.py --pp 2 --tp 2            # this machine (CPU, gloo)
    bash configs/pipeline/gpu_2nodes_tp8_pp2.sh                                          # 2 nodes x 8 GPUs

The world forms a ("pp", "dp", "tp") mesh: pp stages (outermost: with ranks numbered node by node, the stages are
split across nodes), dp replicas, tp consecutive ranks (inside a node). `tp_plugin.from_pretrained(...,
pp_size=)` reads only each rank's stage and slices; `pipe.step` runs the schedule over the micro-batches;
`tp_plugin.save_pretrained(pipe, dir)` writes one ordinary HF checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import tp_plugin
from demo_finetune import CORPUS  # examples/ is on sys.path: it is the script's directory
from demo_model import REPO_ROOT, default_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="local HF model directory (default: converted SmolLM2-135M)")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree inside each stage")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", default="1F1B", choices=["GPipe", "1F1B", "Interleaved1F1B"])
    p.add_argument("--batch-size", type=int, default=8, help="sequences per data-parallel replica and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--output-dir", type=pathlib.Path, default=REPO_ROOT / ".tmp" / "pipeline-out")
    p.add_argument("--losses-json", type=pathlib.Path, help="write the per-step losses here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank = dist.get_rank()
    if args.model is None:
        if rank == 0:
            default_model_dir()  # converts the gguf once
        dist.barrier()
        args.model = default_model_dir()
    pipe = tp_plugin.from_pretrained(args.model, tp_size=args.tp, pp_size=args.pp, torch_dtype=torch.float32,
                                     pipeline_kwargs={"microbatches": args.microbatches, "schedule": args.schedule})
    pipe.train()
    if gpu:
        for stage in pipe.stages:
            stage.cuda()
    dp, dp_rank = pipe.dp_size, pipe.mesh.get_local_rank("dp")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(CORPUS.read_text(), return_tensors="pt").input_ids[0]
    chunks = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=args.lr)
    if rank == 0:
        print(f"pp {args.pp} x dp {dp} x tp {args.tp}; stages' layers {[list(r) for r in pipe.layer_ranges]}; "
              f"{args.microbatches} micro-batches, {args.schedule}")
    losses, start = [], time.perf_counter()
    for step in range(args.max_steps):
        first = (step * dp + dp_rank) * args.batch_size % (len(chunks) - args.batch_size)
        batch = chunks[first: first + args.batch_size]  # this replica's sequences (the same on its pp x tp ranks)
        loss = pipe.step(batch, labels=batch)
        if args.max_grad_norm > 0:
            pipe.clip_grad_norm_(args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(loss, group=pipe.dp_group)
        losses.append(loss.item() / dp)
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}")
    if rank == 0:
        print(f"{args.max_steps} steps in {time.perf_counter() - start:.1f} s")
    tp_plugin.save_pretrained(pipe, args.output_dir)
    if rank == 0:
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved {args.output_dir}")
        if args.losses_json:
            args.losses_json.write_text(json.dumps({"losses": losses}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
