"""`tp-plugin consolidate`: a per-rank checkpoint -> an ordinary HF checkpoint, through main(argv) and the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import tp_plugin
from tp_plugin.tools import cli
from tests.dist import run_ranks
from tests.models import batch, build


def _save_sharded(rank, world, arch, out):
    model = build(arch, 4)
    tp_plugin.parallelize(model, tp_size=world)
    tp_plugin.save_sharded(model, out)


def _logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model(batch()).logits


def test_consolidate_main(tmp_path, capsys):
    run_ranks(4, _save_sharded, "gpt2", str(tmp_path / "sharded"))
    assert cli.main(["consolidate", str(tmp_path / "sharded"), str(tmp_path / "hf"), "--max-shard-size", "40KB",
                     "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    # plain transformers, one process, bit-identical weights: exactly the unsplit model's logits
    assert torch.equal(_logits(tmp_path / "hf"), build("gpt2", 4)(batch()).logits)


def test_consolidate_console_script(tmp_path):
    run_ranks(2, _save_sharded, "llama", str(tmp_path / "sharded"))
    script = Path(sys.executable).with_name("tp-plugin")  # installed by `pip install -e .` from pyproject
    done = subprocess.run([str(script), "consolidate", str(tmp_path / "sharded"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert torch.equal(_logits(tmp_path / "hf"), build("llama", 4)(batch()).logits)


def test_consolidate_errors_are_one_line(tmp_path, capsys):
    build("llama", 2).save_pretrained(tmp_path / "hf")
    assert cli.main(["consolidate", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is not a tp_plugin per-rank checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_subcommands_are_a_registry():
    assert "consolidate" in cli.COMMANDS
    help_text = cli.build_parser().format_help()
    assert "consolidate" in help_text
