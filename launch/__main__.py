"""`python -m launch <command> ...`: one entry point, one module per command.

Each command module under launch/ exposes `add_arguments(parser)` and `main(args) -> int`.
Modules are imported lazily so that `python -m launch --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from launch.paths import PathProblem, describe_os_error

# command name -> (module, one-line help)
COMMANDS = {
    "run": ("launch.run", "run a recipe locally with N processes"),
    "submit": ("launch.submit", "submit a recipe to SLURM through submitit"),
    "sweep": ("launch.sweep", "submit a grid of overrides as one SLURM job array"),
    "status": ("launch.jobs", "show the state of a submitted job"),
    "tail": ("launch.jobs", "print the end of a job's training log"),
    "cancel": ("launch.jobs", "stop a submitted job with a checkpoint, then cancel it"),
    "data": ("launch.data", "write ImageNet-style folders to FFCV .beton files"),
    "compare": ("launch.compare", "compare runs from their TensorBoard logs"),
    "checkpoint": ("launch.checkpoint", "inspect or consolidate checkpoints"),
    "eval": ("launch.eval", "evaluate a checkpoint on val or minival (top-1, top-5, NLL, ECE)"),
    "doctor": ("launch.doctor", "check this machine's environment for training (versions, GPUs, ffcv, SLURM)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"python -m launch: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"python -m launch {name}: not available in this version", file=sys.stderr)
        return 2
    cmd_parser = argparse.ArgumentParser(prog=f"python -m launch {name}", description=help_text)
    module.add_arguments(cmd_parser, name)
    try:  # options may come after key=value overrides
        args = cmd_parser.parse_intermixed_args(argv[1:])
    except TypeError:  # commands with sub-commands cannot be parsed intermixed
        args = cmd_parser.parse_args(argv[1:])
    args.command = name
    try:
        return int(module.main(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except PathProblem as e:
        print(f"python -m launch {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the net under every command: a path or permission problem is one line
        print(f"python -m launch {name}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
