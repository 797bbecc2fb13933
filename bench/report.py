"""Markdown tables and machine facts from the benchmark results (the JSON holds everything the tables show)."""

from __future__ import annotations

import datetime
import os
import platform

import torch

MB = 2 ** 20
PEERS = ("deepspeed_autotp", "transformers_tp")
OURS = ("tp_plugin", "tp_plugin+loss_parallel", "tp_plugin+sp", "tp_plugin+loss_parallel+sp")


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "nproc": os.cpu_count(), "cpu": cpu, "simd": " ".join(f for f in flags if f.startswith(("avx", "amx"))),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "loadavg_start": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__,
            "threads_per_rank": 1}


def config_key(row: dict) -> tuple:
    return row["shape"], row.get("layers"), row["seq"], row["dtype"], row.get("batch", 1)


def config_name(key: tuple) -> str:
    shape, layers, seq, dtype, *batch = key
    batch = batch[0] if batch else 1
    return f"{shape}{f' ({layers} layers)' if layers else ''}, {f'batch {batch} × ' if batch > 1 else ''}seq {seq}, " \
        f"{dtype}"


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(config_key(row), {})[row["variant"]] = row
    return out


def _ok(row: dict | None) -> bool:
    return row is not None and "error" not in row


def _comm_cell(comm: dict) -> str:
    kinds = [k for k in comm if k != "total"]
    if not kinds:
        return "0"
    return ", ".join(f"{comm[k]['calls']} {k.replace('_', '-')}" for k in sorted(kinds))


def step_table(rows: list[dict]) -> str:
    lines = ["| config | variant | step (s) | speed-up vs unsplit | peak RSS/rank (MB) | × unsplit | "
             "peak above start (MB) | × unsplit | params/rank (MB) | collectives/rank/step | sent/rank/step (MB) | "
             "loss step 0 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for key, variants in _groups(rows).items():
        ref = variants.get("unsplit")
        for name, row in variants.items():
            if not _ok(row):
                lines.append(f"| {config_name(key)} | {name} | failed: `{row['error']}` | | | | | | | | | |")
                continue
            speed = f"{ref['step_s'] / row['step_s']:.2f}" if _ok(ref) else "-"
            mem = f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if _ok(ref) else "-"
            above = f"{row['peak_above_start_mb'] / ref['peak_above_start_mb']:.2f}" if _ok(ref) else "-"
            lines.append(f"| {config_name(key)} | {name} | {row['step_s']:.3f} | {speed} | {row['peak_rss_mb']:.0f} | "
                         f"{mem} | {row['peak_above_start_mb']:.0f} | {above} | {row['param_mb']:.0f} | "
                         f"{_comm_cell(row['comm'])} | "
                         f"{row['comm'].get('total', {}).get('bytes', 0) / MB:.1f} | {row['loss0']:.4f} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[dict]:
    """The goals per config and tp_plugin variant, as ratios (None where a peer or the reference failed)."""
    out = []
    for key, variants in _groups(rows).items():
        ref = variants.get("unsplit")
        peers = [variants[p] for p in PEERS if _ok(variants.get(p))]
        for name in OURS:
            row = variants.get(name)
            if not _ok(row) or not _ok(ref):
                continue
            ideal = ref["step_s"] / 2 + row["comm_replay_s"]
            fastest = min(peers, key=lambda p: p["step_s"]) if peers else None
            out.append({
                "config": config_name(key), "variant": name,
                "vs_fastest_peer": row["step_s"] / fastest["step_s"] if fastest else None,
                "fastest_peer": fastest["variant"] if fastest else None,
                "vs_ideal": row["step_s"] / ideal, "ideal_s": ideal, "comm_replay_s": row["comm_replay_s"],
                "peak_vs_unsplit": row["peak_rss_mb"] / ref["peak_rss_mb"],
                "peak_above_start_vs_unsplit": row["peak_above_start_mb"] / ref["peak_above_start_mb"],
                "peak_vs_lowest_peer": row["peak_rss_mb"] / min(p["peak_rss_mb"] for p in peers) if peers else None,
                "collectives": row["comm"].get("total", {}).get("calls", 0),
                "megatron_min": row["megatron_min"]["total"]["calls"],
                "bytes_vs_min": row["comm"].get("total", {}).get("bytes", 0) / row["megatron_min"]["total"]["bytes"],
                "vs_loss_parallel": row["step_s"] / variants["tp_plugin+loss_parallel"]["step_s"]
                if name == "tp_plugin" and _ok(variants.get("tp_plugin+loss_parallel")) else None,
            })
    return out


def _mark(value, limit) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} {'✓' if value <= limit else '✗'}"


def goals_table(rows: list[dict]) -> str:
    lines = ["| config | variant | step / fastest peer (≤ 0.75) | step / ideal (≤ 1.15) | peak / unsplit (≤ 0.6) | "
             "same, above start RSS | peak / leanest peer (≤ 0.9) | step / loss_parallel (≤ 1.03) | "
             "collectives (Megatron min) | bytes / min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for g in goals(rows):
        peer = f"{_mark(g['vs_fastest_peer'], 0.75)} ({g['fastest_peer']})" if g["fastest_peer"] else "n/a"
        coll = f"{g['collectives']} ({g['megatron_min']}) {'✓' if g['collectives'] == g['megatron_min'] else '✗'}"
        lines.append(f"| {g['config']} | {g['variant']} | {peer} | {_mark(g['vs_ideal'], 1.15)} | "
                     f"{_mark(g['peak_vs_unsplit'], 0.6)} | {_mark(g['peak_above_start_vs_unsplit'], 0.6)} | "
                     f"{_mark(g['peak_vs_lowest_peer'], 0.9)} | {_mark(g.get('vs_loss_parallel'), 1.03)} | {coll} | "
                     f"{g['bytes_vs_min']:.2f} |")
    return "\n".join(lines)


def comm_table(rows: list[dict]) -> str:
    lines = ["| config | variant | all-reduce (calls / MB) | all-gather (calls / MB) | other | Megatron minimum |",
             "|---|---|---:|---:|---|---|"]
    for key, variants in _groups(rows).items():
        for name, row in variants.items():
            if name == "unsplit" or not _ok(row):
                continue
            c = row["comm"]
            cell = lambda k: f"{c[k]['calls']} / {c[k]['bytes'] / MB:.2f}" if k in c else "0"  # noqa: E731
            other = ", ".join(f"{v['calls']} {k}" for k, v in c.items() if k not in ("all_reduce", "all_gather",
                                                                                      "total")) or "-"
            m = row["megatron_min"]
            mcell = ", ".join(f"{v['calls']} {k.replace('_', '-')} / {v['bytes'] / MB:.2f} MB" for k, v in m.items()
                              if k != "total")
            lines.append(f"| {config_name(key)} | {name} | {cell('all_reduce')} | {cell('all_gather')} | {other} | "
                         f"{mcell} |")
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    """Seconds per part of the model in one step, and each part's share of the step, per config and variant."""
    from .breakdown import BUCKETS

    lines = ["| config | variant | step (s) | " + " | ".join(BUCKETS) + " |",
             "|---|---|---:|" + "---:|" * len(BUCKETS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {config_name(config_key(row))} | {row['variant']} | failed: `{row['error']}` |")
            continue
        wall, sec = row["wall_s"], row["seconds"]
        cells = " | ".join(f"{sec[b]:.3f} ({100 * sec[b] / wall:.0f}%)" for b in BUCKETS)
        lines.append(f"| {config_name(config_key(row))} | {row['variant']} | {wall:.3f} | {cells} |")
    return "\n".join(lines)


def generate_table(rows: list[dict]) -> str:
    """Prefill and per-token decode latency per variant and batch, against the unsplit model and the peers."""
    lines = ["| config | variant | prefill (ms) | per token (ms) | per token / unsplit | per token / fastest peer | "
             "tokens = unsplit's |", "|---|---|---:|---:|---:|---:|---|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(config_key(row), {})[row["variant"]] = row
    for key, variants in groups.items():
        ref = variants.get("unsplit")
        peers = [v for name, v in variants.items() if name in ("deepspeed_inference", "transformers_tp") and _ok(v)]
        fastest = min((p["per_token_s"] for p in peers), default=None)
        for name, row in variants.items():
            if not _ok(row):
                lines.append(f"| {config_name(key)} | {name} | failed: `{row['error']}` | | | | |")
                continue
            vs_ref = f"{row['per_token_s'] / ref['per_token_s']:.2f}" if _ok(ref) else "-"
            vs_peer = f"{row['per_token_s'] / fastest:.2f}" if fastest and name != "unsplit" else "-"
            lines.append(f"| {config_name(key)} | {name} | {1e3 * row['prefill_s']:.1f} | "
                         f"{1e3 * row['per_token_s']:.2f} | {vs_ref} | {vs_peer} | "
                         f"{'yes' if row.get('same_tokens') else 'no'} |")
    return "\n".join(lines)


def memory_table_md(rows: list[dict]) -> str:
    gib = 2 ** 30
    lines = ["| shape | tp | SP | params (GiB) | grads (GiB) | AdamW (GiB) | activations (GiB) | SP buffers (GiB) | "
             "total/rank (GiB) | total / ideal | weights+grads+optimizer / ideal | activations / ideal |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} (batch {r['batch']} × seq {r['seq']}) | {r['tp']} | "
                     f"{'yes' if r.get('sp') else 'no'} | {r['params'] / gib:.2f} | "
                     f"{r['grads'] / gib:.2f} | {r['optimizer'] / gib:.2f} | {r['activations'] / gib:.2f} | "
                     f"{r.get('sp_buffers', 0) / gib:.2f} | "
                     f"{r['total'] / gib:.2f} | {r['ratio_to_ideal']:.2f} | {r['weights_ratio_to_ideal']:.3f} | "
                     f"{r['activations_ratio_to_ideal']:.2f} |")
    return "\n".join(lines)


def gpu_md(gpu: dict) -> str:
    if "skipped" in gpu:
        return f"GPU section skipped: {gpu['skipped']} (the code path is untested)."
    lines = [f"{gpu['device']}, {gpu['shape']} (fake process group: compute only, rank 0 of tp)", "",
             "| tp | step (s) | step / (unsplit / tp) | peak (GiB) | peak / (unsplit / tp) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['tp']} | {r['step_s']:.4f} | {r['time_vs_ideal']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['memory_vs_ideal']:.2f} |" for r in gpu["rows"]]
    return "\n".join(lines)


def load_line(rows: list[dict]) -> str:
    """The 1-minute load average after each config's last variant: how noisy its timings are."""
    loads = {config_name(config_key(r)): r.get("loadavg_after") for r in rows}
    return "Load average (1 min) after each config, on 2 cores: " + "; ".join(
        f"{name}: {load:.1f}" for name, load in loads.items() if load is not None) + "."
