"""Causal-LM fine-tuning with the plain Hugging Face `Trainer`, written like transformers'
`examples/pytorch/language-modeling/run_clm.py`; there is no tp_plugin in it.

    tp-plugin launch -- torchrun --nproc_per_node 4 examples/train_clm.py --model_name_or_path DIR \\
        --train_file examples/data/corpus.txt --output_dir out --max_steps 30 --use_cpu
    tp-plugin launch -- accelerate launch --config_file configs/accelerate/cpu_tp2.yaml examples/train_clm.py ...
    ... examples/train_clm.py ... --deepspeed configs/accelerate/ds_zero2_tp2.json     # ZeRO-2 as the DP axis

Under `tp-plugin launch` the model comes out of `from_pretrained` split over the launch's TP degree (`--tp`, or
the config's), and the `Trainer` trains it as `TPTrainer` would; the saved model is an ordinary checkpoint.
Without the launcher the same command trains the unsplit model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments,
                          default_data_collator, set_seed)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a local model directory"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or auto"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "a text file"})
    block_size: int = field(default=32)
    report_file: str | None = field(default=None, metadata={"help": "json with the losses and parameters per rank"})


def main() -> None:
    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)

    ids = tokenizer(Path(data_args.train_file).read_text())["input_ids"]
    n = len(ids) // data_args.block_size * data_args.block_size
    blocks = [ids[i:i + data_args.block_size] for i in range(0, n, data_args.block_size)]
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})

    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator,
                      processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    if data_args.report_file:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        params = sum(p.numel() for p in model.parameters())
        path = f"{data_args.report_file}.{os.environ.get('RANK', '0')}"
        Path(path).write_text(json.dumps({"losses": losses, "params": params,
                                          "trainer": [c.__name__ for c in type(trainer).__mro__[:3]]}))


if __name__ == "__main__":
    main()
