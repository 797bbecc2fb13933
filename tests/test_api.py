"""The public surface: the top-level names are the integrations' own objects, `tp_plugin.inspect` prints the
unsplit and per-rank parameter counts, and importing tp_plugin under `accelerate launch`'s environment changes
nothing (no process group, Accelerate unpatched, no import hook) until a model is split.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import tp_plugin
from tests.dist import run_ranks
from tests.models import build


def test_top_level_exports():
    from tp_plugin.integrations import deepspeed, trainer

    assert tp_plugin.mpu is deepspeed.mpu
    assert tp_plugin.TPTrainerMixin is trainer.TPTrainerMixin and tp_plugin.TPTrainer is trainer.TPTrainer


def _counts(rank, world):
    ref = build("llama", 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    return model.num_parameters(), tp_plugin.inspect(model), ref.num_parameters()


def test_inspect_prints_the_unsplit_and_per_rank_parameter_counts():
    results = run_ranks(2, _counts)
    local = [r[0] for r in results]
    text, full = results[0][1], results[0][2]
    assert f"{full:,} unsplit" in text and str([f"{n:,}" for n in local]) in text, (text, local)
    assert sum(local) > full > max(local)  # each rank holds part; replicated norms count on both


def test_import_under_accelerate_launch_has_no_side_effect():
    probe = ("import accelerate, sys, torch.distributed as d; p = accelerate.Accelerator.prepare; import tp_plugin\n"
             "print(d.is_initialized(), accelerate.Accelerator.prepare is p, "
             "any(type(f).__name__ == 'RunAfterImport' for f in sys.meta_path))")
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599",
               ACCELERATE_MIXED_PRECISION="no", PARALLELISM_CONFIG_TP_SIZE="2",
               ACCELERATE_USE_PARALLELISM_CONFIG="true")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False"], out.stdout  # no group, unpatched, no import hook
