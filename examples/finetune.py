"""Fine-tune a causal LM split over tensor-parallel ranks, in a training script written for Accelerate.

    accelerate launch --config_file configs/accelerate/cpu_tp2.yaml examples/finetune.py [--max-steps 30]
    accelerate launch --config_file configs/accelerate/cpu_tp2_dp2_zero2.yaml examples/finetune.py

The TP degree and the data-parallel engine (DDP, DeepSpeed ZeRO or FSDP2) come from the config file; nothing
below names them. The only tp_plugin lines are `from_pretrained` (each rank reads only its slices of the
checkpoint, so no rank ever holds the whole model) and `save_pretrained` (the split also adapts Accelerate: DDP
and data sharding over the data-parallel group, gloo on a machine without GPU; so it comes before
`Accelerator()`).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import transformers
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer

import tp_plugin
from demo_finetune import CORPUS, PROMPT, complete  # examples/ is on sys.path: it is the script's directory
from demo_model import REPO_ROOT, default_model_dir, load_dtype


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="local HF model directory (default: converted SmolLM2-135M)")
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="micro batch per data-parallel replica")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=pathlib.Path, default=REPO_ROOT / ".tmp" / "finetune-out")
    p.add_argument("--no-shuffle", action="store_true", help="corpus order (for comparisons between runs)")
    p.add_argument("--no-generate", action="store_true", help="skip the before/after completions")
    p.add_argument("--losses-json", type=pathlib.Path, help="write the per-step losses here (rank 0)")
    p.add_argument("--save-state", type=pathlib.Path, help="accelerator.save_state here after --stop-after steps")
    p.add_argument("--stop-after", type=int, help="stop after this many steps (an interrupted run)")
    p.add_argument("--resume", type=pathlib.Path, help="accelerator.load_state from here and go on from its step")
    return p.parse_args(argv)


class Progress:
    """The step count, saved and restored with the rest of the state by Accelerate (`register_for_checkpointing`)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def token_chunks(tokenizer, seq_len: int) -> torch.Tensor:
    """The corpus as [n, seq_len] token chunks: a map-style dataset Accelerate can shard."""
    ids = tokenizer(CORPUS.read_text(), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def main(argv=None) -> None:
    args = parse_args(argv)
    state = PartialState()  # torch.distributed up (what Accelerator() would do), so the model can be split first
    torch.set_num_threads(1)  # one process per core; more threads only fight over them
    torch.manual_seed(args.seed)
    log = state.print
    if not state.is_main_process:
        transformers.utils.logging.disable_progress_bar()

    if args.model is None:
        with state.main_process_first():  # the first use converts the gguf: once, not once per rank
            args.model = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # Load split before Accelerator(): under a ZeRO-3 config, Accelerator() makes transformers' from_pretrained
    # partition the weights over all ranks as it loads them, which a TP split cannot start from. The TP degree
    # comes from the launch config; the model goes to this rank's device (cuda:LOCAL_RANK on GPUs).
    model = tp_plugin.from_pretrained(args.model, dtype=load_dtype()).to(state.device)
    split = tp_plugin.tp_state(model)  # None at tp=1: an ordinary model
    mesh = split.mesh if split is not None else None
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    tp, dp = (mesh.tp_size, mesh.dp_size) if mesh is not None else (1, accelerator.num_processes)
    if split is not None:
        log(tp_plugin.inspect(model))
    if not args.no_generate:  # (from_pretrained returns the model in eval mode, as transformers does)
        log(f"before: {complete(model, tokenizer, PROMPT)!r}")
    model.train()

    chunks = token_chunks(tokenizer, args.seq_len)
    loader = DataLoader(chunks, batch_size=args.batch_size, shuffle=not args.no_shuffle, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # Batch accounting is over the data-parallel replicas, not the processes: the TP ranks of a replica share
    # one batch. len(loader) is already per replica (Accelerate shards over DP only).
    global_batch = args.batch_size * args.grad_accum * dp
    steps_per_epoch = len(loader) // args.grad_accum
    log(f"{accelerator.distributed_type}: {accelerator.num_processes} processes = tp {tp} x dp {dp}; "
        f"{len(chunks)} chunks of {args.seq_len} tokens; global batch {global_batch} = micro {args.batch_size} x "
        f"accum {args.grad_accum} x dp {dp}; {steps_per_epoch} steps per epoch; {args.max_steps} steps")

    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume:
        accelerator.load_state(args.resume)  # model, optimizer, RNG and `progress`, as saved
        log(f"resumed from {args.resume} at step {progress.step}")
    done = progress.step
    losses, samples, window = [], 0, []
    start = time.perf_counter()
    bar = tqdm(total=args.max_steps - done, disable=not accelerator.is_main_process, desc="fine-tune")
    first_epoch = done // max(steps_per_epoch, 1)
    for epoch in range(first_epoch, math.ceil(args.max_steps / max(steps_per_epoch, 1))):
        skip = (done - epoch * steps_per_epoch) * args.grad_accum if epoch == first_epoch else 0
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels itself
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            # the mean over the replicas' micro batches (TP ranks hold equal losses, so the mean is unchanged)
            step_loss = accelerator.reduce(torch.stack(window).mean(), "mean").item()
            window.clear()
            losses.append(step_loss)
            samples += global_batch
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if len(losses) % args.log_every == 0 and accelerator.is_main_process:
                tqdm.write(f"step {len(losses)}: loss {step_loss:.4f}, {samples} samples")
            progress.step += 1
            if args.stop_after and progress.step == args.stop_after and args.save_state:
                accelerator.save_state(args.save_state)
                log(f"saved the state after step {progress.step} to {args.save_state}")
            if progress.step in (args.max_steps, args.stop_after):
                break
        if progress.step in (args.max_steps, args.stop_after):
            break
    bar.close()
    seconds = time.perf_counter() - start
    if losses:
        k = min(10, len(losses))
        log(f"{len(losses)} steps, {samples} samples in {seconds:.1f} s ({seconds / len(losses):.2f} s/step); "
            f"mean loss first {k}: {sum(losses[:k]) / k:.4f}, last {k}: {sum(losses[-k:]) / k:.4f}")

    # an ordinary HF checkpoint, consolidated from the shards (and from ZeRO-3 partitions): every rank takes part
    tp_plugin.save_pretrained(accelerator.unwrap_model(model), args.output_dir)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        log(f"saved {args.output_dir}")
        if args.losses_json:
            args.losses_json.write_text(json.dumps({"losses": losses, "samples": samples, "tp": tp, "dp": dp,
                                                    "global_batch": global_batch,
                                                    "steps_per_epoch": steps_per_epoch}))
    zero3 = (accelerator.state.deepspeed_plugin is not None
             and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if not args.no_generate and not zero3:  # ZeRO-3 holds 1/dp of each shard; generate would need its gathers
        inner = accelerator.unwrap_model(model)
        inner.eval()
        log(f"after:  {complete(inner, tokenizer, PROMPT)!r}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
