"""LoRA on split models inside the engines: DeepSpeed ZeRO at TP=2 x DP=2 and the HF Trainer (TPTrainer).

Same comparison and tolerances as test_peft.py (whose helpers these tests share): the split and the unsplit LoRA
runs differ only in the order of floating-point sums.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.models import batch
from tests.peft_parity import grad_error, replicated_identical
from tests.test_peft import (ATOL, GRAD_ATOL, STEPS, _lora_params, _randomize_lora,
                             _split_and_ref)


def _zero(rank, world, steps, stage, out_dir):
    """TP=2 x DP=2: the split LoRA model under DeepSpeed ZeRO vs. unsplit LoRA on the same global batch."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    split, ref, mesh = _split_and_ref("llama", 2, dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    group = mesh.tp_group
    _randomize_lora(split, ref, group)
    trainable = [p for p in split.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "gradient_clipping": 0.0, "tensor_parallel": {"autotp_size": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=split, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    q_proj = split.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    shape = tuple(getattr(q_proj.weight, "ds_shape", q_proj.weight.shape))  # ZeRO-3 partitions it further
    result = {"frozen_base_split": shape == (q_proj.spec.local_size, 72) and not q_proj.weight.requires_grad,
              "losses": [], "grad_err": 0.0, "replica_err": 0.0}
    for step in range(steps):
        ids = batch(seed=100, batch_size=4, seq=12)  # the global batch (one, memorised: the loss must fall)
        mine = ids[mesh.dp_rank * 2:(mesh.dp_rank + 1) * 2]             # this replica's half (same on both TP ranks)
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        # The DP-averaged gradient (ZeRO-2 holds it partitioned; this assembles it), then gathered over TP.
        grads = {n: safe_get_full_grad(p) for n, p in split.named_parameters() if p.requires_grad}
        result["grad_err"] = max(result["grad_err"], grad_error(split, ref, group, grads))
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh.dp_group)
        result["losses"].append((mean.item() / mesh.dp_size, ref_loss.item()))
        with deepspeed.zero.GatheredParameters(trainable, enabled=stage == 3):
            result["replica_err"] = max(result["replica_err"], replicated_identical(split, group, _lora_params(split)))
    # The trained adapter, saved from the engine's model on every rank: the ordinary unsplit adapter.
    import os

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    engine.module.save_pretrained(out_dir)
    saved, expected = load_file(os.path.join(out_dir, "adapter_model.safetensors")), get_peft_model_state_dict(ref)
    assert sorted(saved) == sorted(expected) and all(saved[k].shape == expected[k].shape for k in saved)
    result["saved_err"] = max((saved[k] - expected[k]).abs().max().item() for k in saved)
    engine.destroy()
    return result


def test_tp2_dp2_zero2_matches_unsplit(tmp_path):
    for r in run_ranks(4, _zero, STEPS, 2, str(tmp_path / "adapter"), timeout_s=240):
        assert r["frozen_base_split"]
        assert r["replica_err"] == 0.0, r["replica_err"]
        split, ref = zip(*r["losses"])
        assert ref[-1] < ref[0] - 0.05, f"the reference run did not learn: {ref}"
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["grad_err"] <= GRAD_ATOL, r["grad_err"]
        assert r["saved_err"] <= GRAD_ATOL, r["saved_err"]  # 5 Adam steps of lr 1e-2 from ulp-level grad noise


def _trainer(rank, world, out_dir):
    """The HF Trainer (tp_plugin's TPTrainer) trains a split LoRA model like a plain loop trains the unsplit one."""
    from transformers import TrainingArguments

    from tp_plugin.integrations.trainer import TPTrainer

    split, ref, mesh = _split_and_ref("llama", 2, {})
    _randomize_lora(split, ref, mesh.tp_group)
    ids = batch(seed=0)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]  # one batch = the whole data set
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=len(ids),
                             learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = TPTrainer(model=split, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ref_losses = []
    for _ in range(STEPS):
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    trainer.save_model(out_dir)  # TPTrainer saves a LoRA model as the ordinary adapter (every rank joins)
    return {"losses": list(zip(losses, ref_losses)), "replica_err": replicated_identical(split, mesh.tp_group, _lora_params(split))}


def test_trainer_trains_split_lora_like_unsplit(tmp_path):
    import os

    for r in run_ranks(2, _trainer, str(tmp_path / "trainer")):
        split, ref = zip(*r["losses"])
        assert len(split) == STEPS and ref[-1] < ref[0] - 0.05, r["losses"]
        assert split == pytest.approx(ref, abs=ATOL), r["losses"]
        assert r["replica_err"] == 0.0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "trainer"))
