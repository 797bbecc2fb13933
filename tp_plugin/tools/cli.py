"""The `tp-plugin` command line: a registry of subcommands, each a small function pair.

    tp-plugin consolidate SHARDED_DIR OUT_DIR [--max-shard-size 5GB]
    tp-plugin verify MODEL_OR_CONFIG [--tp N] | --all-architectures [--tp 2 --tp 4] [--markdown FILE]
    tp-plugin plan MODEL_OR_CONFIG --gpus N --gpu-memory GIB [--nodes K] [--seq S] [--lora] [--json] ...
    tp-plugin launch [--tp N] [--sequence-parallel] [--loss-parallel] [--print-env] -- COMMAND [ARGS ...]

Adding a subcommand: write `_configure_x(parser)` and `_run_x(args) -> int`, then
`register("x", "one-line help", _configure_x, _run_x)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    COMMANDS[name] = Command(name, help, configure, run)


def _configure_consolidate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sharded_dir", help="a per-rank checkpoint written by tp_plugin.save_sharded")
    parser.add_argument("out_dir", help="where to write the ordinary Hugging Face checkpoint (replaced atomically)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_consolidate(args: argparse.Namespace) -> int:
    from ..checkpoint import consolidate

    out = consolidate(args.sharded_dir, args.out_dir, max_shard_size=args.max_shard_size,
                      progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


register("consolidate", "turn a per-rank (sharded) checkpoint into an ordinary Hugging Face checkpoint",
         _configure_consolidate, _run_consolidate)


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", metavar="MODEL_OR_CONFIG",
                        help="a model_type (a tiny random model is built) or a local model directory")
    parser.add_argument("--tp", type=int, action="append", help="tensor-parallel size (repeatable; default 2)")
    parser.add_argument("--all-architectures", action="store_true",
                        help="every causal-LM architecture of the installed transformers, from tiny configs")
    parser.add_argument("--only", help="comma-separated model types (with --all-architectures)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown (docs/architectures.md)")
    parser.add_argument("--vlm", action="store_true",
                        help="vision-language (image-text-to-text) models: MODEL_OR_CONFIG is one, or with "
                             "--all-architectures the families of tp_plugin.tools.tiny_vlms.VLM_TYPES")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="split with sequence_parallel=True (the models run in training mode)")
    parser.add_argument("--engine", default="tp_plugin", choices=("tp_plugin", "deepspeed", "transformers"),
                        help="split with tp_plugin (default), or run a peer for comparison: DeepSpeed AutoTP or "
                             "transformers' own tp_plan (logits only)")


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import main_verify

    return main_verify(args)


register("verify", "split a model on N local CPU ranks and compare it with the unsplit model (parity)",
         _configure_verify, _run_verify)


def _configure_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL_OR_CONFIG",
                        help="a local model directory (config.json is enough: no weights are read) or a model_type")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpu-memory", type=float, required=True, metavar="GIB", help="memory per GPU in GiB")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    parser.add_argument("--micro-batch", type=int, default=1, help="micro batch per GPU (default 1)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES), help="training dtype (default bf16)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lora", action="store_true", help="LoRA on every linear layer instead of full fine-tuning")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="only layouts with gradient checkpointing (default: with and without)")
    parser.add_argument("--vlm", action="store_true",
                        help="vision-language (image-text-to-text) models: MODEL_OR_CONFIG is one, or with "
                             "--all-architectures the families of tp_plugin.tools.tiny_vlms.VLM_TYPES")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="also plan sequence-parallel layouts (parallelize(..., sequence_parallel=True))")
    parser.add_argument("--json", action="store_true", help="print the machine-readable document")
    parser.add_argument("--write-configs", metavar="DIR", help="write an Accelerate yaml + DeepSpeed json for the "
                                                              "recommended layout")


DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _run_plan(args: argparse.Namespace) -> int:
    import json

    from .planner import Workload, load_config, plan_document
    from .planner_report import format_table, write_configs

    work = Workload(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, nodes=args.nodes, seq=args.seq,
                    micro_batch=args.micro_batch, dtype=args.dtype, optimizer=args.optimizer, lora=args.lora,
                    lora_rank=args.lora_rank, gradient_checkpointing=True if args.gradient_checkpointing else None,
                    sequence_parallel=args.sequence_parallel)
    doc = plan_document(load_config(args.target), work)
    print(json.dumps(doc, indent=2) if args.json else format_table(doc))
    if args.write_configs:
        if doc["recommended"] is None:
            print("tp-plugin plan: nothing fits, no config written", file=sys.stderr)
            return 1
        for path in write_configs(doc["recommended"], work, args.write_configs):
            print(f"wrote {path}", file=sys.stderr)
    return 0


register("plan", "which TP degree, data parallelism and ZeRO stage fit a model on N GPUs (no weights read)",
         _configure_plan, _run_plan)


def _configure_launch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel degree (default: the launch config's, else the world size)")
    parser.add_argument("--sequence-parallel", action="store_true", help="split activations along the sequence")
    parser.add_argument("--loss-parallel", action="store_true", help="the LM loss from vocabulary shards")
    parser.add_argument("--print-env", action="store_true",
                        help="print the environment to export instead of running a command (for schedulers)")
    parser.add_argument("cmd", metavar="COMMAND", nargs=argparse.REMAINDER, help="the launch command, after `--`")


def _run_launch(args: argparse.Namespace) -> int:
    from .. import launch

    options = dict(sequence_parallel=args.sequence_parallel, loss_parallel=args.loss_parallel)
    if args.print_env:
        print(launch.print_env(args.tp, **options))
        return 0
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    launch.run(command, args.tp, **options)  # replaces this process; returns only by raising
    return 1


register("launch", "run a training or inference command (torchrun, accelerate launch, deepspeed, python) with "
         "every model it loads split, without changing the script", _configure_launch, _run_launch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-plugin", description="tensor parallelism for transformers models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.configure(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError: one clear line, no traceback
        print(f"tp-plugin {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
