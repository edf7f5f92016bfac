"""Command-line interface: ``cahp <command> --help``.

Each command lives in the module of its pipeline stage and registers itself
here through a ``(name, module, help)`` entry; modules are imported only when
their command runs, so ``cahp --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = [
    ("prune", "cahp.commands.prune",
     "prune a model with CAHP: fine-tune, score heads, pick k*, remove, fine-tune once"),
    ("finetune", "cahp.commands.finetune", "fine-tune a dense or pruned model on a task"),
    ("evaluate", "cahp.commands.evaluate", "score a dense or pruned model on a task split"),
    ("info", "cahp.commands.info", "show a model's layers, kept heads and parameter count"),
    ("bench", "cahp.commands.bench", "latency of a dense model, a pruned one and the attention-free floor"),
    ("export", "cahp.commands.export", "export a dense or pruned model to ONNX and check it against PyTorch"),
    ("compare", "cahp.commands.compare", "compare CAHP with baseline head selectors at the same budgets"),
]


class CahpError(Exception):
    """An error the user can act on; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cahp",
        description="Complementary Attention Head Pruning: make Transformer encoders smaller and faster.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream it
    was made with: ``main`` called again in one process (a notebook, a test under capture) after that stream was
    replaced or closed still logs, instead of printing logging's own traceback."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ sets it; the property always reads sys.stderr
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun (WORLD_SIZE > 1) every process runs this; rank 0 logs and writes.
    several = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")
    rank_tag = f"[rank {os.environ.get('RANK', '?')}] " if several else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {rank_tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if several:
        from cahp.core import distributed
        distributed.init()
    module = importlib.import_module(args._module)
    try:
        code = int(module.run(args) or 0)
        if several:
            distributed.shutdown()
        return code
    except KeyboardInterrupt:
        logging.getLogger("cahp").error(
            "interrupted; finished stages are kept and a re-run resumes from them"
        )
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, CahpError) as e:
        # Our own errors (ModelLoadError, TaskError, HeadIndexError, ...) are ValueErrors
        # with a message written for the user; show it without a traceback.
        if args.verbose:
            raise
        print(f"cahp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
