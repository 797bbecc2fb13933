"""Every CPU config in configs/accelerate/ runs examples/finetune.py through the real `accelerate launch`.

Short runs (2 steps) of a tiny random Llama that uses the demo tokenizer. The four TP=2 x DP=2 configs
(DDP, ZeRO-2, ZeRO-3, FSDP2) see the same global batches (corpus order, micro batch 2 on each of 2 replicas), so
their losses must agree: they differ only in how the data-parallel gradients are averaged (DDP all-reduce vs.
ZeRO / FSDP2 reduce-scatter), i.e. in the order of fp32 sums: 1e-5 on losses of order 10. The TP=2 config (one
replica) sees half the global batch, so it only has to run. Every run's final save must load in plain
transformers.

The same configs also run a plain Accelerate script in the usual order (`Accelerator()` first, no tp_plugin in it)
under `tp-plugin launch`, against the unsplit model.

These are the slow tests of the Accelerate integration: each launch starts 2 or 4 Python processes that import
torch, transformers, accelerate (and DeepSpeed) on this machine's cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["cpu_tp2", "cpu_tp2_dp2", "cpu_tp2_dp2_zero2", "cpu_tp2_dp2_zero3", "cpu_tp2_fsdp2"]


def _launch(config: str, model: Path, out: Path, *extra: str, steps: int = 2, script: str = "finetune.py") -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)  # the point: the yaml alone must be enough
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           f"configs/accelerate/{config}.yaml", f"examples/{script}", "--model", str(model), "--max-steps", str(steps),
           "--batch-size", "2", "--seq-len", "32", "--no-shuffle", "--no-generate", "--log-every", "1",
           "--output-dir", str(out / "final"), "--losses-json", str(out / "losses.json"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("config", ["cpu_tp2", "cpu_tp2_dp2_zero3"])
def test_config_runs_through_accelerate_launch(config, tiny_model, tmp_path):
    """The explicit route of docs/engines.md (`parallelize` before `Accelerator()`); the other configs run this route in the
    resume tests below and the usual order in `test_usual_order_under_tp_plugin_launch`."""
    from transformers import AutoModelForCausalLM

    result = _launch(config, tiny_model, tmp_path)
    tp, dp = 2, (1 if config == "cpu_tp2" else 2)
    assert (result["tp"], result["dp"]) == (tp, dp), result
    assert result["global_batch"] == 2 * dp and result["samples"] == 2 * 2 * dp, result  # micro x accum x DP
    assert len(result["losses"]) == 2 and all(5 < x < 15 for x in result["losses"]), result
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    assert saved.config.num_attention_heads == 4 and saved.model.embed_tokens.weight.shape == (49152, 32)


def _loop(out: Path, model: Path, *launch: str) -> list[dict]:
    """examples/accelerate_loop.py (plain Accelerate, `Accelerator()` first, no tp_plugin) under `launch`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)
    out.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    cmd = [*(str(bin_dir / c) if i == 0 else c for i, c in enumerate(launch)), "examples/accelerate_loop.py",
           "--model", str(model), "--text", "examples/data/corpus.txt", "--output-dir", str(out / "final"),
           "--report", str(out)]
    if launch[0] == "accelerate" and "--config_file" not in launch:  # the unsplit reference: DDP on 2 CPU ranks
        env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [json.loads(p.read_text()) for p in sorted(out.glob("report-*.json"))]


def test_usual_order_under_tp_plugin_launch(tiny_model, tmp_path):
    """A plain Accelerate script in the usual order (`Accelerator()`, `from_pretrained`, `prepare`), unchanged, under
    `tp-plugin launch -- accelerate launch --config_file X`: the TP=2 x DP=2 CPU configs DDP, ZeRO-3 and FSDP2
    (ZeRO-2 goes through Accelerate's same DeepSpeed preparation as ZeRO-3; it runs in the explicit order in
    test_accelerate and under the launcher with the Trainer in test_launch) against the
    unsplit model under DDP on 2 ranks (the same global batch of 4). Losses: only the order of
    fp32 sums differs (1e-5 on losses of order 10); each rank holds half the model (the vocabulary and the layers
    split, norms replicated); the saved checkpoint is the unsplit run's after 3 AdamW steps of lr 1e-3 (2e-5: AdamW
    moves a weight by ~lr whatever its gradient's size, so ulp-level differences of near-zero gradient components
    show up to ~7e-6, seen under ZeRO-3)."""
    from transformers import AutoModelForCausalLM

    ref = _loop(tmp_path / "ref", tiny_model, "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "0")
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "final", dtype=torch.float32)
    for config in ("cpu_tp2_dp2", "cpu_tp2_dp2_zero3", "cpu_tp2_fsdp2"):
        runs = _loop(tmp_path / config, tiny_model, "tp-plugin", "launch", "--", str(Path(sys.executable).parent /
                     "accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml")
        assert len(runs) == 4, runs
        for run in runs:
            assert run["processes"] == 4 and max(abs(a - b) for a, b in zip(run["losses"], ref[0]["losses"])) <= 1e-5, \
                (config, run, ref[0])
            assert 0.49 < run["params"] / ref[0]["params"] < 0.51, (config, run["params"], ref[0]["params"])
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / config / "final", dtype=torch.float32)
        err = max((a - b).abs().max().item() for a, b in zip(saved.parameters(), ref_model.parameters()))
        assert err <= 2e-5, (config, err)


def test_lora_demo_runs_through_accelerate_launch(tiny_model, tmp_path):
    """`make demo`'s second job: LoRA on the split model, then the adapter reloaded by plain PEFT (--check)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "configs/accelerate/cpu_tp2.yaml",
           "examples/lora_finetune.py", "--model", str(tiny_model), "--max-steps", "2", "--no-generate", "--check",
           "--output-dir", str(tmp_path / "adapter")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("config", ["cpu_tp2_fsdp2", "cpu_tp2_dp2"])
def test_interrupted_and_resumed_run_gives_the_uninterrupted_losses(config, tiny_model, tmp_path):
    """TP=2 x DP=2 (FSDP2, DDP): 4 steps in one go, against 2 steps + `accelerator.save_state` + a new launch
    that `load_state`s and runs steps 3 and 4. Each TP rank's model and optimizer shards are their own DCP
    checkpoint over the DP group (`tp_plugin.integrations.accelerate.fsdp_state` / `accelerate_ddp_state`); the resumed
    losses and final weights are the uninterrupted ones (the same arithmetic on the same state: 1e-6). Before:
    under FSDP2, DCP kept one TP rank's shards under the names both ranks share; under DDP, Accelerate saved
    rank 0's model and optimizer only (resumed losses 10.8068 instead of 10.8075)."""
    from safetensors.torch import load_file

    whole = _launch(config, tiny_model, tmp_path / "whole", steps=4)
    state = tmp_path / "state"
    first = _launch(config, tiny_model, tmp_path / "first", "--stop-after", "2", "--save-state", str(state), steps=4)
    for kind in ("tp_plugin_model_0", "tp_plugin_optimizer_0"):
        assert sorted(p.name for p in (state / kind).iterdir()) == ["tp-rank-0-of-2", "tp-rank-1-of-2"]
    assert not (state / "model.safetensors").exists()
    second = _launch(config, tiny_model, tmp_path / "second", "--resume", str(state), steps=4)
    resumed = first["losses"] + second["losses"]
    assert len(resumed) == 4 and max(abs(a - b) for a, b in zip(resumed, whole["losses"])) <= 1e-6, \
        (resumed, whole["losses"])
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), \
        load_file(tmp_path / "second" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_lora_on_fsdp2_runs_through_accelerate_launch(tiny_model, tmp_path):
    """LoRA (TP-aware adapters) on the split model under the FSDP2 config; the adapter reloads in plain PEFT."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           "configs/accelerate/cpu_tp2_fsdp2.yaml", "examples/lora_finetune.py", "--model", str(tiny_model),
           "--max-steps", "2", "--no-generate", "--check", "--output-dir", str(tmp_path / "adapter")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
