"""A plain TRL script: `SFTTrainer` given the model as a path (TRL loads it); no tp_plugin in it.

    python sft_from_path.py MODEL_DIR TEXT_FILE OUT_DIR REPORT   (under torchrun, with or without tp-plugin launch)
"""

import json
import os
import sys
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

model_dir, text_file, out_dir, report = sys.argv[1:5]
lines = [line for line in Path(text_file).read_text().splitlines() if line.strip()][:32]
args = SFTConfig(output_dir=out_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                 report_to="none", seed=0, use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no",
                 ddp_backend="gloo", max_length=32, dataset_text_field="text", train_sampling_strategy="sequential")
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_dict({"text": lines}))
trainer.train()
trainer.save_model()
history = [{k: h[k] for k in ("loss", "num_tokens", "entropy", "mean_token_accuracy") if k in h}
           for h in trainer.state.log_history if "loss" in h]
Path(f"{report}.{os.environ.get('RANK', '0')}").write_text(json.dumps(
    {"history": history, "params": sum(p.numel() for p in trainer.model.parameters())}))
# What a careful script ends with: without it, gloo's threads can abort the interpreter's exit ("terminate called
# without an active exception", seen once in the suite on this 2-core machine) after all the work is done.
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
