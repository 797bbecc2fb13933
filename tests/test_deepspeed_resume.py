"""DeepSpeed checkpoints with TP=2 x DP=2: `engine.save_checkpoint` / `load_checkpoint` resume the same loss
trajectory (ZeRO-1 and ZeRO-3; ZeRO-2 uses ZeRO-1's optimizer and checkpoint code), every TP rank's shards are saved under its own `mp_rank_XX` name, and `tp_plugin.save_pretrained`
of the engine (any ZeRO stage) is an ordinary HF checkpoint that plain transformers loads with equal logits.

Tolerances: a resumed run restores the same fp32 weights and Adam moments and repeats the same
computation, so its losses equal the uninterrupted run's (we allow 1e-6 for safety against nondeterministic
reduction order in gloo; a missing or mixed-up shard or optimizer state moves them by >1e-3). The exported
model runs unsplit, so its logits differ from the split engine's only by the order of floating-point sums:
1e-5 absolute + 1e-5 relative to the logit scale, as in test_parity.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests import dist as dist_helpers
from tests.dist import run_ranks
from tests.ds_helpers import ds_config, resume_losses
from tests.models import batch

if "deepspeed" not in dist_helpers.PRELOAD:
    dist_helpers.PRELOAD.append("deepspeed")


def _resume(rank, world, runs, root):
    # ZeRO-2 checkpoints like ZeRO-1 (the same optimizer class): it only takes the export check, not the resume
    return {stage: resume_losses("llama", config, f"{root}/ckpt{stage}", f"{root}/hf{stage}", resume=stage != 2)
            for stage, config in runs}


def test_save_resume_and_export_every_stage(tmp_path):
    runs = [(stage, ds_config(stage, clip=1.0)) for stage in (1, 2, 3)]
    results = run_ranks(4, _resume, runs, str(tmp_path), timeout_s=240)
    for stage, _ in runs:
        out = results[0][stage]
        if stage != 2:
            assert out["resumed"] == pytest.approx(out["straight"], abs=1e-6), (stage, out)
            assert out["straight"][-1] < out["straight"][0], out["straight"]  # it trains: resuming is visible
            # each TP rank (mp_rank) saved its own module shards; ZeRO one optimizer file per (dp, mp) rank
            # (ZeRO-3: zero_pp_rank_{dp}_mp_rank_{tp}_model_states.pt, ZeRO-1/2: mp_rank_{tp}_model_states.pt)
            for tp_rank in ("00", "01"):
                assert any(f.endswith(f"mp_rank_{tp_rank}_model_states.pt") for f in out["files"]), out["files"]
            assert sum("optim_states" in f for f in out["files"]) == 4, out["files"]
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf{stage}", attn_implementation="eager")
        with torch.no_grad():
            logits = plain(batch(seed=7)).logits
        for r, result in enumerate(results):  # every rank's engine produced the full logits of the same model
            err = (result[stage]["probe"] - logits).abs().max().item()
            assert err <= 1e-5 + 1e-5 * logits.abs().max().item(), (stage, r, err)
