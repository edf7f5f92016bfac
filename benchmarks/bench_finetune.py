"""Dense fine-tuning benchmark (issue 3): accuracy over seeds, and data-handling overhead.

    python benchmarks/bench_finetune.py accuracy --runs minilm-l6:sst5:0,1,2 minilm-l6:mnli-small:0
    python benchmarks/bench_finetune.py speed          # run on a quiet machine

`accuracy` fine-tunes with the library defaults (`cahp finetune`), evaluates on
the test split with bootstrap intervals, and saves each seed-0 model under
runs/bench/ (the pruning benchmarks start from it). Results are merged into
results/finetune_dense.json after every run, so an interrupted benchmark
resumes where it stopped.

`speed` times, over the same SST-5 training batches: the bare forward+backward
passes, the bare training step (plus clipping and AdamW), and one epoch of
`cahp.train.finetune` (tokenisation, batching, training, dev evaluation), interleaved.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cahp  # noqa: E402
from benchmarks._common import REPO, load_result, meta_lines, metadata, write_result  # noqa: E402
from cahp.data.batching import encode, make_batches  # noqa: E402
from cahp.data.tasks import get_task  # noqa: E402
from cahp.train.evaluate import evaluate_task, model_inputs  # noqa: E402
from cahp.train.finetune import FinetuneConfig, finetune  # noqa: E402

log = logging.getLogger("bench_finetune")
NAME = "finetune_dense"
SPEED_NAME = "finetune_speed"


def run_accuracy(specs: list[str], data_dir: str | None) -> None:
    meta = metadata()  # the code that runs is the code at start
    result = load_result(NAME) or {"runs": [], "speed": None}
    done = {(r["model"], r["task"], r["seed"]) for r in result["runs"]}
    for spec in specs:
        model_name, task_name, seeds = spec.split(":")
        for seed in [int(s) for s in seeds.split(",")]:
            if (model_name, task_name, seed) in done:
                log.info("skip %s/%s seed %d: already in results", model_name, task_name, seed)
                continue
            task = get_task(task_name, data_dir=data_dir)
            model, tok = cahp.load_model(model_name, num_labels=task.num_labels, seed=seed)
            cfg = FinetuneConfig(seed=seed)
            out = REPO / "runs" / "bench" / f"finetuned-{model_name}-{task_name}" if seed == 0 else None
            t0 = time.perf_counter()
            ft = finetune(model, tok, task, cfg, output_dir=out)
            test = evaluate_task(model, tok, task, seed=seed)
            run = {
                "model": model_name, "task": task_name, "seed": seed, "config": asdict(cfg),
                "best_epoch": ft.best_epoch, "dev": ft.best_dev, "test": test,
                "epochs_run": len(ft.history), "seconds": time.perf_counter() - t0,
                "history": ft.history,
            }
            result["runs"].append(run)
            result["meta"] = meta
            write_result(NAME, {k: v for k, v in result.items() if k != "meta"}, meta)
            log.info("%s/%s seed %d: test %s", model_name, task_name, seed,
                     {s: round(v["accuracy"], 4) for s, v in test.items()})


def run_speed(data_dir: str | None, reps: int) -> None:
    """Epoch of cahp.train.finetune vs bare forward+backward over the same batches."""
    meta = metadata()
    task = get_task("sst5", data_dir=data_dir)
    cfg = FinetuneConfig(epochs=1, seed=0, patience=0)
    model, tok = cahp.load_model("minilm-l6", num_labels=task.num_labels)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # The exact batches finetune() builds for epoch 0 with this seed.
    ds = encode(tok, task.load("train"), cfg.max_length)
    batches = make_batches(ds, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000, pad_token_id=tok.pad_token_id)
    times = {"fwd_bwd": [], "train_step": [], "finetune_epoch": [], "finetune_epoch_train_only": []}

    def bare(step: bool) -> float:
        model.load_state_dict(init)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        t0 = time.perf_counter()
        for b in batches:
            out = model(**model_inputs(b), labels=b["labels"])
            out.loss.backward()
            if step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for rep in range(reps):
        times["fwd_bwd"].append(bare(False))
        times["train_step"].append(bare(True))
        model.load_state_dict(init)
        t0 = time.perf_counter()
        ft = finetune(model, tok, task, cfg, progress=False)
        times["finetune_epoch"].append(time.perf_counter() - t0)
        times["finetune_epoch_train_only"].append(ft.history[0]["train_seconds"])
        log.info("rep %d: %s", rep, {k: round(v[-1], 1) for k, v in times.items()})
    med = {k: float(np.median(v)) for k, v in times.items()}
    speed = {
        "model": "minilm-l6", "task": "sst5", "batches": len(batches), "batch_size": cfg.batch_size,
        "reps": reps, "seconds": times, "median_seconds": med,
        "ratio_epoch_vs_fwd_bwd": med["finetune_epoch"] / med["fwd_bwd"],
        "ratio_epoch_train_only_vs_fwd_bwd": med["finetune_epoch_train_only"] / med["fwd_bwd"],
        "ratio_epoch_vs_train_step": med["finetune_epoch"] / med["train_step"],
        "ratio_train_step_vs_fwd_bwd": med["train_step"] / med["fwd_bwd"],
    }
    # Its own file: the accuracy runs rewrite finetune_dense.json while they go on.
    write_result(SPEED_NAME, {"speed": speed}, meta)
    log.info("speed: %s", {k: round(v, 3) for k, v in speed.items() if k.startswith("ratio")})


def render(result: dict) -> str:
    if "runs" not in result:  # finetune_speed.json
        return render_speed(result["speed"], result["meta"])
    out = [meta_lines(result["meta"])]
    groups: dict[tuple, list] = {}
    for r in result.get("runs", []):
        groups.setdefault((r["model"], r["task"]), []).append(r)
    out.append("| model | task | seeds | test split | accuracy (mean ± std) | per seed | macro-F1 (mean) "
               "| 95% CI of seed 0 | epochs (best) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for (model, task), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        for split in runs[0]["test"]:
            acc = np.array([r["test"][split]["accuracy"] for r in runs]) * 100
            f1 = np.mean([r["test"][split]["macro_f1"] for r in runs]) * 100
            ci = runs[0]["test"][split].get("accuracy_ci95", [np.nan, np.nan])
            std = acc.std(ddof=1) if len(acc) > 1 else 0.0
            out.append(
                f"| {model} | {task} | {len(runs)} | {split} | {acc.mean():.2f} ± {std:.2f} "
                f"| {', '.join(f'{a:.2f}' for a in acc)} | {f1:.2f} | [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}] "
                f"| {', '.join(str(r['best_epoch']) + '/' + str(r['epochs_run']) for r in runs)} |"
            )
    cfg = result["runs"][0]["config"] if result.get("runs") else {}
    out.append(f"\nSettings (library defaults): {', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'seed')}.\n")
    return "\n".join(out) + "\n"


def render_speed(sp: dict, meta: dict) -> str:
    out = []
    if sp:
        med = sp["median_seconds"]
        out.append(f"Data-handling overhead ({sp['model']} / {sp['task']}, {sp['batches']} batches of "
                   f"{sp['batch_size']}, median of {sp['reps']} interleaved repetitions)\n")
        out.append(meta_lines(meta))
        out.append("| measured | seconds (median) | ratio to bare forward+backward |")
        out.append("|---|---|---|")
        for key, label in [("fwd_bwd", "bare forward+backward"), ("train_step", "bare training step (+ clip, AdamW)"),
                           ("finetune_epoch_train_only", "`cahp finetune` epoch, training part (batching included)"),
                           ("finetune_epoch", "`cahp finetune` epoch, all (tokenising, batching, dev evaluation)")]:
            out.append(f"| {label} | {med[key]:.1f} | {med[key] / med['fwd_bwd']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--runs", nargs="+", default=["minilm-l6:sst5:0,1,2", "minilm-l6:mnli-small:0"],
                   help="MODEL:TASK:SEEDS entries")
    a.add_argument("--data-dir", default=None)
    s = sub.add_parser("speed")
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--data-dir", default=None)
    args = p.parse_args()
    if args.cmd == "accuracy":
        run_accuracy(args.runs, args.data_dir)
    else:
        run_speed(args.data_dir, args.reps)


if __name__ == "__main__":
    main()
