"""DeepSpeed ZeRO-1/2/3 x tensor parallelism (TP=2 x DP=2, 4 gloo ranks) against the unsplit model.

Each DeepSpeed launch runs several configs one after the other in the same ranks (DeepSpeed re-initialises
fine after `engine.destroy()`), which keeps the number of 4-rank starts (and shm-op loads) small.

Tolerances. fp32: the split only reorders floating-point sums (row-parallel partial sums, vocab-parallel
softmax, DP gradient averaging, ZeRO's flat buffers), which moves the first losses by ~1e-7. Adam divides
each update by the root of its running squared gradient, so for entries whose gradient is tiny the same
~1e-7 relative noise can change the update by a fraction of lr; over 10 steps at lr 1e-2 this grows to at
most ~5e-5 on the unclipped GPT-2 run (measured: llama <= 3.4e-6, GPT-2 4.3e-5 at a loss spike). We allow
1e-4 absolute on losses of ~4: still far below the effect of a wrong split, a missing all-reduce, a wrong DP
group or a wrongly counted grad norm (each moves the losses by 1e-2 or more within 10 steps; the clipping
test checks that clipping itself changes the trajectory by >100x the tolerance). bf16 (ZeRO-2): module
weights, activations and gradients are rounded to 8 mantissa bits (relative 2^-8 = 0.4% per operation),
against an fp32 unsplit reference; the rounding compounds over 2 layers and 10 steps (measured: 3.6e-2 on
losses falling from 4.7 to 3.1). We allow 8e-2 (2% of the loss): this test shows the bf16 path trains and
tracks the fp32 trajectory; subtle TP errors (e.g. replicated KV heads counted twice in the norm: 1.4e-2, measured) are
the fp32 tests' job, at 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests import dist as dist_helpers
from tests.dist import run_ranks
from tests.ds_helpers import CONFIGS, deepspeed_losses, ds_config, reference_losses

# Import DeepSpeed once in the forkserver (when this file starts it), not in every rank (~2 s each).
if "deepspeed" not in dist_helpers.PRELOAD:
    dist_helpers.PRELOAD.append("deepspeed")

STEPS = 10
FP32_TOL = 1e-4
BF16_TOL = 8e-2


def _parity_runs(rank, world, runs):
    """Every (name, arch, config, kwargs) in `runs` one after the other, then the unsplit references."""
    results = {name: deepspeed_losses(arch, STEPS, config, **kwargs) for name, arch, config, kwargs in runs}
    wanted = sorted({_ref_key(arch, config) for _, arch, config, _ in runs})
    return results, {key: reference_losses(key[0], STEPS, key[1], key[2]) for key in wanted}


def _ref_key(arch, config):
    return arch, config["gradient_clipping"], (config.get("tensor_parallel") or {}).get("autotp_size", 2)


RUNS = [(f"{arch} zero{stage} clip={clip}", arch, ds_config(stage, clip=clip), {})
        for arch in ("llama", "gpt2") for stage in (1, 2, 3) for clip in (0.0, 1.0)]
RUNS += [("llama zero2 bf16 clip=1.0", "llama", ds_config(2, clip=1.0, bf16=True), {}),
         ("llama zero1 explicit mpu, no autotp key", "llama", ds_config(1, clip=1.0, tp=None), {"with_mpu": True}),
         # TP=4 x DP=1: 2 KV heads on 4 ranks, each KV head replicated on 2 ranks: its rows count once in the norm
         ("llama tp4 replicated KV zero1 clip=1.0", "llama", ds_config(1, clip=1.0, tp=4), {"tp": 4})]


@pytest.fixture(scope="module")
def parity():
    """One 4-rank launch for all DeepSpeed parity runs (DeepSpeed re-initialises fine after destroy())."""
    return run_ranks(4, _parity_runs, RUNS, timeout_s=280)[0]


@pytest.mark.parametrize("name,arch,config", [r[:3] for r in RUNS], ids=[r[0] for r in RUNS])
def test_tp2_dp2_matches_unsplit(parity, name, arch, config):
    """10 optimizer steps at TP=2 x DP=2 give the unsplit model's losses on the same global batches."""
    results, refs = parity
    ref_losses, ref_norms = refs[_ref_key(arch, config)]
    tol = BF16_TOL if config.get("bf16", {}).get("enabled") else FP32_TOL
    err = max(abs(a - b) for a, b in zip(results[name], ref_losses))
    assert err <= tol, f"{name}: losses differ from the unsplit run by {err:.2e}\n{results[name]}\n{ref_losses}"
    assert ref_losses[-1] < ref_losses[0] - 0.1, f"the reference did not learn: {ref_losses}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_clipping_is_exercised(parity, arch):
    """The clipped runs really clip (most steps' norms are above 1.0) and follow a visibly different trajectory,
    so the clip=1.0 parity above checks DeepSpeed's TP-aware norm, not a no-op."""
    _, refs = parity
    (clipped, norms), (unclipped, _) = refs[(arch, 1.0, 2)], refs[(arch, 0.0, 2)]
    assert norms[0] > 1.0 and sum(n > 1.0 for n in norms) >= len(norms) // 2, norms
    assert max(abs(a - b) for a, b in zip(clipped, unclipped)) > 100 * FP32_TOL


def test_configs_load():
    """Every shipped json is a valid DeepSpeed config naming TP degree 2 and the batch/clipping keys."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from tp_plugin.launch_config import autotp_size

    files = sorted(CONFIGS.glob("*.json"))
    assert {f.stem for f in files} >= {f"zero{s}_tp2{v}" for s in (1, 2, 3) for v in ("", "_bf16")}
    for f in files:
        raw = json.loads(f.read_text())
        assert autotp_size(str(f)) == 2
        assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"} <= set(raw)
        config = DeepSpeedConfig(str(f))  # no process group: DeepSpeed validates as world size 1
        assert config.zero_optimization_stage == int(f.stem[4])
        assert config.bfloat16_config.enabled == f.stem.endswith("bf16")
        assert config.gradient_clipping == raw["gradient_clipping"]


def _bad_inputs(rank, world, bad_json, good_json):
    """Each bad input must raise a clear TPSplitError on every rank (a hang would time out instead)."""
    import sys

    import deepspeed
    from deepspeed.module_inject.layers import LinearLayer

    import tp_plugin
    from tests.models import build

    deepspeed.init_distributed()  # DeepSpeed's comm layer on the existing gloo group (its AutoTP layers use it)
    errors = {}

    def expect(name, fn, *needles):
        try:
            fn()
        except tp_plugin.TPSplitError as exc:
            missing = [n for n in needles if n not in str(exc)]
            errors[name] = f"missing {missing}: {exc}" if missing else "ok"
        else:
            errors[name] = "no error"

    # 1. tp=3 does not divide the 4 ranks; the degree comes from the --deepspeed_config json on the command line
    sys.argv = ["train.py", "--deepspeed_config", bad_json]
    expect("world not divisible", lambda: tp_plugin.parallelize(build("llama", 2)), "does not divide the world size 4")
    # 2. the json says 3, the script says 2
    expect("json vs tp_size", lambda: tp_plugin.parallelize(build("llama", 2), tp_size=2), "degree 3", "tp_size=2")
    sys.argv = ["train.py", "--deepspeed_config", good_json]
    # 3. a model DeepSpeed's AutoTP already split (its own LinearLayer on q_proj)
    autotp = build("llama", 2)
    attn = autotp.model.layers[0].self_attn
    pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]  # every rank makes both
    attn.q_proj = LinearLayer(attn.q_proj, mp_group=pairs[rank // 2])
    expect("DeepSpeed AutoTP model", lambda: tp_plugin.parallelize(autotp), "DeepSpeed AutoTP", "q_proj")

    # 4. the model is split at tp=2 but DeepSpeed is told nothing (no autotp_size, no mpu)
    def init(config):
        model = tp_plugin.parallelize(build("llama", 2))
        assert model.tp_plugin_state.plan.tp_size == 2  # read from --deepspeed_config
        deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)

    base = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": 1}}
    expect("no autotp_size in DeepSpeed config", lambda: init(base), "tp_size=2", '"autotp_size": 2')
    # 5. the DeepSpeed config given to initialize says 4 while the model is split at 2
    expect("initialize autotp 4 vs split 2",
           lambda: init({**base, "tensor_parallel": {"autotp_size": 4}}), "autotp_size=4", "tp_size=2")
    return errors


def test_bad_inputs_fail_clearly_on_every_rank(tmp_path):
    bad, good = tmp_path / "tp3.json", tmp_path / "tp2.json"
    bad.write_text(json.dumps({"tensor_parallel": {"autotp_size": 3}}))
    good.write_text(json.dumps({"tensor_parallel": {"autotp_size": 2}}))
    for rank, errors in enumerate(run_ranks(4, _bad_inputs, str(bad), str(good), timeout_s=120)):
        assert set(errors.values()) == {"ok"}, f"rank {rank}: {errors}"
