"""What a launch configures: the tensor-parallel degree when `parallelize(model)` is called without `tp_size`,
and the sequence- and loss-parallel flags. `launch.py` (the `tp-plugin launch` command) sets their environment
variables; this file only reads them, so the split can depend on it without depending on the launcher.

The degree is a property of the launch, not of the training script: each source below reads one place a
launcher or engine config can carry it. They are tried in order; the first that names a degree wins, and
two sources that disagree are an error (a config edit must not be silently ignored).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .sharding import TPSplitError

ENV_TP_SIZE = "TP_PLUGIN_TP_SIZE"


def _from_env() -> tuple[str, int] | None:
    value = os.environ.get(ENV_TP_SIZE)
    return (f"${ENV_TP_SIZE}", int(value)) if value else None


def autotp_size(ds_config: dict | str | os.PathLike | None) -> int | None:
    """DeepSpeed's standard key `"tensor_parallel": {"autotp_size": N}` (a dict or a json path)."""
    if ds_config is None:
        return None
    if not isinstance(ds_config, dict):
        ds_config = json.loads(Path(ds_config).read_text())
    size = (ds_config.get("tensor_parallel") or {}).get("autotp_size")
    return int(size) if size else None


def _accelerate_deepspeed_json() -> str | None:
    """`accelerate launch` with a DeepSpeed plugin exports the json path it was given."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return path if path and path.endswith(".json") and Path(path).is_file() else None


def _deepspeed_cli_json() -> str | None:
    """`--deepspeed_config PATH` on the command line (DeepSpeed's `add_config_arguments`), read before
    `deepspeed.initialize` parses it, so a plain DeepSpeed script needs no tp_size."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--deepspeed_config=") else \
            (argv[i + 1] if arg == "--deepspeed_config" and i + 1 < len(argv) else None)
        if path and path.endswith(".json") and Path(path).is_file():
            return path
    return None


def _from_accelerate_deepspeed_json() -> tuple[str, int] | None:
    path = _accelerate_deepspeed_json()
    size = autotp_size(path) if path else None
    return (path, size) if size else None


def _from_deepspeed_cli_arg() -> tuple[str, int] | None:
    path = _deepspeed_cli_json()
    size = autotp_size(path) if path else None
    return (path, size) if size else None


def _from_hf_deepspeed_config() -> tuple[str, int] | None:
    """`TrainingArguments(deepspeed=...)` registers its DeepSpeed config with transformers."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:
        return None
    config = deepspeed_config()
    size = autotp_size(config) if isinstance(config, dict) else None
    return ("TrainingArguments.deepspeed", size) if size else None


ACCELERATE_LAUNCH_MARKER = "ACCELERATE_MIXED_PRECISION"  # exported by every `accelerate launch` path


def yaml_tp_size() -> int | None:
    """`parallelism_config_tp_size` of the `accelerate launch` yaml (exported as PARALLELISM_CONFIG_TP_SIZE for
    MULTI_GPU, DEEPSPEED and FSDP configs), if it names a TP degree. Read only by a script that splits with
    tp_plugin (one that loads with `tp_plan="auto"` gets Accelerate's own TP: tp_plugin is not involved)."""
    if ACCELERATE_LAUNCH_MARKER not in os.environ:
        return None
    size = int(os.environ.get("PARALLELISM_CONFIG_TP_SIZE", "1") or 1)
    return size if size > 1 else None


def _from_accelerate_yaml() -> tuple[str, int] | None:
    """`parallelism_config: {parallelism_config_tp_size: N}` in the `accelerate launch` yaml (see
    integrations/accelerate/__init__.py: tp_plugin takes that key over from Accelerate's own TP)."""
    size = yaml_tp_size()
    return ("accelerate yaml parallelism_config_tp_size", size) if size else None


SOURCES = [_from_env, _from_accelerate_yaml, _from_accelerate_deepspeed_json, _from_hf_deepspeed_config,
           _from_deepspeed_cli_arg]


def configured_tp_size() -> int | None:
    """The TP degree named by the launch configuration, or None when nothing names one."""
    found = [hit for source in SOURCES if (hit := source()) is not None]
    sizes = {size for _, size in found}
    if len(sizes) > 1:
        raise TPSplitError("the launch configuration names different tensor-parallel degrees: "
                           + ", ".join(f"{where} says {size}" for where, size in found)
                           + ". Make them agree (one config edit).")
    return found[0][1] if found else None


ENV_SEQUENCE_PARALLEL = "TP_PLUGIN_SEQUENCE_PARALLEL"


def _ds_config_sources() -> list[dict]:
    """The DeepSpeed configs this launch names (accelerate's json, TrainingArguments', --deepspeed_config)."""
    found = [json.loads(Path(p).read_text()) for p in (_accelerate_deepspeed_json(), _deepspeed_cli_json()) if p]
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:
        return found
    return found + ([deepspeed_config()] if isinstance(deepspeed_config(), dict) else [])


def configured_sequence_parallel() -> bool:
    """Sequence parallelism asked for by the launch: `TP_PLUGIN_SEQUENCE_PARALLEL=1` (any launcher, e.g. in
    front of `accelerate launch`), or `"tp_plugin": {"sequence_parallel": true}` in the DeepSpeed config
    (DeepSpeed's own `tensor_parallel` section accepts no keys it does not know)."""
    value = os.environ.get(ENV_SEQUENCE_PARALLEL, "").strip().lower()
    if value:
        return value in ("1", "true", "yes", "on")
    return any(bool((cfg.get("tp_plugin") or {}).get("sequence_parallel")) for cfg in _ds_config_sources())


ENV_LOSS_PARALLEL = "TP_PLUGIN_LOSS_PARALLEL"


def configured_loss_parallel() -> bool:
    """`loss_parallel` asked for by the launch (`tp-plugin launch --loss-parallel`): the models that the zero-code
    route splits compute their loss from vocabulary shards."""
    return os.environ.get(ENV_LOSS_PARALLEL, "").strip().lower() in ("1", "true", "yes", "on")
