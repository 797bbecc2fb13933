"""`tp-plugin plan`'s outputs: the candidates as a table, and the recommended layout as Accelerate + DeepSpeed
configs (in the shape of `configs/`)."""

from __future__ import annotations

import json
from pathlib import Path

from .planner import MARGIN_GIB, Workload

def write_configs(best: dict, work: Workload, directory: str | Path) -> list[Path]:
    """An Accelerate yaml and the DeepSpeed json it points to, in the shape of `configs/`."""
    if best.get("pp", 1) > 1:
        raise ValueError(f"tp-plugin plan: the recommended layout has pp={best['pp']} pipeline stages, which an "
                         f"Accelerate/DeepSpeed config cannot express; run it with tp_plugin.pipeline "
                         f"(examples/pipeline_finetune.py, configs/pipeline/)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tp, dp, zero = best["tp"], best["dp"], best["zero_stage"]
    ds = {"train_micro_batch_size_per_gpu": work.micro_batch, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}}
    if tp > 1:  # the key tp_plugin reads as its TP degree (see docs/engines.md, DeepSpeed)
        ds["tensor_parallel"] = {"autotp_size": tp}
    if best.get("sequence_parallel"):  # read by parallelize (DeepSpeed ignores the section)
        ds["tp_plugin"] = {"sequence_parallel": True}
    if work.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    name = f"tp{tp}_dp{dp}_zero{zero}"
    ds_path = directory / f"ds_{name}.json"
    ds_path.write_text(json.dumps(ds, indent=2) + "\n")
    yaml_path = directory / f"accelerate_{name}.yaml"
    yaml_path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds_path}\n"
        f"num_machines: {work.nodes}\nnum_processes: {work.gpus}\n"
        "machine_rank: 0\nmain_training_function: main\n"
        f"mixed_precision: {'bf16' if work.dtype == 'bf16' else 'no'}\n"
        "same_network: true\nuse_cpu: false\n")
    return [yaml_path, ds_path]


def format_table(doc: dict) -> str:
    header = ["tp", "pp", "dp", "zero", "ckpt", "sp", "params", "grads", "optim", "acts", "step peak", "total GiB", "fits",
              "TP GiB/step"]
    rows = [header]
    for c in sorted(doc["candidates"], key=lambda c: (c["pp"], c["tp"], c["zero_stage"], c["gradient_checkpointing"])):
        m = c["memory_gib"]
        rows.append([str(c["tp"]), str(c["pp"]), str(c["dp"]), str(c["zero_stage"]), "yes" if c["gradient_checkpointing"] else "no",
                     "yes" if c["sequence_parallel"] else "no", f"{m['params']:.1f}", f"{m['grads']:.1f}",
                     f"{m['optimizer']:.1f}", f"{m['activations']:.1f}", f"{m['step_peak']:.1f}", f"{m['total']:.1f}",
                     "yes" if c["fits"] else "no", f"{c['comm_gib_per_step']['tp']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"(GiB per GPU; total = params + optim + step peak + {MARGIN_GIB:g} margin: activations and "
                 f"gradients never coexist in full)")
    best = doc["recommended"]
    lines.append("")
    lines.append("recommended: " + (f"tp={best['tp']} pp={best['pp']} dp={best['dp']} ZeRO-{best['zero_stage']}"
                                    f"{' + gradient checkpointing' if best['gradient_checkpointing'] else ''}"
                                    if best else "none"))
    lines.append(doc["reason"])
    return "\n".join(lines)
