"""LoRA fine-tuning of a causal LM split over tensor-parallel ranks: ordinary Accelerate + PEFT code.

    accelerate launch --config_file configs/accelerate/cpu_tp2.yaml examples/lora_finetune.py [--max-steps 30]
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/lora_finetune.py      # the same, without yaml

The tp_plugin line is `from_pretrained` (each rank reads only its slices); `peft.get_peft_model` then builds
TP-aware LoRA layers by itself (A or B split like the base weight, the other factor replicated), and
`save_pretrained` - called on every rank - writes
the ordinary, unsplit PEFT adapter. `--check` reloads it with plain PEFT into the unsplit model on rank 0 and
compares its logits with the split model's.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch
import torch.distributed as dist
import transformers
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import tp_plugin
from demo_finetune import PROMPT, complete  # examples/ is on sys.path: it is the script's directory
from demo_model import REPO_ROOT, default_model_dir, load_dtype
from finetune import token_chunks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="local HF model directory (default: converted SmolLM2-135M)")
    p.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="micro batch per data-parallel replica")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    p.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated module names')
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=pathlib.Path, default=REPO_ROOT / ".tmp" / "lora-adapter")
    p.add_argument("--no-generate", action="store_true", help="skip the before/after completions")
    p.add_argument("--check", action="store_true", help="reload the adapter with plain PEFT, unsplit, compare")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one process per core; more threads only fight over them
    torch.manual_seed(args.seed)
    if args.model is None:
        args.model = default_model_dir()  # `make demo` converts the gguf before launching
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # Load split before Accelerator(): the launch's TP degree is tp_plugin's (default: all processes), and on a
    # machine without GPU the split gives Accelerate its gloo process group. Each rank reads only its slices.
    model = tp_plugin.from_pretrained(args.model, dtype=load_dtype())
    accelerator = Accelerator()
    model = model.to(accelerator.device).train()  # this rank's device (cuda:LOCAL_RANK on GPUs)
    log = accelerator.print
    if not accelerator.is_main_process:
        transformers.utils.logging.disable_progress_bar()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    mesh = getattr(tp_plugin.tp_state(model), "mesh", None)  # None at tp=1 (an ordinary model)
    tp, dp = (mesh.tp_size, mesh.dp_size) if mesh is not None else (1, accelerator.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"tp {tp} x dp {dp}; LoRA r={args.rank} on {len(model.targeted_module_names)} modules; "
        f"{sum(p.numel() for p in trainable)} trainable parameters on this rank "
        f"of {sum(p.numel() for p in model.parameters())}")
    if not args.no_generate:
        model.eval()
        log(f"before: {complete(model, tokenizer, PROMPT)!r}")
        model.train()

    loader = DataLoader(token_chunks(tokenizer, args.seq_len), batch_size=args.batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    start = time.perf_counter()
    bar = tqdm(total=args.max_steps, disable=not accelerator.is_main_process, desc="LoRA")
    for _ in range(math.ceil(args.max_steps / max(len(loader), 1))):
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) % args.log_every == 0 and accelerator.is_main_process:
                tqdm.write(f"step {len(losses)}: loss {losses[-1]:.4f}")
            if len(losses) == args.max_steps:
                break
        if len(losses) == args.max_steps:
            break
    bar.close()
    seconds = time.perf_counter() - start
    if losses:
        k = min(10, len(losses))
        log(f"{len(losses)} steps in {seconds:.1f} s ({seconds / len(losses):.2f} s/step); mean loss first {k}: "
            f"{sum(losses[:k]) / k:.4f}, last {k}: {sum(losses[-k:]) / k:.4f}")

    peft_model = accelerator.unwrap_model(model)
    peft_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)  # every rank
    log(f"saved the LoRA adapter (ordinary PEFT format, unsplit shapes) to {args.output_dir}")
    peft_model.eval()
    if not args.no_generate:
        log(f"after:  {complete(peft_model, tokenizer, PROMPT)!r}")
    if args.check:
        check_with_plain_peft(peft_model, tokenizer, args, accelerator)
    accelerator.end_training()


def check_with_plain_peft(split_model, tokenizer, args, accelerator) -> None:
    """Rank 0 loads the saved adapter into the unsplit model with plain PEFT; logits must match the split model."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():  # every rank: the split model needs all of them
        split_logits = split_model(input_ids=ids.to(split_model.device)).logits.float().cpu()
    if accelerator.is_main_process:  # (the unsplit model whole, on rank 0's host: a check, not the training)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        plain = PeftModel.from_pretrained(base, args.output_dir).eval()
        with torch.no_grad():
            plain_logits = plain(input_ids=ids).logits
        err, scale = (plain_logits - split_logits).abs().max().item(), plain_logits.abs().max().item()
        print(f"check: plain PEFT on the unsplit model vs. the split model: max |logits diff| = {err:.2e} "
              f"(logits up to {scale:.1f})")
        if err > 1e-4 * max(1.0, scale):  # fp32 sum-order noise over 30 layers is ~1e-6 relative; a bad slice ~1
            raise SystemExit(f"the saved adapter does not reproduce the split model (max logits diff {err:.2e})")
    dist.barrier()


if __name__ == "__main__":
    main()
