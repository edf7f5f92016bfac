"""``cahp info``: layers, kept heads, kept FFN neurons and parameters of a model."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="short name (minilm-l6, mpnet-base), model folder or Hub id"
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import cahp

    model, _ = cahp.load_model(args.model, with_tokenizer=False)
    kept = cahp.kept_heads(model)
    neurons = cahp.kept_neurons(model)
    info = {
        "model": args.model,
        "architecture": type(model).__name__,
        "layers": len(kept),
        "heads_kept": sum(len(v) for v in kept.values()),
        "heads_per_layer": [len(v) for v in kept.values()],
        "neurons_kept": sum(len(v) for v in neurons.values()),
        "neurons_per_layer": [len(v) for v in neurons.values()],
        "parameters": cahp.count_parameters(model),
    }
    if args.json:
        print(json.dumps({**info, "kept_heads": kept, "kept_neurons": neurons}, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return 0
