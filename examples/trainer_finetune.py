"""Fine-tune a split causal LM with the HF Trainer: `TPTrainer` + `TrainingArguments`, with evaluation.

    torchrun --standalone --nproc_per_node 4 examples/trainer_finetune.py --tp-size 2 --max-steps 20
    torchrun --standalone --nproc_per_node 4 examples/trainer_finetune.py \\
        --deepspeed configs/deepspeed/zero2_tp2.json      # TP degree from its tensor_parallel.autotp_size
    ... --resume                                           # continue from the last checkpoint in --output-dir

Checkpoints (every --save-steps) hold ordinary consolidated HF weights plus what resuming needs; the final
`trainer.save_model()` output loads in plain transformers. Runs on CPU (gloo) or GPUs.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from transformers import AutoTokenizer, TrainingArguments

import tp_plugin
from tp_plugin.integrations.trainer import TPTrainer, prepare_cpu_deepspeed
from demo_model import REPO_ROOT, default_model_dir, load_dtype  # examples/ is on sys.path: it is the script's directory
from finetune import token_chunks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="local HF model directory (default: converted SmolLM2-135M)")
    p.add_argument("--tp-size", type=int, help="default: the launch config (DeepSpeed autotp_size, ...), else world")
    p.add_argument("--deepspeed", type=str, help="DeepSpeed json (ZeRO over the data-parallel group)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="micro batch per data-parallel replica")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--eval-chunks", type=int, default=16, help="corpus chunks held out for evaluation")
    p.add_argument("--output-dir", type=pathlib.Path, default=REPO_ROOT / ".tmp" / "trainer-out")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    return p.parse_args(argv)


class Chunks(torch.utils.data.Dataset):
    """Causal-LM examples: each chunk is its own label (the model shifts)."""

    def __init__(self, chunks: torch.Tensor):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def main(argv=None) -> None:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    # without a GPU only: gloo for DeepSpeed (transformers passes it no backend); {} otherwise
    cpu_deepspeed = prepare_cpu_deepspeed() if args.deepspeed else {}
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_steps=args.save_steps,
        eval_strategy="steps", eval_steps=args.eval_steps, report_to="none", seed=0, dataloader_drop_last=True,
        deepspeed=args.deepspeed,
        # Without a GPU: gloo, and MULTI_CPU unless DeepSpeed drives the processes (see ENVIRONMENT notes)
        use_cpu=not gpu and not args.deepspeed, ddp_backend=None if gpu else "gloo", **cpu_deepspeed)
    torch.set_num_threads(1)
    _ = training_args.device  # initialises torch.distributed (the Trainer's PartialState) before the split
    if args.model is None:
        with training_args.main_process_first(desc="convert the demo model"):
            args.model = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = tp_plugin.from_pretrained(args.model, args.tp_size, dtype=load_dtype())  # this rank's slices only
    chunks = token_chunks(tokenizer, args.seq_len)
    train, held_out = Chunks(chunks[: -args.eval_chunks]), Chunks(chunks[-args.eval_chunks:])

    trainer = TPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                        processing_class=tokenizer)
    mesh = getattr(tp_plugin.tp_state(model), "mesh", None)  # None at tp=1 (an ordinary model)
    if training_args.process_index == 0:
        tp, dp = (mesh.tp_size, mesh.dp_size) if mesh is not None else (1, training_args.world_size)
        print(f"tp {tp} x dp {dp}; total batch {trainer.get_total_train_batch_size(training_args)} "
              f"= micro {args.batch_size} x accum {args.grad_accum} x dp {dp}")
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(str(args.output_dir / "final"))
    if training_args.process_index == 0:
        print(f"eval loss {metrics['eval_loss']:.4f}; saved {args.output_dir / 'final'}")


if __name__ == "__main__":
    main()
