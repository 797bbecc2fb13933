"""Benchmark (not a test): load time and peak resident memory per rank when loading a checkpoint split at tp=2.

    python bench/load_checkpoint.py                      # SmolLM2-135M, then the generated ~1.1B Llama
    python bench/load_checkpoint.py --models smollm2     # only the small one (about a minute)

Variants, each in fresh processes (2 gloo ranks started with torchrun, 1 thread each):

  (a) tp_plugin.from_pretrained(dir, tp_size=2): meta build, each rank reads only its slices
  (b) transformers AutoModelForCausalLM.from_pretrained(dir) on every rank, then tp_plugin.parallelize
  (c) DeepSpeed AutoTP for training: the same full load, then deepspeed.initialize with
      "tensor_parallel": {"autotp_size": 2} (ZeRO stage 0), which splits the loaded model
  (d) transformers' own TP: AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto") (DTensor shards)

Per rank: wall time (and CPU time of the rank process, steadier on a shared machine) of the load call plus
one read of every parameter it holds (transformers' loader returns tensors that are still views of the
mmapped file, read lazily; reading them makes the numbers comparable), peak RSS (VmHWM) and its growth over
the RSS after imports, and the bytes of parameters the rank holds. Each variant then runs one forward pass on
8 tokens; the last position's first 16 logits are compared with variant (a), so a variant that loads "fast"
but wrong (or cannot run) shows up. Checkpoints: `examples/demo_model.py`'s SmolLM2-135M (fp32, as converted from
the gguf), and a Llama-shaped 1.1B model (TinyLlama's shape, random weights, bf16 to halve disk and time)
written once to .cache/bench/llama-1.1b by streaming random tensors through tp_plugin's checkpoint writer.
The page cache is warmed (the files read once) before each variant. Results: printed as a markdown table and written to .cache/bench/load_checkpoint.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
VARIANTS = {"a": "tp_plugin.from_pretrained", "b": "HF from_pretrained + parallelize",
            "c": "DeepSpeed AutoTP (initialize)", "d": "transformers tp_plan='auto'"}
# TinyLlama-1.1B's shape: 32 heads / 4 KV heads, untied embeddings; 1.10B parameters.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "TMPDIR": str(REPO / ".tmp"), "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
            "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- checkpoints

def llama_1b_dir() -> Path:
    """Write the random 1.1B checkpoint once, tensor by tensor (never the whole model in memory)."""
    final = CACHE / "llama-1.1b"
    if (final / "config.json").is_file():
        return final
    import torch
    import transformers

    from tp_plugin.checkpoint.write import save_config, staged, write_hf_files

    config = transformers.LlamaConfig(**LLAMA_1B)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    tensors = [(name, torch.bfloat16, tuple(p.shape)) for name, p in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)

    def fetch(name):
        shape = dict((n, s) for n, _, s in tensors)[name]
        if len(shape) == 1:  # norms: around 1, as trained ones are
            return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)

    started = time.perf_counter()
    with staged(final, writer=True, every_rank=False) as tmp:
        write_hf_files(tmp, tensors, fetch, "1GB", writer=True)
        save_config(config, transformers.GenerationConfig(bos_token_id=1, eos_token_id=2), tmp, "LlamaForCausalLM",
                    torch.bfloat16)
    print(f"wrote {final} ({sum(torch.Size(s).numel() for _, _, s in tensors) / 1e9:.2f}B params, bf16) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return final


def smollm2_dir() -> Path:
    sys.path.insert(0, str(REPO / "examples"))
    from demo_model import default_model_dir

    return default_model_dir()


def prebuild_deepspeed_ops() -> None:
    """DeepSpeed compiles its CPU shared-memory op on first use (25-45 s): build it before anything is timed."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b and b.load()")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, capture_output=True)


# ---------------------------------------------------------------- one rank of one variant

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load(variant: str, model_dir: str, dtype):
    import transformers

    auto = transformers.AutoModelForCausalLM
    if variant == "a":
        import tp_plugin

        return tp_plugin.from_pretrained(model_dir, tp_size=2, torch_dtype=dtype)
    if variant == "b":
        import tp_plugin

        return tp_plugin.parallelize(auto.from_pretrained(model_dir, dtype=dtype), tp_size=2)
    if variant == "c":
        import deepspeed

        model = auto.from_pretrained(model_dir, dtype=dtype)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
                  "tensor_parallel": {"autotp_size": 2}, "steps_per_print": 10 ** 9,
                  "bf16": {"enabled": dtype == "bfloat16"}}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine.module
    if variant == "d":
        return auto.from_pretrained(model_dir, dtype=dtype, tp_plan="auto")
    raise ValueError(variant)


def worker(variant: str, model_dir: str, dtype: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (imported before the baseline, by every variant)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if variant in "ab":
        import tp_plugin  # noqa: F401
    if variant == "c":
        import deepspeed  # noqa: F401
    # transformers imports the model's modules lazily, on first use (several seconds here): do it for every
    # variant before the clock starts, so the timings compare loading, not importing.
    config = transformers.AutoConfig.from_pretrained(model_dir)
    transformers.AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018  (imports modeling_<type>)
    import transformers.integrations.tensor_parallel  # noqa: F401
    result = {"variant": variant, "rank": rank, "rss_before_mib": _rss_kib("VmRSS") / 1024}
    dist.barrier()
    started, cpu_started = time.perf_counter(), _cpu_s()
    try:
        model = _load(variant, model_dir, getattr(torch, dtype))
        error = None
    except Exception as exc:  # reported in the table, honestly, instead of dropping the variant
        model, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if model is not None:  # loaders may leave weights as views of the mmapped file: read every byte now
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).sum()
    result["load_s"] = time.perf_counter() - started
    result["cpu_s"] = _cpu_s() - cpu_started
    result["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
    result["load_error"] = error
    if model is not None:
        seen, held = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                local = p.to_local() if hasattr(p, "to_local") else p
                held += local.numel() * local.element_size()
        result["param_mib"] = held / 2 ** 20
        try:
            with torch.no_grad():
                logits = model(torch.arange(1, 9)[None]).logits
            if hasattr(logits, "full_tensor"):
                logits = logits.full_tensor()
            result["logits"] = logits[0, -1, :16].float().tolist()
        except Exception as exc:
            result["forward_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass


def warm_page_cache(model_dir: Path) -> None:
    """Read the checkpoint once so that every variant starts from the same (cached) state, whatever ran before."""
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def run_variant(variant: str, model_dir: Path, dtype: str, tag: str, timeout_s: int) -> list[dict]:
    warm_page_cache(model_dir)
    out = CACHE / "runs" / f"{tag}-{variant}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{out.name}.rank*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", variant, "--model-dir", str(model_dir), "--dtype", dtype, "--out", str(out)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout_s)
        tail = done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        tail = [f"timed out after {timeout_s} s"]
    results = []
    for rank in range(2):
        path = Path(f"{out}.rank{rank}.json")
        results.append(json.loads(path.read_text()) if path.is_file() else
                       {"variant": variant, "rank": rank, "load_error": "no result: " + " | ".join(tail)[-300:]})
    print(f"  ({variant}) {VARIANTS[variant]}: {time.perf_counter() - started:.0f} s wall incl. process start",
          flush=True)
    return results


# ---------------------------------------------------------------- report

def _row(model: str, variant: str, ranks: list[dict], ref: list[dict] | None) -> dict:
    ok = all(r.get("load_error") is None and "peak_rss_mib" in r for r in ranks)
    row = {"model": model, "variant": f"({variant}) {VARIANTS[variant]}", "ok": ok,
           "error": next((r.get("load_error") for r in ranks if r.get("load_error")), None)}
    if "peak_rss_mib" in ranks[0]:
        row.update(load_s=max(r["load_s"] for r in ranks), cpu_s=max(r["cpu_s"] for r in ranks),
                   peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
                   growth_mib=max(r["peak_rss_mib"] - r["rss_before_mib"] for r in ranks),
                   param_mib=max(r.get("param_mib", 0) for r in ranks))
    forward = next((r.get("forward_error") for r in ranks if r.get("forward_error")), None)
    if ok and forward is None and ref and all("logits" in r for r in ref):
        diff = max(abs(a - b) for r, q in zip(ranks, ref) for a, b in zip(r["logits"], q["logits"]))
        row["forward"] = f"max diff vs (a) {diff:.1e}"
    else:
        row["forward"] = forward or ("ok" if ok else "-")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | load s | CPU s | peak RSS / rank MiB | RSS growth MiB | params held MiB | "
             "peak vs (a) | growth vs (a) | forward |", "|---|---|---|---|---|---|---|---|---|---|"]
    refs = {r["model"]: r for r in rows if r["variant"].startswith("(a)") and r["ok"]}
    for r in rows:
        if "peak_rss_mib" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed | | | | | | | {r['error']} |")
            continue
        ref = refs.get(r["model"])
        ratio = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x" if ref else "-"
        growth = f"{r['growth_mib'] / ref['growth_mib']:.2f}x" if ref else "-"
        status = r["forward"] if r["ok"] else f"load failed: {r['error']}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['load_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | "
                     f"{r['growth_mib']:.0f} | {r['param_mib']:.0f} | {ratio} | {growth} | {status} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama1b", help="comma-separated: smollm2, llama1b")
    parser.add_argument("--variants", default="abcd")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model_dir, args.dtype, args.out)

    CACHE.mkdir(parents=True, exist_ok=True)
    if "c" in args.variants:
        prebuild_deepspeed_ops()
    models = {"smollm2": ("SmolLM2-135M (fp32)", smollm2_dir, "float32"),
              "llama1b": ("Llama 1.1B (bf16)", llama_1b_dir, "bfloat16")}
    rows = []
    for key in args.models.split(","):
        label, locate, dtype = models[key]
        model_dir = locate()
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2 ** 20
        print(f"{label}: {model_dir} ({size:.0f} MiB of safetensors)", flush=True)
        ref = None
        for variant in args.variants:
            ranks = run_variant(variant, model_dir, dtype, key, args.timeout)
            if variant == "a":
                ref = ranks
            rows.append({**_row(f"{label}, {size:.0f} MiB", variant, ranks, ref), "ranks": ranks})
    table = markdown(rows)
    print(table)
    (CACHE / "load_checkpoint.json").write_text(json.dumps(rows, indent=1))
    (CACHE / "load_checkpoint.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
