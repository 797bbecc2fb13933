"""The `tp-plugin` command line: a registry of subcommands, each a small function pair.

    tp-plugin consolidate SHARDED_DIR OUT_DIR [--max-shard-size 5GB]
    tp-plugin verify MODEL_OR_CONFIG [--tp N] | --all-architectures [--tp 2 --tp 4] [--markdown FILE]

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
    from .checkpoint import consolidate

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
    parser.add_argument("--engine", default="tp_plugin", choices=("tp_plugin", "deepspeed", "transformers"),
                        help="split with tp_plugin (default), or run a peer for comparison: DeepSpeed AutoTP or "
                             "transformers' own tp_plan (logits only)")


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import main_verify

    return main_verify(args)


register("verify", "split a model on N local CPU ranks and compare it with the unsplit model (parity)",
         _configure_verify, _run_verify)


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
