"""The HF Trainer on a split model (TPTrainer): TP=2 x DP=2 matches one process, checkpoints resume exactly,
and the saved model is an ordinary checkpoint.

Every run uses the sequential sampler, so each optimizer step sees the same global batch (samples
[8s, 8s + 8)) whether it is one process with micro batch 8 or two DP replicas of micro batch 4.
`max_grad_norm` stays at the Trainer's default 1.0, so clipping with the TP-correct norm is exercised.

Tolerances: split vs. one process differ only in the order of fp32 sums (row-parallel partial sums,
vocab-parallel softmax, the DDP average over DP); after 6 AdamW steps on losses of order 5 that is ~1e-6, we
allow 1e-5. A resumed run restores the same weights, optimizer state and data position, so its losses equal
the uninterrupted run's exactly (0 difference, asserted with 1e-6 only to allow printing round-trips). The
plain-transformers reload compares logits of order 1 after a float32 round trip through safetensors: equal up
to the TP summation order, 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import build

STEPS, SAVE_AT, GLOBAL, SEQ = 6, 3, 8, 12
ATOL = 1e-5


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.data = torch.randint(3, 101, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _trainer(model, out, micro, **overrides):
    from transformers import TrainingArguments

    from tp_plugin.integrations.trainer import TPTrainer

    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=micro,
                    per_device_eval_batch_size=micro, learning_rate=1e-2, lr_scheduler_type="linear",
                    logging_steps=1, save_steps=SAVE_AT, report_to="none", seed=0, use_cpu=True,
                    ddp_backend="gloo", train_sampling_strategy="sequential", disable_tqdm=True)
    args = TrainingArguments(**{**settings, **overrides})
    return TPTrainer(model=model, args=args, train_dataset=_Chunks(STEPS * GLOBAL, 1), eval_dataset=_Chunks(8, 2))


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _split_run(rank, world, out):
    from transformers import AutoModelForCausalLM

    dp = world // 2
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    trainer = _trainer(model, out, GLOBAL // dp)
    total = trainer.get_total_train_batch_size(trainer.args)
    trainer.train()
    full = _losses(trainer)
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(f"{out}/final")

    # the saved model in plain transformers: same logits as the split model
    ids = _Chunks(2, 5).data
    model.eval()
    with torch.no_grad():
        split_logits = model(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(f"{out}/final", dtype=torch.float32)
    with torch.no_grad():
        logits_err = (plain(ids).logits - split_logits).abs().max().item()

    # resume from the step-3 checkpoint with a freshly built (differently seeded) split model
    model2 = tp_plugin.parallelize(build("llama", 2, seed=7), tp_size=2)
    resumed = _trainer(model2, out, GLOBAL // dp)
    resumed.train(resume_from_checkpoint=f"{out}/checkpoint-{SAVE_AT}")
    torch.distributed.barrier()
    files = sorted(p.name for p in Path(f"{out}/checkpoint-{SAVE_AT}").iterdir())
    return {"losses": full, "resumed": _losses(resumed), "eval": eval_loss, "total": total,
            "logits_err": logits_err, "files": files, "epoch": trainer.state.epoch}


def _single_run(rank, world, out):
    trainer = _trainer(build("llama", 2), out, GLOBAL)
    trainer.train()
    return {"losses": _losses(trainer), "eval": trainer.evaluate()["eval_loss"], "epoch": trainer.state.epoch}


def test_trainer_tp2_dp2_checkpoint_resume_and_plain_reload(tmp_path):
    ref = run_ranks(1, _single_run, tmp_path / "single")[0]
    results = run_ranks(4, _split_run, tmp_path / "split")
    assert len(ref["losses"]) == STEPS
    for r in results:
        assert r["total"] == GLOBAL  # micro 4 x accum 1 x DP 2, not x world 4
        assert abs(r["epoch"] - ref["epoch"]) < 1e-9  # steps per epoch counted over DP replicas
        for step, loss in ref["losses"].items():
            assert abs(r["losses"][step] - loss) <= ATOL, (step, r["losses"], ref["losses"])
        assert abs(r["eval"] - ref["eval"]) <= ATOL, (r["eval"], ref["eval"])
        # the resumed Trainer's history starts with the checkpoint's (steps 1-3), then its own steps 4-6
        assert sorted(r["resumed"]) == list(range(1, STEPS + 1)), r["resumed"]
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert abs(r["resumed"][step] - r["losses"][step]) <= 1e-6, (step, r["resumed"], r["losses"])
        assert r["logits_err"] <= ATOL, r["logits_err"]
    files = results[0]["files"]
    assert "model.safetensors" in files and "config.json" in files, files
    assert {"optimizer.tp-rank-0-of-2.pt", "optimizer.tp-rank-1-of-2.pt", "scheduler.pt"} <= set(files), files
    assert {f"rng_state_{r}.pth" for r in range(4)} <= set(files), files


# ---- label smoothing: the Trainer's loss from the logits ---------------------------------------------------

def _smoothed(rank, world, out):
    model = build("llama", 2)
    model = tp_plugin.parallelize(model, tp_size=2) if world > 1 else model
    trainer = _trainer(model, out, GLOBAL, max_steps=3, label_smoothing_factor=0.1, save_strategy="no")
    trainer.train()
    return _losses(trainer)


def test_trainer_label_smoothing_matches_one_process(tmp_path):
    # the Trainer's LabelSmoother takes its loss from outputs["logits"] (the model gets no labels): the logits
    # of each training forward are read, so computed, under DDP with find_unused_parameters (the default)
    ref = run_ranks(1, _smoothed, tmp_path / "single")[0]
    for losses in run_ranks(2, _smoothed, tmp_path / "split"):
        assert len(losses) == 3 and all(abs(losses[s] - ref[s]) <= ATOL for s in ref), (losses, ref)


# ---- a plain Trainer on a split model ----------------------------------------------------------------------

def _plain_trainer(rank, world, out):
    from transformers import Trainer, TrainingArguments

    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
    try:
        Trainer(model=model, args=args, train_dataset=_Chunks(8, 1)).train()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_plain_trainer_error_names_tptrainer(tmp_path):
    for message in run_ranks(2, _plain_trainer, str(tmp_path / "t")):
        assert message is not None and "tp_plugin.TPTrainer" in message and "TPTrainerMixin" in message, message
