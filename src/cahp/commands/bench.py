"""``cahp bench``: latency of a dense model, a pruned one and the attention-free floor."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
        "--shapes",
        default="1x32,1x128,32x32,32x128",
        help="BATCHxSEQUENCE list, comma separated (default 1x32,1x128,32x32,32x128)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto: cpu plus cuda when present (default)")
    add_timing_arguments(p)
    p.add_argument("--onnx", action="store_true", help="also export to ONNX and time onnxruntime (CPU)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead: time the model with h heads in every layer (all..1) and the floor, and fit one attention "
        "block's cost as fixed + per_head*h: the fixed part is what keeps pruned models off the line",
    )
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")


def add_timing_arguments(
    p: argparse.ArgumentParser, threads: int = 2, budget: float = 20.0, min_reps: int = 10
) -> None:
    """How models are timed: the options `cahp bench`, its --sweep and benchmarks/bench_latency.py share.

    `timing_kwargs` turns them into keyword arguments of `bench_models` and `head_count_sweep`.
    """
    p.add_argument("--seed", type=int, default=0, help="seed of the random selections and the inputs (default 0)")
    p.add_argument(
        "--threads", type=int, default=threads, help=f"CPU threads for torch and onnxruntime (default {threads})"
    )
    p.add_argument(
        "--kernel",
        choices=["auto", "eager", "sdpa", "compact"],
        default="auto",
        help="attention kernel of every model; auto: the dense model's fastest per shape (default)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: as many as --budget allows)")
    p.add_argument(
        "--budget", type=float, default=budget, help=f"seconds of timing per shape without --reps (default {budget:g})"
    )
    p.add_argument(
        "--min-reps", type=int, default=min_reps, help=f"at least this many repetitions (default {min_reps})"
    )
    p.add_argument(
        "--max-reps", type=int, default=200, help="at most this many repetitions within --budget (default 200)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first (default 2)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: latency (default); cpu: process CPU time, for a busy machine (work, not latency)",
    )
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave the C allocator as it is; by default freed memory is held in the process (glibc), so large "
        "activations are not page-faulted in again on every call",
    )


def timing_kwargs(args: argparse.Namespace) -> dict:
    """The options of `add_timing_arguments` as keyword arguments of `bench_models` / `head_count_sweep`."""
    return {
        "seed": args.seed,
        "threads": args.threads,
        "kernel": args.kernel,
        "reps": args.reps,
        "budget_s": args.budget,
        "min_reps": args.min_reps,
        "max_reps": args.max_reps,
        "warmup": args.warmup,
        "clock": args.clock,
        "hold_memory": not args.malloc_default,
    }


def run(args) -> int:
    from cahp.bench.latency import format_table, parse_shapes, run_bench

    if args.sweep:
        return _sweep(args)
    result = run_bench(
        args.model,
        pruned=args.pruned,
        remove_ratio=args.remove_ratio,
        shapes=parse_shapes(args.shapes),
        devices=args.device,
        onnx=args.onnx,
        **timing_kwargs(args),
    )
    if args.out is not None:
        import sys

        from cahp.core.io import environment, write_json

        write_json(args.out, {"command": " ".join(["cahp", *sys.argv[1:]]), "environment": environment(), **result})
        log.info("wrote %s", args.out)
    print(format_table(result))
    return 0


def _sweep(args) -> int:
    import sys

    from cahp.bench.latency import SWEEP_EXPLAINED, format_sweep, head_count_sweep, parse_shapes
    from cahp.core.io import environment, to_jsonable, write_json
    from cahp.model.loading import load_model

    if args.pruned is not None or args.onnx:
        raise ValueError("--sweep times uniform head counts of --model itself: drop --pruned and --onnx")
    shapes = parse_shapes(args.shapes)  # validated before the model loads
    dense, _ = load_model(args.model, attn_implementation="eager", with_tokenizer=False)
    runs = [to_jsonable(head_count_sweep(dense, batch=b, seq=q, **timing_kwargs(args))) for b, q in shapes]
    if args.out is not None:
        write_json(args.out, {"command": " ".join(["cahp", *sys.argv[1:]]), "environment": environment(),
                              "model": args.model, "sweeps": runs})
        log.info("wrote %s", args.out)
    print(format_sweep({args.model: runs}))
    print("\n" + SWEEP_EXPLAINED)
    return 0
