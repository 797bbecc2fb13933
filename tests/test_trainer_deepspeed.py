"""TPTrainer with `TrainingArguments(deepspeed=...)`: ZeRO-2 over the data-parallel group at TP=2 x DP=2 matches
a one-process Trainer, and resuming from a checkpoint (the engine's per-rank checkpoint plus consolidated
weights) continues the same losses. Same setup and tolerances as tests/test_trainer.py."""

from __future__ import annotations

import tp_plugin
from tests.dist import run_ranks
from tests.models import build
from tests.test_trainer import ATOL, GLOBAL, SAVE_AT, STEPS, _losses, _single_run, _trainer

DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2}}


def _deepspeed_run(rank, world, out, resume):
    """One Trainer per process: Accelerate allows a single DeepSpeed-configured state per process."""
    from tp_plugin.integrations.trainer import prepare_cpu_deepspeed

    dp = world // 2
    extra = prepare_cpu_deepspeed()  # no GPU here: gloo for DeepSpeed
    # a fresh, differently seeded model for the resumed run: everything must come from the checkpoint
    model = tp_plugin.parallelize(build("llama", 2, seed=7 if resume else 0), tp_size=2)  # = the config's autotp_size
    trainer = _trainer(model, out, GLOBAL // dp, deepspeed=DS_CONFIG, use_cpu=False, **extra)
    trainer.train(resume_from_checkpoint=f"{out}/checkpoint-{SAVE_AT}" if resume else None)
    return {"losses": _losses(trainer), "stage": trainer.model_wrapped.zero_optimization_stage(),
            "total": trainer.get_total_train_batch_size(trainer.args)}


def test_trainer_deepspeed_zero2_tp2_dp2_matches_and_resumes(tmp_path):
    ref = run_ranks(1, _single_run, tmp_path / "single")[0]
    results = run_ranks(4, _deepspeed_run, tmp_path / "ds", False, timeout_s=300)
    resumed = run_ranks(4, _deepspeed_run, tmp_path / "ds", True, timeout_s=300)
    for r, again in zip(results, resumed):
        assert r["stage"] == 2 and r["total"] == GLOBAL
        for step, loss in ref["losses"].items():
            assert abs(r["losses"][step] - loss) <= ATOL, (step, r["losses"], ref["losses"])
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert abs(again["losses"][step] - r["losses"][step]) <= 1e-6, (step, again["losses"], r["losses"])
