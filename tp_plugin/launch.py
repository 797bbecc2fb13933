"""`tp-plugin launch`: the command a user already has, run split with tp_plugin, without a code change.

    tp-plugin launch --tp 2 -- torchrun --nproc_per_node 4 run_clm.py --model_name_or_path ./model ...
    tp-plugin launch -- accelerate launch --config_file configs/accelerate/cpu_tp2_dp2.yaml train.py
    eval "$(tp-plugin launch --tp 2 --print-env)"     # a scheduler that starts the processes itself

What reaches every Python process the command starts (environment variables, which torchrun, `accelerate
launch` and `deepspeed` pass on to the processes they start):

    TP_PLUGIN_AUTO=1                    split with tp_plugin (`activate` below); without it nothing here runs
    PYTHONPATH=<tp_plugin/_site>:...    Python's start-up hook, `sitecustomize` (standard library only), which
                                        calls `activate()` once transformers or accelerate is imported
    TP_PLUGIN_TP_SIZE=N                 --tp; else the launch config's degree (yaml, DeepSpeed autotp_size)
    TP_PLUGIN_SEQUENCE_PARALLEL=1       --sequence-parallel
    TP_PLUGIN_LOSS_PARALLEL=1           --loss-parallel

`activate()` installs, in that process: the Accelerate launch preparation (the yaml's TP degree is tp_plugin's, a
CPU launch gets gloo before the script's `Accelerator()`), the integrations' patches (`tp_plugin.integrations`)
and the zero-code ones (`integrations/auto.py`: `from_pretrained` returns split models, every `Trainer` is a TP
Trainer). `tp_plugin.integrations.uninstall()` undoes them.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .launch_config import ENV_LOSS_PARALLEL, ENV_SEQUENCE_PARALLEL, ENV_TP_SIZE

ENV_AUTO = "TP_PLUGIN_AUTO"
SITE_DIR = Path(__file__).resolve().parent / "_site"
_active = False


def auto_enabled() -> bool:
    return os.environ.get(ENV_AUTO, "").strip().lower() in ("1", "true", "yes", "on")


def launch_env(tp: int | None = None, *, sequence_parallel: bool = False, loss_parallel: bool = False,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables `tp-plugin launch` sets (only those: `base` is the environment they extend)."""
    base = os.environ if base is None else base
    env = {ENV_AUTO: "1", "PYTHONPATH": os.pathsep.join([str(SITE_DIR)] + [p for p in
                                                         base.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if tp is not None:
        if tp < 1:
            raise ValueError(f"--tp must be >= 1 (got {tp})")
        env[ENV_TP_SIZE] = str(tp)
    if sequence_parallel:
        env[ENV_SEQUENCE_PARALLEL] = "1"
    if loss_parallel:
        env[ENV_LOSS_PARALLEL] = "1"
    return env


def run(command: list[str], tp: int | None = None, *, sequence_parallel: bool = False,
        loss_parallel: bool = False) -> None:
    """Replace this process by `command`, with the launch environment (signals and the exit code are its own)."""
    if not command:
        raise ValueError("tp-plugin launch needs a command after `--`, e.g. "
                         "tp-plugin launch --tp 2 -- torchrun --nproc_per_node 2 train.py")
    env = {**os.environ, **launch_env(tp, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)}
    if command[0] in ("python", "python3") or command[0] == Path(sys.executable).name:
        command = [sys.executable, *command[1:]]  # the interpreter tp_plugin is installed in
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def print_env(tp: int | None = None, *, sequence_parallel: bool = False, loss_parallel: bool = False) -> str:
    """`export` lines for a shell (the scheduler route)."""
    env = launch_env(tp, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def activate() -> None:
    """In a process under `tp-plugin launch`, once transformers or accelerate is imported (idempotent)."""
    global _active
    if _active or not auto_enabled():
        return
    _active = True
    from . import integrations
    from .integrations import accelerate, auto

    accelerate.take_over_parallelism_config()  # before the script's Accelerator() reads the yaml's TP degree
    integrations.when_imported("accelerate", accelerate.prepare_cpu_launch)  # gloo before Accelerator()
    integrations.activate()
    auto.install()
