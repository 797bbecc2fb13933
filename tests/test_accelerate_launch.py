"""Every CPU config in configs/accelerate/ runs examples/finetune.py through the real `accelerate launch`.

Short runs (2 steps) of a tiny random Llama that uses the demo tokenizer. The three TP=2 x DP=2 configs
(DDP, ZeRO-2, ZeRO-3) see the same global batches (corpus order, micro batch 2 on each of 2 replicas), so
their losses must agree: they differ only in how the data-parallel gradients are averaged (DDP all-reduce vs.
ZeRO reduce-scatter), i.e. in the order of fp32 sums: 1e-5 on losses of order 10. The TP=2 config (one
replica) sees half the global batch, so it only has to run. Every run's final save must load in plain
transformers.

These are the slow tests of the Accelerate integration: each launch starts 2 or 4 Python processes that import
torch, transformers, accelerate (and DeepSpeed) on this machine's cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["cpu_tp2", "cpu_tp2_dp2", "cpu_tp2_dp2_zero2", "cpu_tp2_dp2_zero3"]
_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the demo model's tokenizer (its vocabulary: the corpus tokenises the same)."""
    import transformers

    sys.path.insert(0, str(REPO / "examples"))
    from demo_model import default_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, out / name)
    return out


def _launch(config: str, model: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)  # the point: the yaml alone must be enough
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           f"configs/accelerate/{config}.yaml", "examples/finetune.py", "--model", str(model), "--max-steps", "2",
           "--batch-size", "2", "--seq-len", "32", "--no-shuffle", "--no-generate", "--log-every", "1",
           "--output-dir", str(out / "final"), "--losses-json", str(out / "losses.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_through_accelerate_launch(config, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _launch(config, tiny_model, tmp_path)
    tp, dp = 2, (1 if config == "cpu_tp2" else 2)
    assert (result["tp"], result["dp"]) == (tp, dp), result
    assert result["global_batch"] == 2 * dp and result["samples"] == 2 * 2 * dp, result  # micro x accum x DP
    assert len(result["losses"]) == 2 and all(5 < x < 15 for x in result["losses"]), result
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    assert saved.config.num_attention_heads == 4 and saved.model.embed_tokens.weight.shape == (49152, 32)
    _RESULTS[config] = result
    dp2 = [c for c in CONFIGS[1:] if c in _RESULTS]
    for other in dp2:
        diffs = [abs(a - b) for a, b in zip(_RESULTS[other]["losses"], _RESULTS[dp2[0]]["losses"])]
        assert max(diffs) <= 1e-5, (other, _RESULTS[other]["losses"], dp2[0], _RESULTS[dp2[0]]["losses"])


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
