"""`tp-plugin plan` on config-only directories of public shapes: exact parameter bytes per rank, the standard
answers (70B full fine-tuning does not fit on 8 x 80 GiB, LoRA does, TP stays inside a node), the JSON document,
the written configs, a calibration against a real 2-rank run, and the topology warning.

Calibration tolerance: 10% (the issue's bar). Parameters are exact by construction; the activation prediction
extrapolates a 1- and 2-layer meta-device measurement, so it differs from a real run only where the real kernels
save differently from the planner's flash-attention pattern.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import transformers

from bench.shapes import LLAMA3_8B, LLAMA3_70B, SMOLLM2_135M
from tests.dist import run_ranks
from tp_plugin.tools import planner, planner_report

QWEN25_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=32768)
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
SHAPES = {"llama3-8b": (transformers.LlamaConfig, LLAMA3_8B), "llama3-70b": (transformers.LlamaConfig, LLAMA3_70B),
          "qwen2.5-32b": (transformers.Qwen2Config, QWEN25_32B), "mixtral-8x7b": (transformers.MixtralConfig,
                                                                                 MIXTRAL_8X7B),
          "smollm2-135m": (transformers.LlamaConfig, SMOLLM2_135M)}


def _config_dir(tmp_path, name):
    cls, kwargs = SHAPES[name]
    directory = tmp_path / name
    cls(**kwargs).save_pretrained(directory)  # config.json only: no weights anywhere
    return directory


def _split_params(config, tp: int, rank: int) -> int:
    """Parameters tp_plugin actually holds on `rank` of `tp` (meta device, fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tp_plugin.split import split_model

    model = planner.meta_model(config, torch.bfloat16)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    try:
        split_model(model, tp)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_bytes_per_rank_are_the_split_models(tmp_path, name):
    config = planner.load_config(str(_config_dir(tmp_path, name)))
    plans = planner.split_degrees(planner.meta_model(config, torch.bfloat16), 8)
    assert {1, 2, 4, 8} <= set(plans) or name == "smollm2-135m", sorted(plans)  # 9 heads / 3 KV heads: tp <= 3
    for tp in sorted(plans)[1:]:
        for rank in (0, tp - 1):
            assert plans[tp].rank_parameters[rank] == _split_params(config, tp, rank), (name, tp, rank)


def test_70b_full_fine_tuning_does_not_fit_on_8x80_but_lora_does(tmp_path):
    config = planner.load_config(str(_config_dir(tmp_path, "llama3-70b")))
    full = planner.plan_document(config, planner.Workload(gpus=8, gpu_memory_gib=80, seq=4096))
    assert full["recommended"] is None and not any(c["fits"] for c in full["candidates"])
    tp8 = next(c for c in full["candidates"] if c["tp"] == 8 and c["zero_stage"] == 0)
    states = tp8["memory_gib"]["params"] + tp8["memory_gib"]["grads"] + tp8["memory_gib"]["optimizer"]
    assert states == pytest.approx(16 * 70.55e9 / 8 / 2 ** 30, rel=0.01)  # bf16 AdamW: 16 bytes per parameter
    lora = planner.plan_document(config, planner.Workload(gpus=8, gpu_memory_gib=80, seq=4096, lora=True))
    assert lora["recommended"] is not None and lora["recommended"]["fits"]


def test_multi_node_keeps_tp_inside_a_node_and_the_document_has_its_fields(tmp_path, capsys):
    from tp_plugin.tools.cli import main

    directory = _config_dir(tmp_path, "llama3-70b")
    # LoRA at sequence 32768: the activations need tensor parallelism, 2 nodes of 8 GPUs offer tp up to 16
    assert main(["plan", str(directory), "--gpus", "16", "--nodes", "2", "--gpu-memory", "80", "--seq", "32768",
                 "--lora", "--json", "--write-configs", str(tmp_path / "out")]) == 0
    doc = json.loads(capsys.readouterr().out)
    best = doc["recommended"]
    assert best is not None and 1 < best["tp"] <= 8 and best["tp"] * best["dp"] == 16, best
    assert any(c["tp"] == 16 for c in doc["candidates"])  # offered, with its note, but not recommended
    for c in doc["candidates"]:
        assert {"tp", "pp", "dp", "zero_stage", "sequence_parallel", "gradient_checkpointing", "fits", "memory_gib",
                "comm_gib_per_step", "notes"} <= set(c)
        assert {"params", "grads", "optimizer", "activations", "total"} <= set(c["memory_gib"])
        if c["tp"] > 8:
            assert any("spans nodes" in n for n in c["notes"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 2 and any(n.endswith(".yaml") for n in written), written
    ds = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert ds["zero_optimization"]["stage"] == best["zero_stage"]


def _measured(rank, world, config_kwargs, seq):
    """A real 2-rank split of a small Llama (fp32): parameters held and activation bytes saved in one forward."""
    import tp_plugin

    torch.manual_seed(0)
    model = tp_plugin.parallelize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs)),
                                  tp_size=2, loss_parallel=True)
    model.train()
    model(torch.zeros(1, seq, dtype=torch.long), labels=torch.zeros(1, seq, dtype=torch.long))  # the one-off check
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ids = torch.randint(3, 1000, (1, seq))
    with planner.flash_attention():
        store = {p.untyped_storage()._cdata for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage()._cdata not in store:
                seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
    return params, sum(seen.values())


def test_calibration_against_a_real_two_rank_run():
    kwargs = {**SMOLLM2_135M, "num_hidden_layers": 6, "vocab_size": 8000}
    seq = 256
    config = transformers.LlamaConfig(**kwargs)
    predicted_acts = planner.activation_bytes(config, 2, 1, seq, torch.float32)
    layers = config.num_hidden_layers
    predicted = predicted_acts["outside"] + layers * predicted_acts["per_layer"]
    plan = planner.split_degrees(planner.meta_model(config, torch.float32), 2)[2]
    for rank, (params, acts) in enumerate(run_ranks(2, _measured, kwargs, seq)):
        assert params == plan.rank_parameters[rank]
        # the planner measures TP rank 0, which holds the most heads (6 of 9 here; rank 1 holds 3): its bytes are
        # rank 0's to the byte, and above every other rank's
        assert (predicted == acts) if rank == 0 else (acts < predicted), (rank, predicted, acts)


def _step_peak(rank, world, config_kwargs, seq):
    """Peak resident memory above the start of a steady-state training step (after the first, which creates
    AdamW's states): the smallest of steps 2-4."""
    import ctypes
    import gc
    import re

    import tp_plugin

    def status_kb(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))

    # Tensors of 64 KiB and more get their own mapping, returned to the system when freed: glibc's threshold
    # otherwise grows after frees, and later tensors come from a heap that keeps freed memory resident.
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    torch.manual_seed(0)
    model = tp_plugin.parallelize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs)),
                                  tp_size=2, loss_parallel=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 1000, (1, seq))
    peaks = []
    for step in range(4):
        if step:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            start = status_kb("VmRSS")
        with planner.flash_attention():
            model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            peaks.append((status_kb("VmHWM") - start) * 1024)
    return min(peaks)  # (with the fixed threshold the 3 steps agree; min guards against a stray page)


def test_calibration_of_a_training_steps_peak_resident_memory():
    """What a step adds on top of the resident weights and optimizer states (`step_peak`: activations, gradients
    and temporaries at their largest coexistence). With glibc's mmap threshold fixed the measurement repeats to
    the byte; measured/predicted here 1.05x (rank 0) / 0.97x (rank 1, which holds fewer heads than the rank-0
    prediction); at seq 256: 1.00x / 0.97x; at 12 layers, seq 512: 1.03x / 0.93x."""
    kwargs = {**SMOLLM2_135M, "num_hidden_layers": 6, "vocab_size": 8000}
    seq = 1024  # at seq 256 the allocator's own noise was +-10% of the step's memory (0.93x-1.15x over 4 runs)
    work = planner.Workload(gpus=2, gpu_memory_gib=80, seq=seq, dtype="fp32", device="cpu",
                            gradient_checkpointing=False)
    best = next(c for c in planner.candidates(transformers.LlamaConfig(**kwargs), work) if c.tp == 2)
    predicted = best.memory_gib["step_peak"] * 2 ** 30
    for measured in run_ranks(2, _step_peak, kwargs, seq):
        assert abs(measured - predicted) <= 0.10 * predicted, (measured, predicted)


def _topology(rank, world):
    from tp_plugin.mesh import build_mesh, topology_warning

    os.environ["TP_PLUGIN_HOSTNAME"] = f"node{rank}"  # two simulated hosts
    split = topology_warning(build_mesh(2, "cpu"))
    os.environ["TP_PLUGIN_HOSTNAME"] = "node0"
    same = topology_warning(build_mesh(2, "cpu"))
    del os.environ["TP_PLUGIN_HOSTNAME"]
    return split, same


def test_topology_warning_when_the_tp_group_spans_hosts():
    for split, same in run_ranks(2, _topology):
        assert split is not None and "spans 2 hosts" in split and "Keep TP inside a node" in split, split
        assert same is None


def test_sequence_parallel_layouts_are_measured_and_recommended_when_they_fit(tmp_path):
    # Llama-3-8B at seq 16384 on 8 x 80 GiB, no checkpointing: the replicated activations of plain TP do not fit
    # at tp=2; with sequence parallelism (measured on the split model, not estimated) they do
    config = planner.load_config(str(_config_dir(tmp_path, "llama3-8b")))
    work = planner.Workload(gpus=8, gpu_memory_gib=80, seq=16384, sequence_parallel=True, gradient_checkpointing=False)
    doc = planner.plan_document(config, work)
    by = {(c["tp"], c["zero_stage"], c["sequence_parallel"]): c for c in doc["candidates"]}
    # per layer, plain TP keeps 1.31x / 1.92x / 3.15x the unsplit activations / tp at tp = 2 / 4 / 8 and SP 1.0x
    # (tests/test_sequence_parallel.py), so SP's activations are about 1 / those ratios of plain TP's; + 15% for
    # what SP does not split: the part outside the layers (the embedding's output, the loss's logits shard) and
    # the one gathered region input (3-10% of the total here)
    for tp, most in ((2, 1.15 / 1.31), (4, 1.15 / 1.92), (8, 1.15 / 3.15)):
        plain, sp = by[(tp, 1 if tp < 8 else 0, False)], by[(tp, 1 if tp < 8 else 0, True)]
        ratio = sp["memory_gib"]["activations"] / plain["memory_gib"]["activations"]
        assert ratio < most, (tp, ratio)
    assert doc["recommended"]["sequence_parallel"] and doc["recommended"]["fits"], doc["recommended"]
    planner_report.write_configs(doc["recommended"], work, tmp_path / "out")
    ds = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert ds["tp_plugin"] == {"sequence_parallel": True}


def test_pipeline_stage_candidates():
    """A 70B-class model on 2 nodes x 8 GPUs: `plan` also lists layouts with pipeline stages (tp x pp x dp = 16;
    DDP, ZeRO-1 or FSDP2 counted as ZeRO-2, as pipelines allow), whose weights per GPU are about 1/pp of the same TP degree's without
    stages. (Here nothing fits in 80 GiB either way: ZeRO-3 at pp=1 needs 84.6 GiB, pp=2 86.6.) A recommended
    pipeline layout cannot be written as an Accelerate/DeepSpeed config: refused with the way to run it."""
    config = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    work = planner.Workload(gpus=16, gpu_memory_gib=80, nodes=2, seq=1024, gradient_checkpointing=True)
    doc = planner.plan_document(config, work)
    staged = [c for c in doc["candidates"] if c["pp"] > 1]
    assert staged and all(c["tp"] * c["pp"] * c["dp"] == 16 and c["zero_stage"] <= 2 for c in staged)
    pp2 = next(c for c in staged if (c["tp"], c["pp"], c["zero_stage"]) == (8, 2, 0))
    flat = next(c for c in doc["candidates"] if (c["tp"], c["pp"], c["zero_stage"]) == (8, 1, 0))
    assert 0.48 < pp2["memory_gib"]["params"] / flat["memory_gib"]["params"] < 0.55
    with pytest.raises(ValueError, match="tp_plugin.pipeline"):
        planner_report.write_configs(pp2, work, "unused")
