"""A plain Accelerate training loop in the order of Accelerate's own examples, with no tp_plugin in it.

    tp-plugin launch -- accelerate launch --config_file configs/accelerate/cpu_tp2_dp2.yaml examples/accelerate_loop.py
    accelerate launch --config_file ... examples/accelerate_loop.py        # the same script, unsplit (DDP)

`Accelerator()` first, then the model, then `prepare`, then the loop; under `tp-plugin launch` the model comes
out of `from_pretrained` split (the launch's TP degree), and `prepare` wires DDP / DeepSpeed / FSDP2 over the
data-parallel group. `--report` writes the losses and this rank's parameter count (for tests and comparisons).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local Hugging Face model directory")
    p.add_argument("--text", required=True, help="a text file to train on")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--report", help="a directory for report-<rank>.json")
    args = p.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())  # this process's share of the model
    ids = tokenizer(pathlib.Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    blocks = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    loader = DataLoader(blocks, batch_size=args.batch_size, shuffle=False, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    model.train()
    for batch in loader:
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if len(losses) == args.steps:
            break

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if args.report:
        path = pathlib.Path(args.report) / f"report-{accelerator.process_index}.json"
        path.write_text(json.dumps({"losses": losses, "params": params, "processes": accelerator.num_processes}))
    accelerator.end_training()


if __name__ == "__main__":
    main()
