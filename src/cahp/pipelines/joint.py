"""`cahp prune --ffn`: heads and FFN neurons pruned together, CAHP-style, with an automatic latency budget.

`run_joint` reads as its steps (the first four shared with heads-only `cahp prune`
through `cahp.pipelines.prune.prepare_run`, the same cache, the same folders):

- 0-2. fine-tuned dense model, head signatures and distances, head salience;
- `neuron_stats`: one pass with head and neuron gates: salience of every head
  and neuron from the same loss, and per-layer activation correlations of the
  neurons (`cahp.stats.neurons.collect_neuron_stats`);
- `cost_tables`: what a head and a neuron of each layer cost at batch 1 x 32
  and 32 x 128 (`cahp.budget.cost.cost_table`);
- `joint_curve`: for each target share of dense latency on a grid from 1.0
  down, `allocate` heads and neurons per layer, pick which ones CAHP-style in
  each layer (`cahp.selectors.joint.JointSelector`: salience discounted by
  nearness to the units kept before, or complementary clusters and the most
  salient member of each) and score the selection through head and
  neuron gates on the held-out curve data (gate 0 is exactly removal);
- the knee of score against estimated share (`cahp.budget.joint_curve.knee_share`),
  or ``--target-speedup X`` (share ``1 / X``);
- `joint_surgery_and_finetune`: remove the other heads and neurons, fine-tune
  once, evaluate, save ``OUTPUT/model``; then the measured speedup of the saved
  folder against the dense model (`cahp.pipelines.joint_report.measure_speedup`).

The steps after the dense model are objective-neutral: `build_joint` takes the
loss of the neuron pass and the curve's scorer, `choose_selection` reads the knee
(or ``--target-speedup``) and picks the units, and `joint_report.joint_fields` is
the report's joint part; `cahp.pipelines.embedding_joint` runs them on an
embedding model without labels (``--objective embedding --ffn``).

The budget axis is the mean of the estimated shares at 1 x 32 and 32 x 128
(`combined_table`): the two shapes stand for latency-bound serving and batch
throughput, whose costs differ (per-call overheads weigh at 1 x 32, attention's
quadratic part at 32 x 128); a model selected for one shape alone can miss the
other, and the mean of two shares is still linear in the block costs, so the
allocation stays exact.

Cost source: ``"measured"`` by default. Timing every block of minilm-l6 at
three widths and both shapes takes a small part of a 30-minute run on a 2-core
CPU (and is cached per machine across runs), and only a measurement sees the
fixed per-block costs (kernel launches, LayerNorms, an emptied block's
residual path) that decide at batch 1 x 32 whether emptying a block pays;
multiply-adds (``"macs"``) have no fixed part and are the fallback when no
quiet machine is at hand or for tests. The table is measured with one thread,
as the speedup is.

Heads and neurons on one scale: see `cahp.budget.joint_curve.fair_values`; the
curve tries each of ``head_weights`` at every share and keeps the split of
lowest held-out loss (``choose_by``, `CahpJoint.best`): the split of the budget
between kinds is the curve's decision. Where no split's loss is below the best
constant predictor's (``collapsed``), the labels cannot choose, and the split
whose last hidden states are closest to the dense model's is kept (mean cosine
over real tokens, `cahp.train.evaluate.hidden_fidelity`): the representation
the one fine-tuning starts from, measured without the collapsed classifier.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.bench.config import parse_shapes
from cahp.bench.timing import apply_allocator, choose_kernel, make_inputs
from cahp.bench.variants import prepare_for_inference
from cahp.budget.cost import SOURCES, CostTable, cost_table
from cahp.budget.curve import curve_metric
from cahp.budget.joint_curve import aim_each, combined_table, floor_share, knee_share, share_grid, worst_share
from cahp.core import distributed
from cahp.core.threads import num_threads
from cahp.model.checkpoint import is_pruned_folder, load_pruned, save_pruned
from cahp.model.gates import head_gates
from cahp.model.heads import KEPT_HEADS_KEY, kept_mask, num_kept
from cahp.model.neuron_surgery import keep_neurons
from cahp.model.neurons import KEPT_NEURONS_KEY, encode_kept_neurons, kept_neuron_mask, neuron_gates, neuron_shape
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines import joint_report
from cahp.pipelines.joint_config import JointConfig, JointSetupError
from cahp.pipelines.stages import PreparedRun, PruneConfig, PruneResult, prepare_run
from cahp.selectors.joint import LINKAGES, Allocation
from cahp.selectors.joint_base import HeldOut, JointProblem, JointSelection
from cahp.selectors.joint_methods import CahpJoint
from cahp.stats.neurons import NeuronStats, collect_neuron_stats
from cahp.stats.salience import LossFn
from cahp.train.evaluate import evaluate_task, hidden_fidelity, predict, predict_hidden
from cahp.train.finetune import FinetuneConfig, finetune
from cahp.train.metrics import chance_loss, mean_loss
from cahp.train.teacher import teacher_key

log = logging.getLogger(__name__)

__all__ = ["GateScore", "JointChoice", "JointConfig", "JointRun", "JointSetupError", "best_point", "build_joint",
           "check_settings", "choose_selection", "cost_tables", "dense_counts", "find_share_star", "joint_curve",
           "joint_problem", "kept_check", "neuron_stats", "prepare_joint", "run_joint", "score_units", "target_point"]

#: ``score(head gates (layers, heads), neuron gates (layers, d_ff))``: the curve's held-out score through gates
#: (higher is better): a number, a `HeldOut` (score and loss), or a dict whose ``"score"`` is that number,
#: whose optional ``"loss"`` is the held-out loss and whose other entries the curve point records beside
#: them (e.g. fidelity and dev Spearman of the embedding objective).
GateScore = Callable[[torch.Tensor, torch.Tensor], "float | HeldOut | dict"]


def check_settings(cfg: PruneConfig, joint: JointConfig) -> None:
    """One-line errors, before any work, for ``--ffn`` settings that do not go together."""
    if cfg.keep or cfg.keep_ratio:
        raise JointSetupError("--keep and --keep-ratio count heads only; with --ffn use --target-speedup")
    x = cfg.target_speedup
    if x and (not math.isfinite(x) or x <= 1):
        raise JointSetupError(f"--target-speedup must be above 1 (0: the knee), got {x}")
    if joint.cost_source not in SOURCES:
        raise JointSetupError(f"unknown cost source {joint.cost_source!r}; choose from {', '.join(SOURCES)}")
    if joint.linkage not in LINKAGES:
        raise JointSetupError(f"unknown linkage {joint.linkage!r}; choose from {', '.join(LINKAGES)}")
    parse_shapes(joint.cost_shapes)
    joint.weights()
    share_grid(joint.grid_points, joint.min_share)
    if x and 1 / x < joint.min_share / 2:
        log.warning("--target-speedup %s lies far below the curve's smallest share %s", x, joint.min_share)


def neuron_stats(run, progress: bool = True, loss_fn: LossFn | None = None,
                 loss_key: dict | None = None) -> tuple[NeuronStats, dict]:
    """(`NeuronStats` of the dense model on the calibration batches, its cache key).

    ``run``: a `PreparedRun` (or any run with ``identity``, ``stages``, ``model``, ``calibration_batches`` and
    ``cfg``, e.g. `cahp.pipelines.embedding.EmbeddingRun`). ``loss_fn``: the loss of the gate gradients
    (default: the labelled loss); ``loss_key`` describes it in the cache key (required with ``loss_fn``).
    Cached as tensors; the per-layer correlations are stored in float32 (d_ff^2
    per layer, half of float64; distances ``1 - |corr|`` need no more precision).
    """
    if loss_fn is not None and not loss_key:
        raise ValueError("neuron_stats: a loss_fn needs a loss_key that tells its results apart in the cache")
    key = {**run.identity, "stage": "neuron_stats", "batch": run.cfg.stats_batch_size}
    if loss_key:  # the labelled loss keeps the key it always had
        key["loss"] = loss_key

    def compute() -> dict:
        stats = collect_neuron_stats(run.model, run.calibration_batches, heads=True, signatures=True,
                                     progress=progress, loss_fn=loss_fn)
        state = stats.state_dict()
        state["correlation"] = [None if c is None else c.float() for c in state["correlation"]]
        return state

    state = run.stages.get_or_compute("neuron_stats", key, compute, tensors=True)
    return NeuronStats.from_state_dict(state), key


def cost_tables(run, joint: JointConfig) -> tuple[list[CostTable], dict]:
    """(one `CostTable` per shape of ``joint.cost_shapes``, the cache key) for the dense model.

    Measured tables time the model as the speedup is measured (`joint_report.measure_speedup`): freed
    memory held, and at each shape the dense model's fastest attention kernel (`choose_kernel`); the
    kernel changes the per-call overheads that the table's fixed costs and ``rest`` hold.
    """
    shapes = parse_shapes(joint.cost_shapes)
    key = {**run.identity, "stage": "cost", "source": joint.cost_source, "shapes": shapes,
           "threads": joint.cost_threads, "kernel": "auto", "allocator": "held"}

    def table(batch: int, seq: int) -> dict:
        if joint.cost_source != "measured":
            return cost_table(run.model, batch, seq, source=joint.cost_source).to_dict()
        apply_allocator(True)
        model = prepare_for_inference(copy.deepcopy(run.model).cpu())
        with num_threads(joint.cost_threads):  # the kernel chosen at the count the table is measured at
            choose_kernel([model], "auto", make_inputs(model, batch, seq, seed=run.cfg.seed), None, 2, {})
        return cost_table(model, batch, seq, source="measured", threads=joint.cost_threads).to_dict()

    def compute() -> dict:
        tables = distributed.on_main(lambda: [table(b, s) for b, s in shapes])
        return {"tables": distributed.broadcast_object(tables)}

    data = run.stages.get_or_compute("cost", key, compute, label="cost_table")
    return [CostTable.from_dict(t) for t in data["tables"]], key


def score_units(model, head_mask: torch.Tensor, neuron_mask: torch.Tensor, batches, labels: np.ndarray,
                metric: str = "accuracy", reference: list | None = None) -> HeldOut:
    """``metric`` and mean loss (`mean_loss`) of ``model`` with heads and neurons gated by ((layers, heads),
    (layers, d_ff)) gate values, on ``batches`` (class ids, or float targets for a one-output model); with the
    dense model's last hidden states per batch (``reference``, `predict_hidden`), their fidelity too
    (`hidden_fidelity`, in the same pass)."""
    with head_gates(model, init=head_mask.float()), neuron_gates(model, init=neuron_mask.float()):
        if reference is None:
            preds, logits = predict(model, batches, len(labels), progress=False)
            fidelity = None
        else:
            preds, logits, hidden = predict_hidden(model, batches, len(labels))
            fidelity = hidden_fidelity(hidden, reference, batches)
    return HeldOut(score=curve_metric(metric, preds, logits, labels), loss=mean_loss(logits, labels),
                   fidelity=fidelity)


def joint_problem(run, stats: NeuronStats, table: CostTable, score: bool = True, gate_score: GateScore | None = None,
                  details: dict | None = None) -> JointProblem:
    """The `JointProblem` of a prepared run: the neuron pass's statistics, the table, the dense model and data.

    ``score``: give the problem a held-out scorer through gates (tuned gate values where a selection has them):
    ``gate_score`` (a `GateScore`), by default the run's metric and mean loss on its curve data (`score_units`).
    ``details``: where a ``gate_score`` that returns a dict leaves it, keyed by the selection's
    (heads per layer, neurons per layer).
    """
    model = run.model
    shapes = (tuple(kept_mask(model).shape), tuple(neuron_shape(model.config)))
    chance = None  # a custom scorer's loss has no constant-predictor bound here
    if gate_score is None:
        chance = chance_loss(run.curve_labels, model.config.num_labels)
        dense: dict = {}  # the dense model's last hidden states on the curve data, made at the first score

        def gate_score(hg: torch.Tensor, ng: torch.Tensor) -> HeldOut:
            if "hidden" not in dense:
                dense["hidden"] = predict_hidden(model, run.curve_batches, len(run.curve_labels))[2]
            return score_units(model, hg, ng, run.curve_batches, run.curve_labels, metric=run.metric,
                               reference=dense["hidden"])

    def scorer(sel: JointSelection) -> HeldOut:
        value = gate_score(*sel.gate_values(*shapes))
        if isinstance(value, dict):
            if details is not None:
                counts = sel.counts(shapes[0][0])  # (heads per layer, neurons per layer)
                details[tuple(map(tuple, counts))] = {k: v for k, v in value.items() if k not in ("score", "loss")}
            loss = value.get("loss")
            fid = value.get("fidelity")
            value = HeldOut(score=float(value["score"]), loss=None if loss is None else float(loss),
                            fidelity=None if fid is None else float(fid))
        return HeldOut.of(value)

    return JointProblem(
        table=table, head_salience=stats.head_salience.numpy(), head_fisher=stats.head_fisher.numpy(),
        neuron_salience=stats.salience.numpy(), neuron_fisher=stats.fisher.numpy(),
        heads_present=kept_mask(model).numpy(), neurons_present=kept_neuron_mask(model).numpy(),
        head_distances=run.stats.distances[run.cfg.distance].numpy(), head_ids=run.stats.head_ids,
        neuron_stats=stats, model=model, batches=run.calibration_batches, score=scorer if score else None,
        seed=run.cfg.seed, chance_loss=chance,
    )


@dataclass
class JointRun:
    """The stages `cahp prune --ffn` and `cahp compare --ffn` share: the prepared run, the neuron statistics, the
    cost tables, the joint problem and CAHP's joint method (and the cache keys of the curve).

    ``run``: a `PreparedRun`, or an `cahp.pipelines.embedding.EmbeddingRun` (``--objective embedding``).
    ``details``: the extra entries of the scorer's results (`GateScore`), by (heads, neurons) per layer.
    """

    run: object
    joint: JointConfig
    stats: NeuronStats
    tables: list[CostTable]
    table: CostTable
    problem: JointProblem
    method: CahpJoint
    key: dict
    details: dict = field(default_factory=dict)


def prepare_joint(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True,
                  joint: JointConfig | None = None, task=None) -> JointRun:
    """Steps 0-2 of `prepare_run`, then the neuron statistics and the cost tables (all cached)."""
    joint = joint or JointConfig()
    run = prepare_run(cfg, ft_cfg, out, progress, task)  # steps 0-2 and the head salience, shared with heads-only
    return build_joint(run, joint, progress)


def build_joint(run, joint: JointConfig, progress: bool = True, *, loss_fn: LossFn | None = None,
                loss_key: dict | None = None, gate_score: GateScore | None = None,
                score_key: dict | None = None) -> JointRun:
    """The `JointRun` of a prepared dense model: neuron statistics, cost tables, problem, method (cached).

    ``run``: a `PreparedRun` (the task objective) or an `cahp.pipelines.embedding.EmbeddingRun`. The objective
    enters through ``loss_fn`` / ``loss_key`` (the neuron pass's loss, `neuron_stats`; default: the labelled
    loss) and ``gate_score`` / ``score_key`` (the curve's held-out score through gates and its description in
    the curve's cache key; default: accuracy on the curve data).
    """
    if gate_score is not None and not score_key:
        raise ValueError("build_joint: a gate_score needs a score_key that tells its curve apart in the cache")
    longest = get_adapter(run.model).max_positions(run.model.config)
    if any(seq > longest for _, seq in parse_shapes(joint.cost_shapes)):
        raise JointSetupError(f"cost shapes {joint.cost_shapes} are longer than the model allows ({longest} tokens)")
    stats, stats_key = neuron_stats(run, progress, loss_fn=loss_fn, loss_key=loss_key)
    tables, cost_key = cost_tables(run, joint)
    table = combined_table(tables)
    method = CahpJoint(head_weights=tuple(joint.weights()), linkage=joint.linkage, choose_by=joint.choose_by,
                       within=joint.within, collapsed=joint.collapsed)
    key = {**run.keys["signatures"], "stats": stats_key, "cost": cost_key, "distance": run.cfg.distance,
           "linkage": joint.linkage, "head_weights": joint.weights(), "choose_by": joint.choose_by,
           "stage": "curve-ffn"}
    if joint.within != "clusters":  # curves of the cluster rule keep the key they always had
        key["within"] = joint.within
    if joint.collapsed != "lowest":  # curves made before the rule for collapsed splits kept the lowest loss
        key["collapsed"] = joint.collapsed
    if gate_score is None and run.metric != "accuracy":  # a regression task's curve is of its metric
        key["metric"] = run.metric
    if score_key:  # accuracy curves keep the key they always had
        key["score"] = score_key
    details: dict = {}
    problem = joint_problem(run, stats, table, gate_score=gate_score, details=details)
    return JointRun(run=run, joint=joint, stats=stats, tables=tables, table=table, problem=problem, method=method,
                    key=key, details=details)


def best_point(jr: JointRun, share: float) -> dict | None:
    """CAHP's chosen allocation at ``share`` (`CahpJoint.best`) as a curve point (None if no head weight reaches
    it)."""
    cands = jr.method.candidates(share, jr.problem)
    if not cands:
        log.info("share %.3f: no head weight reaches it", share)
        return None
    best = jr.method.best(cands, jr.problem.chance_loss)
    alloc = best["allocation"]
    # "accuracy": the curve's held-out score (accuracy for the task objective; see `GateScore` for others)
    return {"target_share": share, "estimated_share": alloc.share, "accuracy": best["score"], "loss": best["loss"],
            "head_weight": best["head_weight"], "heads_per_layer": alloc.heads, "neurons_per_layer": alloc.neurons,
            "fidelity": best["fidelity"], "collapsed": jr.method.collapsed_split(cands, jr.problem.chance_loss),
            "decided_by": jr.method.decided_by(cands, jr.problem.chance_loss),
            **jr.details.get((tuple(alloc.heads), tuple(alloc.neurons)), {}),
            "candidates": [{"head_weight": c["head_weight"], "accuracy": c["score"], "loss": c["loss"],
                            "fidelity": c["fidelity"], "estimated_share": c["allocation"].share} for c in cands]}


def target_point(jr: JointRun, share: float) -> dict | None:
    """`best_point` at a target share, which bounds the mean of the shapes' shares or, with ``--speedup-at
    each``, every shape's share (`aim_each`; the point then records ``aimed_share``). None where unreachable."""
    if jr.joint.speedup_at == "mean":
        return best_point(jr, share)
    point, aimed = aim_each(lambda s: best_point(jr, s),
                            lambda p: worst_share(jr.tables, p["heads_per_layer"], p["neurons_per_layer"]), share)
    if point is not None:
        point = {**point, "target_share": share, "aimed_share": aimed}
    return point


def joint_curve(jr: JointRun, progress: bool = True) -> dict:
    """The curve: the best allocation of every target share of `share_grid`, scored (cached stage)."""
    joint = jr.joint
    # the grid stops just above the lowest share reachable (an unreachable point would be lost)
    low = max(joint.min_share, round(floor_share(jr.table) + 0.01, 3))
    grid = share_grid(joint.grid_points, low)

    def compute() -> dict:
        t0 = time.perf_counter()
        points = []
        for share in tqdm(grid, desc="joint curve", disable=not distributed.show_progress(progress), mininterval=2):
            p = best_point(jr, share)
            if p is None:
                log.warning("no allocation reaches an estimated share of %.3f: the curve stops there", share)
                break
            points.append(p)
            log.info("share %.3f: estimated %.3f, %d heads, %d neurons, score %.4f (head weight %g)", share,
                     p["estimated_share"], sum(p["heads_per_layer"]), sum(p["neurons_per_layer"]), p["accuracy"],
                     p["head_weight"])
        return {"points": points, "seconds": round(time.perf_counter() - t0, 2)}

    return jr.run.stages.get_or_compute("curve-ffn", {**jr.key, "grid": grid}, compute, label="curve")


def find_share_star(points: list[dict], cfg: PruneConfig):
    """(knee share, `KneeResult`, the curve point at it): the knee of held-out score against estimated share."""
    share_star, knee = knee_share([p["estimated_share"] for p in points], [p["accuracy"] for p in points],
                                  degree=cfg.degree or None, method=cfg.knee_method)
    if knee.warning:
        log.warning("knee: %s", knee.warning)
    return share_star, knee, next(p for p in points if p["estimated_share"] == share_star)


def kept_check(heads: dict, neurons: dict | None, size: int = 0):
    """An artifact check: the folder holds a pruned model keeping exactly ``heads`` and ``neurons`` (``size``:
    d_ff); ``neurons`` None: every neuron (a heads-only pruned model, no neuron record)."""
    want_h = {str(k): list(v) for k, v in heads.items()}
    want_n = None if neurons is None else encode_kept_neurons(neurons, size, len(neurons))

    def check(path: Path) -> bool:
        if not is_pruned_folder(path):
            return False
        config = json.loads((path / "config.json").read_text())
        return config.get(KEPT_HEADS_KEY) == want_h and config.get(KEPT_NEURONS_KEY) == want_n

    return check


def joint_surgery_and_finetune(run: PreparedRun, heads: dict, neurons: dict, progress: bool):
    """(pruned model, scores): a copy of the dense model keeping ``heads`` and ``neurons``, evaluated,
    fine-tuned once (unless ``skip_final_finetune``) and evaluated again; saved as ``OUTPUT/model``."""
    cfg, ft_cfg, task, tok = run.cfg, run.ft_cfg, run.task, run.tokenizer
    pruned = copy.deepcopy(run.model)
    keep_heads(pruned, heads)
    keep_neurons(pruned, neurons)
    model_dir = run.out / "model"
    made = {}

    def compute() -> dict:
        def test() -> dict:
            return evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length, seed=cfg.seed, progress=progress)

        scores = {"test_after_pruning": test()}
        if not cfg.skip_final_finetune:
            scores["finetune"] = finetune(pruned, tok, task, ft_cfg, train_examples=run.train_examples,
                                          checkpoint=run.stages.epoch_checkpoint("final-ffn", key),
                                          teacher=run.model, progress=progress).to_dict()
            scores["test_after_finetune"] = test()
        distributed.on_main(save_pruned, pruned, tok, model_dir)
        made["model"] = pruned
        return scores

    key = {**run.identity, "stage": "final-ffn", "kept_heads": heads, "kept_neurons": neurons,
           "skip_final_finetune": cfg.skip_final_finetune, **teacher_key(ft_cfg)}
    check = kept_check(heads, neurons, neuron_shape(pruned.config)[1])
    scores = run.stages.get_or_compute("final-ffn", key, compute, label="surgery_and_finetune", artifact=model_dir,
                                       artifact_check=check)
    if "model" in made:
        return pruned, scores, key
    if distributed.is_main():
        pruned, _ = load_pruned(model_dir)
    distributed.sync_module(pruned.to(distributed.device()))  # other ranks: same surgery, rank 0's weights
    return pruned, scores, key


@dataclass
class JointChoice:
    """What the curve chose: the curve's points, the knee, the chosen point and the units kept."""

    points: list[dict]
    share_star: float
    knee: object  # `cahp.budget.knee.KneeResult` on the share axis
    chosen: dict  # the curve point (`best_point`) of the allocation kept
    source: str  # "knee" or "--target-speedup"
    heads: dict  # {layer: kept heads}
    neurons: dict  # {layer: kept neurons}


def dense_counts(model) -> dict:
    """{"parameters", "heads", "neurons"} of the dense model (the report's ``before``)."""
    return {"parameters": count_parameters(model), "heads": num_kept(model),
            "neurons": int(kept_neuron_mask(model).sum())}


def choose_selection(jr: JointRun, cfg: PruneConfig, progress: bool = True) -> JointChoice:
    """The curve (`joint_curve`), its knee, the point at the knee or at ``--target-speedup``, and the heads and
    neurons CAHP keeps at that point's allocation (the same for every objective)."""
    points = joint_curve(jr, progress)["points"]
    share_star, knee, chosen = find_share_star(points, cfg)
    if cfg.target_speedup:
        chosen = distributed.broadcast_object(target_point(jr, 1 / cfg.target_speedup))
        if chosen is None:
            raise JointSetupError(f"no allocation reaches an estimated speedup of {cfg.target_speedup} "
                                  f"{'at every shape ' if jr.joint.speedup_at == 'each' else ''}"
                                  f"(at most {1 / floor_share(jr.table):.2f} on average: embeddings, LayerNorms "
                                  f"and the classifier stay)")
        source = "--target-speedup"
    else:
        source = "knee"
    alloc = Allocation(heads=chosen["heads_per_layer"], neurons=chosen["neurons_per_layer"],
                       share=chosen["estimated_share"])
    heads, neurons = jr.method.selector(jr.problem).select(alloc)
    log.info("knee at an estimated share of %.3f; keeping %d heads and %d neurons, estimated share %.3f (%s)",
             share_star, sum(alloc.heads), sum(alloc.neurons), alloc.share, source)
    return JointChoice(points=points, share_star=share_star, knee=knee, chosen=chosen, source=source, heads=heads,
                       neurons=neurons)


def run_joint(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True,
              joint: JointConfig | None = None) -> PruneResult:
    """`cahp prune --ffn` (see the module docstring); called by `cahp.pipelines.prune.run_prune`."""
    joint = joint or JointConfig()
    check_settings(cfg, joint)
    t_total = time.perf_counter()
    jr = prepare_joint(cfg, ft_cfg, out, progress, joint)
    run = jr.run
    before = dense_counts(run.model)
    choice = choose_selection(jr, cfg, progress)
    pruned, final, final_key = joint_surgery_and_finetune(run, choice.heads, choice.neurons, progress)
    speedup = joint_report.measured_speedup(run, final_key, joint)
    report = joint_report.build_report(run, joint, choice, tables=jr.tables, pruned=pruned, final=final,
                                       speedup=speedup, before=before, seconds=time.perf_counter() - t_total)
    report = distributed.broadcast_object(report)
    distributed.on_main(joint_report.write_outputs, run, report, choice.points, choice.knee,
                        ylabel=f"held-out {run.metric}")
    joint_report.log_summary(report)
    return PruneResult(output_dir=out, report=report)
