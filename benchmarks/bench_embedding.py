"""Embedding models pruned without labels (issue 22): `cahp compare --objective embedding`, zero-shot on STS-B.

    python benchmarks/bench_embedding.py minilm_stsb                               # defaults (hours on a CPU)
    python benchmarks/bench_embedding.py minilm_stsb --seeds 1 --methods cahp random --budgets 0.5 \\
        --epochs 1 --max-train-examples 2000 --throughput-seconds 2               # cheaper
    python benchmarks/bench_embedding.py mpnet_stsb --seeds 1

Runs `cahp.pipelines.compare_embedding.run_compare_embedding` for a
sentence-transformers model (``minilm-l6``: all-MiniLM-L6-v2, ``mpnet-base``:
all-mpnet-base-v2): CAHP and the baselines select heads without labels, each
selection is distilled once on unlabeled sentences (the same distillation for
every method), and every model is scored zero-shot on STS-B test (the GLUE dev
file): Spearman of the cosine of each pair's embeddings, paired bootstraps
over the test pairs.

Texts: the training sentences of SST-5 and of mnli-small (premises and
hypotheses), labels ignored, read in place from the data folder
(``../shared/data`` or ``--data-dir``). `text_union` joins them in a fixed
order (SST-5 first, each task's file order, each sentence once) and drops
every sentence that also occurs in any split of the similarity task (STS-B),
compared after case folding and whitespace normalisation, so no STS-B sentence
is distilled on, calibrated on or held out. The pipeline takes one text file,
so `write_texts` writes the union into the run folder as a derived file,
``texts-<sha256 of its content, 16 hex>.jsonl`` (one JSON string a line,
atomically): it is rebuilt from the data sets on every run and never committed
(``runs/`` is git-ignored).

The run folder is ``runs/bench/embedding-MODEL-sst5+mnli-small`` under the
repository (or ``--output-dir``): texts, dense targets, signatures, salience,
CAHP's curve, every (method, budget, seed) result and the throughput are
cached there, so an interrupted benchmark resumes.

Throughput (the compare itself measures none): `encoding_throughput` times the
dense encoder against CAHP's selection at every budget, interleaved, on the
run's held-out sentences (1 and 2 threads, batch 32 and 1). CAHP's pruned
encoder is the dense one after surgery to CAHP's kept heads; its distilled
weights have the same shapes, so the timing is the same. Each speed ratio
(median of per-repetition ratios) carries a 95% bootstrap interval over the
repetitions, and the 1.5x goal is met only when the interval's low end is at
or above it, not met when its high end is below it, undecided otherwise. Writes
``results/embedding_<configuration>.json`` (or ``--result-name``): the compare
report, the throughput, the texts' provenance, the bench settings and the
provenance of the run; `render` turns it into RESULTS.md's section.

The ``*_ffn`` configurations (``minilm_stsb_ffn``, ``mpnet_stsb_ffn``) run the
automatic joint pipeline instead, `cahp prune --objective embedding --ffn`
(`cahp.pipelines.prune.run_prune`, `cahp.pipelines.embedding_joint`): heads and
FFN neurons chosen together at the joint curve's knee (or at ``--target-speedup``),
on the same texts and the same STS-B task, one distillation, then the measured
latency speedup at each ``--cost-shapes`` shape (1x32 and 32x128) and the
encoding throughput (``--throughput-seconds`` / ``--throughput-threads``), each
ratio with its 95% interval. Run folder ``runs/bench/embedding-ffn-MODEL-sst5+mnli-small``
(its model/ and report.json are replaced when the settings change; the cached
stages are reused). The result holds the prune report and issue 22's goals for
this run: STS-B test Spearman within 1.0 point of dense, and at least 2x faster
in measured throughput, both decided from the 95% intervals (met / undecided /
not met; by the point estimate only where there is no interval)::

    python benchmarks/bench_embedding.py minilm_stsb_ffn --epochs 1 --max-train-examples 4000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_configuration_options, meta_lines, metadata, run_configurations, write_result  # noqa: E402,E501
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.core.io import machine_label, write_atomic  # noqa: E402
from cahp.data.tasks import get_task  # noqa: E402
from cahp.data.text import task_texts, unique_texts  # noqa: E402
from cahp.model.surgery import count_parameters, keep_heads  # noqa: E402
from cahp.pipelines.cache import StageCache  # noqa: E402
from cahp.pipelines.compare import CompareConfig  # noqa: E402
from cahp.pipelines.compare_embedding import EMBEDDING_METHODS, run_compare_embedding  # noqa: E402
from cahp.pipelines.embedding import prepare_embedding, sentence_length  # noqa: E402
from cahp.pipelines.embedding_eval import (  # noqa: E402
    ThroughputConfig,
    default_throughput,
    encoding_throughput,
    load_similarity_task,
    speedup_goal,
    speedup_interval,
    speedup_text,
)
from cahp.pipelines.joint_config import JointConfig  # noqa: E402
from cahp.pipelines.prune import run_prune  # noqa: E402
from cahp.pipelines.report_embedding import render_markdown  # noqa: E402
from cahp.pipelines.stages import PruneConfig  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402
from cahp.train.teacher import KD_FIELDS  # noqa: E402

log = logging.getLogger("bench_embedding")

# configuration name -> (model, tasks whose training sentences are distilled on, similarity task);
# results/embedding_<name>.json
CONFIGS = {
    "minilm_stsb": ("minilm-l6", ("sst5", "mnli-small"), "stsb"),
    "mpnet_stsb": ("mpnet-base", ("sst5", "mnli-small"), "stsb"),
    # the automatic joint run (heads + FFN neurons, `cahp prune --objective embedding --ffn`): see `is_joint`
    "minilm_stsb_ffn": ("minilm-l6", ("sst5", "mnli-small"), "stsb"),
    "mpnet_stsb_ffn": ("mpnet-base", ("sst5", "mnli-small"), "stsb"),
}
#: The issue's goals: CAHP at its knee within this many Spearman points (x 100) of the dense model ...
SPEARMAN_BOUND = 1.0
#: ... and at least this much faster in measured throughput (heads only).
SPEEDUP_GOAL = 1.5
#: The throughput measurement the speed goal is read from (1 thread, batch 32), when it was measured.
HEADLINE = "t1_b32"
#: The joint run's speed goal (heads + FFN neurons): at least this much faster in measured throughput.
JOINT_SPEEDUP_GOAL = 2.0


def is_joint(name: str) -> bool:
    """Whether configuration ``name`` is an automatic joint run (``*_ffn``) rather than a heads-only compare."""
    return name.endswith("_ffn")


# --- texts ----------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    """The form sentences are compared in for the STS-B exclusion: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def text_union(tasks, similarity_task: str, data_dir: str = "") -> tuple[list[str], dict]:
    """The unique training texts of ``tasks`` (labels ignored), minus every sentence of ``similarity_task``.

    Args:
        tasks: task names (built-in or folders); their training splits are read in place, in this order,
            both sides of a sentence pair each on its own (`cahp.data.text.task_texts`).
        similarity_task: the task scored zero-shot (stsb); no sentence of any of its splits is kept.
        data_dir: the data folder ("" for the default, ../shared/data).

    Returns:
        (texts in a fixed order: each task's file order, each text once at its first occurrence;
        ``{"sources": {task: unique texts}, "union", "similarity_task", "similarity_sentences",
        "excluded_similarity_sentences", "texts"}``).
    """
    per_task = {}
    for name in tasks:
        task = get_task(name, data_dir=data_dir or None)
        per_task[task.name] = task_texts(task)
    union = unique_texts(t for texts in per_task.values() for t in texts)
    sim = load_similarity_task(similarity_task, data_dir or None)
    banned = {_norm(s) for split in sim.splits for ex in sim.load(split)
              for s in (ex.text, ex.text_pair) if s is not None}
    texts = [t for t in union if _norm(t) not in banned]
    info = {"sources": {k: len(v) for k, v in per_task.items()}, "union": len(union), "similarity_task": sim.name,
            "similarity_sentences": len(banned), "excluded_similarity_sentences": len(union) - len(texts),
            "texts": len(texts)}
    log.info("%d unique texts from %s; %d of them also in %s (dropped); %d texts kept", len(union),
             " + ".join(per_task), info["excluded_similarity_sentences"], sim.name, len(texts))
    return texts, info


def write_texts(texts: list[str], folder: Path) -> Path:
    """``folder/texts-<sha256[:16]>.jsonl``: one JSON string a line, written atomically unless it exists
    (its name is its content's hash, so an existing file holds these texts)."""
    data = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    path = Path(folder) / f"texts-{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        write_atomic(path, data)
    return path


# --- the run --------------------------------------------------------------------------------------------


def settings(name: str, args) -> tuple[PruneConfig, FinetuneConfig, CompareConfig, dict]:
    """The run's settings from the configuration and the options (the text file is set by `run`)."""
    model, tasks, similarity = CONFIGS[name]
    out = Path(args.output_dir) if args.output_dir else REPO / "runs" / "bench" / f"embedding-{model}-{'+'.join(tasks)}"
    cfg = PruneConfig(model=model, task="+".join(tasks), output_dir=str(out), data_dir=args.data_dir or "",
                      objective=args.objective, similarity_task=similarity,
                      calibration_examples=args.calibration_examples, curve_examples=args.curve_examples,
                      stats_batch_size=args.stats_batch_size, seed=args.seed)
    ft = dataclasses.replace(from_args(FinetuneConfig, args), seed=args.seed)
    timing = {"threads": list(args.throughput_threads), "budget_s": args.throughput_seconds}
    return cfg, ft, from_args(CompareConfig, args), timing


def throughput_settings(timing: dict) -> ThroughputConfig:
    """The throughput measurement of the options ``timing`` (``{"threads", "budget_s"}``): the pipeline's default
    measurement (`default_throughput`: batch sizes, sentences, bootstrap resamples) at those threads and seconds."""
    return dataclasses.replace(default_throughput(), threads=tuple(timing["threads"]), budget_s=timing["budget_s"])


def prepare_texts(name: str, cfg: PruneConfig) -> dict:
    """The configuration's text union, written into the run folder and set as ``cfg.text_file``; returns the
    texts' provenance (with the file's path)."""
    _, tasks, similarity = CONFIGS[name]
    texts, texts_info = text_union(tasks, similarity, cfg.data_dir)
    cfg.text_file = str(write_texts(texts, Path(cfg.output_dir)))
    texts_info["file"] = cfg.text_file
    return texts_info


def run(name: str, args) -> Path:
    """Texts, the comparison, the throughput of CAHP's selections; writes and returns the results file
    (``*_ffn`` configurations: `run_joint`)."""
    if is_joint(name):
        return run_joint(name, args)
    cfg, ft, ccfg, timing = settings(name, args)
    texts_info = prepare_texts(name, cfg)
    result = run_compare_embedding(cfg, ft, ccfg, progress=not args.quiet)
    report = dict(result.report)
    report["configuration"] = name
    report["output_dir"] = cfg.output_dir
    report["texts_union"] = texts_info
    report["throughput"] = measure_throughput(cfg, ft, report, timing, progress=not args.quiet)
    report["bench_settings"] = {"prune": asdict(cfg), "distillation": asdict(ft), "compare": asdict(ccfg),
                                "throughput": timing}
    path = write_result(args.result_name or f"embedding_{name}", report, metadata())
    for line in goal_lines(report):
        log.info("%s", line)
    return path


def measure_throughput(cfg: PruneConfig, ft: FinetuneConfig, report: dict, timing: dict,
                       progress: bool = True) -> dict | None:
    """Sentences per second of the dense encoder and of CAHP's selection at every budget, interleaved
    (`encoding_throughput`, cached in ``OUTPUT/bench`` per machine); None with ``timing["budget_s"]`` 0."""
    if timing["budget_s"] <= 0:
        return None
    part = report["finetuned"] or report["no_finetune"]
    kept = {b["label"]: part["results"][b["label"]]["cahp"]["kept"] for b in report["budgets"]}
    speed_cfg = throughput_settings(timing)
    config = speed_cfg.key()  # every measurement setting: a cached throughput is never one measured otherwise
    key = {"texts": cfg.text_file, "model": cfg.model, "seed": cfg.seed, "kept": kept, "config": config,
           "machine": machine_label()}

    def compute() -> dict:
        # the compare's own prepared run (every stage cached): the dense encoder and the held-out sentences
        run = prepare_embedding(cfg, ft, Path(cfg.output_dir), progress)
        models, shapes = {"dense": run.model}, {"dense": {"heads": run.stats.n,
                                                          "parameters": count_parameters(run.model)}}
        for label, heads in kept.items():
            pruned = copy.deepcopy(run.model)
            keep_heads(pruned, {int(layer): hs for layer, hs in heads.items()})
            models[label] = pruned
            shapes[label] = {"heads": sum(len(hs) for hs in heads.values()), "parameters": count_parameters(pruned)}
        max_len = sentence_length(run.settings, ft)
        return {"models": shapes, "config": config, "machine": machine_label(),
                "measurements": encoding_throughput(models, run.tokenizer, run.curve_texts, run.settings, max_len,
                                                    cfg.seed, speed_cfg)}

    data = StageCache(Path(cfg.output_dir) / "bench").get_or_compute("throughput", key, compute)
    return {k: v for k, v in data.items() if not k.startswith("_")}


# --- the goals in words ---------------------------------------------------------------------------------


def _pts(x: float) -> str:
    return f"{x * 100:.2f}"


def _bound_verdict(diff: float, ci: list | None, bound: float) -> str:
    """Whether dense - CAHP (Spearman x 100) stays within ``bound``: by the point and by the 95% interval."""
    point = "within" if diff <= bound else "beyond"
    if ci is None:
        return f"{point} the {bound:.1f}-point bound"
    where = "wholly within" if ci[1] <= bound else "wholly beyond" if ci[0] > bound else "across"
    return f"{point} the {bound:.1f}-point bound; its 95% interval lies {where} it"


def goal_lines(report: dict) -> list[str]:
    """Plain-language lines on issue 22's goals: CAHP's knee, dense against CAHP's test Spearman at every
    budget (the difference against the 1.0-point bound with its paired interval), the measured throughput
    ratio with its 95% interval against 1.5x (met only when the whole interval is at or above it), and per
    budget CAHP's win / tie / loss counts against the baselines."""
    fine = report.get("finetuned")
    part = fine or report["no_finetune"]
    when = "after distillation" if fine else "without distillation"
    dense, heads = report["dense"], report["heads"]
    speed = report.get("throughput")
    seeds = report["settings"]["seeds"]
    lines = [f"{report['model']}: CAHP's knee k* = {report['k_star']} of {heads} heads (on {report['knee_score']}); "
             f"{report['similarity_task']} test ({report['data'].get('similarity_test_pairs')} pairs), zero-shot, "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}, heads only"]
    for b in report["budgets"]:
        label, cahp = b["label"], part["results"][b["label"]]["cahp"]
        dv = dense["vs_cahp"][label]["pooled"]  # dense minus CAHP, paired over the test pairs
        diff, ci = dv["diff"] * 100, [x * 100 for x in dv["ci95"]]
        line = (f"{label} ({b['k']} of {heads} heads), {when}: test Spearman dense {_pts(dense['spearman'])}, "
                f"CAHP {_pts(cahp['spearman'])}; dense - CAHP {diff:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] points, "
                + _bound_verdict(diff, ci, SPEARMAN_BOUND))
        lines.append(line)
        if speed and label in speed["models"]:
            lines.append("  " + _speed_line(speed, label))
    for b in report["budgets"]:
        per = part["results"][b["label"]]
        rivals = {m: s["vs_cahp"] for m, s in per.items() if s.get("vs_cahp")}
        counts = {v: sum(1 for c in rivals.values() if c["pooled"]["verdict"] == v) for v in ("win", "tie", "loss")}
        lines.append(f"{b['label']} ({b['k']} of {heads} heads), {when}: CAHP wins {counts['win']}, ties "
                     f"{counts['tie']}, loses {counts['loss']} against the {len(rivals)} baselines")
        for m, c in rivals.items():
            p, ps = c["pooled"], c["per_seed_verdicts"]
            lines.append(f"  {m}: {p['verdict']}, {m} - CAHP {p['diff'] * 100:+.2f} [{p['ci95'][0] * 100:+.2f}, "
                         f"{p['ci95'][1] * 100:+.2f}] points; per seed win / tie / loss "
                         f"{ps['win']} / {ps['tie']} / {ps['loss']}")
    return lines


def _speed_line(speed: dict, label: str) -> str:
    """CAHP's measured throughput ratio at one budget against the 1.5x goal, at the headline setting first."""
    meas = speed["measurements"]
    order = [HEADLINE, *(c for c in meas if c != HEADLINE)] if HEADLINE in meas else list(meas)
    first = meas[order[0]]
    verdict = speedup_goal(first, label, SPEEDUP_GOAL)
    why = {"met": "the interval's low end is at or above it", "not met": "the interval's high end is below it",
           "undecided": "no interval" if speedup_interval(first, label) is None else "the interval straddles it"}
    line = (f"measured throughput at {_combo(order[0])}: {first[label]['sentences_per_s']:.1f} against "
            f"{first['dense']['sentences_per_s']:.1f} sentences/s, {speedup_text(first, label)} (median of "
            f"per-repetition ratios over {first['reps']} repetitions, 95% bootstrap interval): the "
            f"{SPEEDUP_GOAL:g}x goal is {verdict} ({why[verdict]})")
    rest = [f"{_combo(c)} {speedup_text(meas[c], label)}" for c in order[1:]]
    return line + (f"; {', '.join(rest)}" if rest else "")


def _combo(name: str) -> str:
    """"t1_b32" -> "1 thread, batch 32"."""
    threads, batch = name[1:].split("_b")
    return f"{threads} thread{'s' if threads != '1' else ''}, batch {batch}"


def render(result: dict) -> str:
    """Markdown from a results/embedding_*.json file: provenance, the texts, the goals in plain words, the
    throughput table and the compare tables (a joint run's file: `render_joint`)."""
    if result.get("ffn"):
        return render_joint(result)
    body = render_markdown(result).splitlines()
    # drop the document title; nest the sections under make_results' section heading
    body = [("#" + line if line.startswith("## ") else line) for line in body[1:]]
    tu = result["texts_union"]
    sources = " + ".join(f"{k} ({v:,})" for k, v in tu["sources"].items())
    texts = (f"- distillation texts: the training sentences of {sources}, labels ignored: {tu['union']:,} unique, "
             f"{tu['excluded_similarity_sentences']} of them also in "
             f"{tu['similarity_task']} and dropped, {tu['texts']:,} used "
             f"({result['data']['train_texts']:,} distilled on, {result['data']['calibration_texts']:,} calibration, "
             f"{result['data']['curve_texts']:,} held out)\n")
    goals = "\n".join(f"- {line.strip()}" for line in goal_lines(result))
    return (meta_lines(result["meta"]) + texts + "\n" + goals + "\n" + _speed_table(result.get("throughput"))
            + "\n".join(body).strip("\n") + "\n")


def _speed_table(speed: dict | None) -> str:
    """The throughput of every measured model, sentences/s per setting, and its ratio to dense with its 95%
    bootstrap interval over the repetitions."""
    if not speed:
        return ""
    meas = speed["measurements"]
    lines = ["", f"### Measured throughput (sentences/s; {speed['machine']})", "",
             "| model | heads | parameters | " + " | ".join(_combo(c) for c in meas) + " |",
             "|---|---|---|" + "---|" * len(meas)]
    for name, shape in speed["models"].items():
        cells = [f"{meas[c][name]['sentences_per_s']:.1f}" + ("" if name == "dense" else
                                                              f" ({speedup_text(meas[c], name)})") for c in meas]
        lines.append(f"| {'dense' if name == 'dense' else 'CAHP ' + name} | {shape['heads']} | "
                     f"{shape['parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


# --- the automatic joint run (heads + FFN neurons) -------------------------------------------------------


def joint_settings(name: str, args) -> tuple[PruneConfig, FinetuneConfig, JointConfig, dict]:
    """The joint run's settings (`cahp prune --objective embedding --ffn`) from a ``*_ffn`` configuration and the
    options: the knee unless ``--target-speedup``; ``--no-finetune`` skips the distillation; the run replaces its
    folder's model/ and report.json when the settings change (its cached stages are reused)."""
    model, tasks, _ = CONFIGS[name]
    if args.throughput_seconds <= 0:  # the pipeline always measures the encoding throughput
        raise ValueError(f"{name}: the joint run measures throughput; --throughput-seconds must be > 0, "
                         f"got {args.throughput_seconds:g}")
    if args.target_speedup and args.target_speedup <= 1:
        raise ValueError(f"--target-speedup must be above 1 (0: the knee), got {args.target_speedup:g}")
    out = (Path(args.output_dir) if args.output_dir
           else REPO / "runs" / "bench" / f"embedding-ffn-{model}-{'+'.join(tasks)}")
    cfg, ft, _, timing = settings(name, args)  # the heads-only run's settings, in the joint run's own folder
    cfg = dataclasses.replace(cfg, output_dir=str(out), ffn=True, target_speedup=args.target_speedup,
                              skip_final_finetune=not args.finetune, overwrite=True)
    return cfg, ft, from_args(JointConfig, args), timing


def run_joint(name: str, args) -> Path:
    """The texts, then `run_prune` with ``--objective embedding --ffn``; writes and returns the results file:
    the prune report, the texts' provenance, the bench settings, issue 22's goals (`joint_goals`)."""
    cfg, ft, joint, timing = joint_settings(name, args)
    texts_info = prepare_texts(name, cfg)
    # the pipeline's throughput at the options' threads and seconds (the whole config is in its cache key)
    report = dict(run_prune(cfg, ft, progress=not args.quiet, joint=joint,
                            throughput_cfg=throughput_settings(timing)).report)
    report.pop("environment", None)  # the result's meta has the machine
    report["configuration"] = name
    report["output_dir"] = cfg.output_dir
    report["texts_union"] = texts_info
    report["bench_settings"] = {"prune": asdict(cfg), "distillation": asdict(ft), "joint": asdict(joint),
                                "throughput": timing}
    report["goals"] = joint_goals(report)
    path = write_result(args.result_name or f"embedding_{name}", report, metadata())
    for line in joint_goal_lines(report):
        log.info("%s", line)
    return path


def _final_part(report: dict) -> str:
    """The scores the goals are read from: after distillation, or after pruning when it was skipped."""
    return "after_distillation" if report["scores"].get("after_distillation") else "after_pruning"


def _interval_goal(ratio: float, ci, goal: float) -> dict:
    """``{"speedup", "ci95", "goal", "verdict"}``: `speedup_goal`'s rule (the 95% interval decides; undecided
    without one) on one ratio."""
    entry = {"speedup": {"x": ratio}, "speedup_ci95": {"x": ci}}
    return {"speedup": ratio, "ci95": speedup_interval(entry, "x"), "goal": goal,
            "verdict": speedup_goal(entry, "x", goal)}


def joint_goals(report: dict) -> dict:
    """Issue 22's goals for the joint run, decided from the 95% intervals.

    ``spearman``: dense - pruned STS-B test Spearman (x 100, after distillation), its paired interval (from the
    report's ``versus_dense``, pruned - dense, negated), and the verdict against `SPEARMAN_BOUND`: met when the
    interval's high end is at or below it, not met when its low end is above it, undecided otherwise (without an
    interval: the point estimate, ``"basis": "point"``). ``throughput``: the encoding throughput ratio at each
    measured setting against `JOINT_SPEEDUP_GOAL` (`speedup_goal`), ``headline`` the one the goal is read from
    (`HEADLINE`, 1 thread, batch 32); ``latency``: joint's measured speedup at each shape, the same rule.
    """
    part = _final_part(report)
    s, goals = report["scores"], {"scores_from": part}
    if "similarity_test" in (s["dense"] or {}):
        dense, pruned = s["dense"]["similarity_test"]["spearman"], s[part]["similarity_test"]["spearman"]
        diff = (dense - pruned) * 100
        paired = ((report.get("versus_dense") or {}).get(part) or {}).get("spearman")
        ci = sorted(-x * 100 for x in paired["ci95"]) if paired and None not in paired["ci95"] else None
        if ci is None:
            verdict = "met" if diff <= SPEARMAN_BOUND else "not met"
        else:
            verdict = "met" if ci[1] <= SPEARMAN_BOUND else "not met" if ci[0] > SPEARMAN_BOUND else "undecided"
        goals["spearman"] = {"dense": dense, "pruned": pruned, "dense_minus_pruned_points": diff,
                             "ci95_points": ci, "bound_points": SPEARMAN_BOUND, "verdict": verdict,
                             "basis": "interval" if ci is not None else "point"}
    speed = report.get("throughput") or {}
    goals["throughput"] = {c: {**_interval_goal(e["speedup"]["pruned"], e["speedup_ci95"].get("pruned"),
                                                JOINT_SPEEDUP_GOAL),
                               "dense_sentences_per_s": e["dense"]["sentences_per_s"],
                               "pruned_sentences_per_s": e["pruned"]["sentences_per_s"], "reps": e["reps"]}
                           for c, e in speed.items()}
    goals["headline"] = HEADLINE if HEADLINE in speed else next(iter(speed), None)
    goals["latency"] = {shape: {**_interval_goal(m["speedup"], m["ci95"], JOINT_SPEEDUP_GOAL),
                                "dense_ms": m["dense_ms"], "pruned_ms": m["pruned_ms"], "reps": m["reps"]}
                        for shape, m in (report.get("measured_speedup") or {}).items()}
    return goals


def _ci_text(ci, fmt: str = "{:.2f}") -> str:
    return "[no interval]" if ci is None else f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def joint_goal_lines(result: dict) -> list[str]:
    """Plain-language lines on the joint run: what was kept (heads, FFN neurons, parameters, how it was chosen),
    the Spearman goal with its paired interval, the throughput goal at the headline setting with its interval,
    the other throughput settings and the measured latency speedups."""
    g = result["goals"]
    p = result["parameters"]
    when = "after distillation" if g["scores_from"] == "after_distillation" else "without distillation"
    lines = [f"{result['model']} (heads + FFN neurons, {result['k_source']} on {result['knee_score']}): kept "
             f"{result['heads_kept']} of {result['heads_before']} heads and {result['neurons_kept']:,} of "
             f"{result['neurons_before']:,} FFN neurons, parameters {p['before']:,} -> {p['after']:,} "
             f"({p['after'] / p['before']:.1%}); estimated share {result['estimated_share']:.3f}"]
    sp = g.get("spearman")
    if sp:
        why = {"met": "the interval's high end is at or below it", "not met": "the interval's low end is above it",
               "undecided": "the interval straddles it"}
        basis = (why[sp["verdict"]] if sp["basis"] == "interval"
                 else "by the point estimate; no paired interval")
        lines.append(f"{result['similarity_task']} test ({result['data'].get('similarity_test_pairs')} pairs), "
                     f"zero-shot, {when}: Spearman dense {_pts(sp['dense'])}, pruned {_pts(sp['pruned'])}; dense - "
                     f"pruned {sp['dense_minus_pruned_points']:+.2f} {_ci_text(sp['ci95_points'], '{:+.2f}')} "
                     f"points (paired bootstrap over the test pairs): the {SPEARMAN_BOUND:.1f}-point goal is "
                     f"{sp['verdict']} ({basis})")
    why = {"met": "the interval's low end is at or above it", "not met": "the interval's high end is below it",
           "undecided": "the interval straddles it"}
    head = g.get("headline")
    if head:
        t = g["throughput"][head]
        reason = why[t["verdict"]] if t["ci95"] is not None else "no interval"
        rest = [f"{_combo(c)} {t2['speedup']:.2f}x {_ci_text(t2['ci95'])} ({t2['verdict']})"
                for c, t2 in g["throughput"].items() if c != head]
        lines.append(f"measured throughput at {_combo(head)}: {t['pruned_sentences_per_s']:.1f} against "
                     f"{t['dense_sentences_per_s']:.1f} sentences/s, {t['speedup']:.2f}x {_ci_text(t['ci95'])} "
                     f"(median of per-repetition ratios over {t['reps']} repetitions, 95% bootstrap interval): the "
                     f"{JOINT_SPEEDUP_GOAL:g}x goal is {t['verdict']} ({reason})"
                     + (f"; {', '.join(rest)}" if rest else ""))
    if g["latency"]:
        lines.append("measured latency speedup (dense / pruned median, 95% bootstrap interval): " + ", ".join(
            f"{shape} {m['speedup']:.2f}x {_ci_text(m['ci95'])} ({m['dense_ms']:.1f} -> {m['pruned_ms']:.1f} ms, "
            f"{m['reps']} repetitions; {JOINT_SPEEDUP_GOAL:g}x {m['verdict']})" for shape, m in g["latency"].items()))
    return lines


def render_joint(result: dict) -> str:
    """Markdown from a joint run's results/embedding_*_ffn.json: provenance, the texts, the goals in plain words,
    the scores table, the kept structure per layer and the measured speed table."""
    tu, data = result["texts_union"], result["data"]
    sources = " + ".join(f"{k} ({v:,})" for k, v in tu["sources"].items())
    texts = (f"- distillation texts: the training sentences of {sources}, labels ignored: {tu['union']:,} unique, "
             f"{tu['excluded_similarity_sentences']} of them also in {tu['similarity_task']} and dropped, "
             f"{tu['texts']:,} used ({data['train_texts']:,} distilled on, {data['calibration_texts']:,} "
             f"calibration, {data['curve_texts']:,} held out)\n")
    goals = "\n".join(f"- {line}" for line in joint_goal_lines(result))
    lines = ["", "### Scores", "", "| model | held-out fidelity | test Spearman (95%) | test Pearson |",
             "|---|---|---|---|"]
    for part, label in (("dense", "dense"), ("after_pruning", "pruned"), ("after_distillation", "pruned, distilled")):
        sc = result["scores"].get(part)
        if not sc:
            continue
        st = sc.get("similarity_test") or {}
        sp = (f"{_pts(st['spearman'])} {_ci_text([x * 100 for x in st['spearman_ci95']])}"
              if st.get("spearman_ci95") else _pts(st["spearman"]) if st else "-")
        lines.append(f"| {label} | {sc['heldout_fidelity']:.4f} | {sp} | "
                     f"{_pts(st['pearson']) if 'pearson' in st else '-'} |")
    lines += ["", "### Kept per layer", "", "| layer | heads | FFN neurons |", "|---|---|---|"]
    lines += [f"| {i} | {h} | {n} |" for i, (h, n) in enumerate(zip(result["heads_per_layer"],
                                                                      result["neurons_per_layer"]))]
    speed = result["goals"]["throughput"]
    if speed:
        lines += ["", f"### Measured throughput (sentences/s; {result['meta']['machine']['cpu']})", "",
                  "| model | " + " | ".join(_combo(c) for c in speed) + " |", "|---|" + "---|" * len(speed),
                  "| dense | " + " | ".join(f"{t['dense_sentences_per_s']:.1f}" for t in speed.values()) + " |",
                  "| pruned | " + " | ".join(f"{t['pruned_sentences_per_s']:.1f} ({t['speedup']:.2f}x "
                                           f"{_ci_text(t['ci95'])})" for t in speed.values()) + " |"]
    lat = result["goals"]["latency"]
    if lat:
        lines += ["", "### Measured latency (ms, median; 1x32 = batch 1, 32 tokens)", "",
                  "| shape | dense | pruned | speedup (95%) |", "|---|---|---|---|"]
        lines += [f"| {s} | {m['dense_ms']:.2f} | {m['pruned_ms']:.2f} | {m['speedup']:.2f}x {_ci_text(m['ci95'])} |"
                  for s, m in lat.items()]
    return meta_lines(result["meta"]) + texts + "\n" + goals + "\n" + "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", choices=list(CONFIGS), help="named configurations to run, in order")
    # --methods (default: the embedding comparison's), --budgets, --seeds, --[no-]knee, --[no-]finetune,
    # --n-bootstrap; the dense model is the teacher (no dense control), heads only (no speedups)
    add_dataclass_args(p.add_argument_group("comparison"), CompareConfig(methods=list(EMBEDDING_METHODS)),
                       skip=("dense_control", "speedups"))
    # --epochs, --lr, --batch-size, --max-length, --patience, --max-train-examples (texts distilled on), ...
    add_dataclass_args(p.add_argument_group("distillation"), FinetuneConfig, skip=("seed", "metric", *KD_FIELDS))
    p.add_argument("--objective", default="embedding", choices=["embedding", "embedding-mse"],
                   help="embedding distance: cosine (embedding) or squared error (embedding-mse)")
    p.add_argument("--calibration-examples", type=int, default=PruneConfig.calibration_examples,
                   help="texts for signatures and salience")
    p.add_argument("--curve-examples", type=int, default=PruneConfig.curve_examples,
                   help="texts held out for the curve, the distillation's early stopping and the throughput")
    p.add_argument("--stats-batch-size", type=int, default=PruneConfig.stats_batch_size,
                   help="texts per batch of the statistics passes")
    speed = default_throughput()
    p.add_argument("--throughput-seconds", type=float, default=speed.budget_s,
                   help="seconds of interleaved repetitions per throughput setting (0: no throughput)")
    p.add_argument("--throughput-threads", type=int, nargs="+", default=list(speed.threads),
                   help="torch threads of the throughput measurements")
    p.add_argument("--seed", type=int, default=0)
    # the *_ffn configurations: --target-speedup (0: the knee), the --ffn settings (--cost-shapes,
    # --speedup-budget, --grid-points, ...)
    p.add_argument("--target-speedup", type=float, default=0.0,
                   help="*_ffn: reach this estimated speedup instead of the knee (0: the knee)")
    add_dataclass_args(p.add_argument_group("joint runs (*_ffn configurations)"), JointConfig)
    add_configuration_options(p, "embedding-MODEL-TASKS (*_ffn: embedding-ffn-MODEL-TASKS)", "embedding")
    return p


def main() -> None:
    run_configurations(build_parser, run, log)


if __name__ == "__main__":
    main()
