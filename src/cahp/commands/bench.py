"""``cahp bench``: latency of a dense model, a pruned one and the attention-free floor.

What is timed (``--model``, ``--pruned`` or ``--remove-ratio``, ``--sweep``)
is declared here; how it is timed is `cahp.bench.config.BenchConfig`, whose
fields are the remaining options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cahp.bench.config import BenchConfig
from cahp.core.configs import add_dataclass_args, from_args

log = logging.getLogger("cahp.bench.latency")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dense model: short name (minilm-l6, mpnet-base), folder or Hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pruned", metavar="DIR", help="folder of a model pruned by cahp from --model")
    src.add_argument(
        "--remove-ratio",
        type=float,
        default=0.5,
        help="without --pruned: remove this share of the heads, a seeded random uneven selection (default 0.5)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead: time the model with h heads in every layer (all..1) and the floor, and fit one attention "
        "block's cost as fixed + per_head*h: the fixed part is what keeps pruned models off the line",
    )
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    add_dataclass_args(p.add_argument_group("timing"), BenchConfig)


def run(args) -> int:
    from cahp.bench.latency import run_bench
    from cahp.bench.report import format_table

    if args.sweep:
        return _sweep(args)
    result = run_bench(args.model, from_args(BenchConfig, args), pruned=args.pruned, remove_ratio=args.remove_ratio)
    _write(args, result)
    print(format_table(result))
    return 0


def _write(args, result: dict) -> None:
    """``--out``: the result, with the command line and the environment that produced it."""
    if args.out is None:
        return
    from cahp.core.io import environment, write_json

    write_json(args.out, {"command": " ".join(["cahp", *sys.argv[1:]]), "environment": environment(), **result})
    log.info("wrote %s", args.out)


def _sweep(args) -> int:
    from cahp.bench.report import SWEEP_EXPLAINED, format_sweep
    from cahp.bench.sweep import head_count_sweep
    from cahp.core.io import to_jsonable
    from cahp.model.loading import load_model

    if args.pruned is not None or args.onnx:
        raise ValueError("--sweep times uniform head counts of --model itself: drop --pruned and --onnx")
    cfg = from_args(BenchConfig, args)  # validated before the model loads
    dense, _ = load_model(args.model, attn_implementation="eager", with_tokenizer=False)
    runs = [to_jsonable(head_count_sweep(dense, b, q, cfg)) for b, q in cfg.shape_list]
    _write(args, {"model": args.model, "sweeps": runs})
    print(format_sweep({args.model: runs}))
    print("\n" + SWEEP_EXPLAINED)
    return 0
