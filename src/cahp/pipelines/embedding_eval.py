"""Scoring an embedding model zero-shot on a labelled similarity task (STS-B), and its held-out fidelity.

The model is never trained on the similarity scores: each sentence of a pair is
embedded on its own (the model's pooling and normalisation), the prediction for
the pair is the cosine similarity of the two embeddings, and the score is the
Spearman (and Pearson) correlation of these predictions with the human scores,
with percentile-bootstrap 95% intervals over the pairs (`cahp.train.metrics.score`).
Spearman is what STS is reported by: it compares rankings, so any monotone
rescaling of the cosine, the model's own or a user's, scores the same.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from cahp.core.configs import field as cfg_field
from cahp.core.threads import num_threads
from cahp.data.batching import make_batches
from cahp.data.tasks import Example, Task, available_tasks, get_task
from cahp.data.text import encode_texts, unique_texts
from cahp.train.metrics import metric_value, paired_bootstrap_metric, score
from cahp.train.objectives import sentence_embeddings

log = logging.getLogger(__name__)

__all__ = ["THROUGHPUT", "SimilaritySet", "SimilarityTaskError", "ThroughputConfig", "default_throughput",
           "encoding_throughput", "load_similarity_task", "speedup_goal", "speedup_interval", "speedup_text",
           "throughput_config"]


class SimilarityTaskError(ValueError):
    """A similarity task that is not a sentence-pair regression task (like stsb)."""


def load_similarity_task(name: str, data_dir: str | None = None) -> Task:
    """The task ``name`` (a built-in such as ``stsb``, or a folder of files with ``text``, ``text_pair`` and
    ``label`` columns), checked to be a sentence-pair regression task."""
    if name in available_tasks():
        task = get_task(name, data_dir=data_dir)
    else:
        task = get_task(name, data_dir=data_dir, text_pair_column="text_pair", task_type="regression")
    if not (task.is_pair and task.is_regression):
        raise SimilarityTaskError(
            f"similarity task {task.name!r} must be a sentence-pair regression task (like stsb); "
            f"it is a {task.task_type} task of {'pairs' if task.is_pair else 'single texts'}"
        )
    return task


class SimilaritySet:
    """The pairs of one split of a similarity task, tokenised once; `predict` gives each pair's cosine.

    Args:
        examples: sentence pairs with float scores.
        tokenizer: the model's tokenizer.
        max_length: truncation of each sentence (the model's ``max_seq_length`` when it has one).
        batch_size: sentences per batch.
        pad_token_id: the tokenizer's pad id.
    """

    def __init__(self, examples: list[Example], tokenizer, max_length: int, batch_size: int, pad_token_id: int):
        if not examples or any(ex.text_pair is None for ex in examples):
            raise SimilarityTaskError("a similarity set needs sentence pairs")
        self.texts = unique_texts([t for ex in examples for t in (ex.text, ex.text_pair)])
        position = {t: i for i, t in enumerate(self.texts)}
        # (pairs,) positions of each side's sentence in ``texts``; a stripped copy of a text finds its twin
        self.left = torch.tensor([position[ex.text.strip()] for ex in examples])
        self.right = torch.tensor([position[ex.text_pair.strip()] for ex in examples])
        self.labels = np.asarray([float(ex.label) for ex in examples])
        ds = encode_texts(tokenizer, self.texts, max_length)
        self.batches = make_batches(ds, batch_size, shuffle=False, pad_token_id=pad_token_id)

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def predict(self, model: nn.Module, settings: dict) -> np.ndarray:
        """Cosine similarity (pairs,) of the two embeddings of every pair (gates or surgery as the caller set)."""
        was_training = model.training
        model.eval()
        emb = None
        try:
            for batch in self.batches:
                e = sentence_embeddings(model, batch, settings).float().cpu()
                if emb is None:
                    emb = torch.zeros(len(self.texts), e.shape[1])
                emb[batch["index"]] = e
        finally:
            model.train(was_training)
        cos = nn.functional.cosine_similarity(emb[self.left], emb[self.right], dim=-1)
        return cos.double().numpy()

    def spearman(self, model: nn.Module, settings: dict) -> float:
        """Spearman correlation of the pairs' cosines with their scores (no interval: the curve's score)."""
        return metric_value("spearman", self.predict(model, settings), self.labels, num_labels=1)

    def evaluate(self, model: nn.Module, settings: dict, seed: int = 0, n_bootstrap: int = 1000) -> dict:
        """Pearson, Spearman (and MSE of the raw cosine) with bootstrap 95% intervals, plus the predictions."""
        preds = self.predict(model, settings)
        result = score(preds, self.labels, num_labels=1, n_bootstrap=n_bootstrap, seed=seed, task_type="regression")
        result["predictions"] = preds.tolist()
        return result

    def paired(self, preds_a, preds_b, metric: str = "spearman", seed: int = 0) -> dict:
        """Paired bootstrap of metric(a) - metric(b) on these pairs (``{"diff", "ci95", "p_value"}``)."""
        return paired_bootstrap_metric(preds_a, preds_b, self.labels, metric, num_labels=1, seed=seed)


@torch.inference_mode()
def _encode_all(model: nn.Module, batches: list[dict], settings: dict) -> None:
    from cahp.deploy.sentence import embed

    for b in batches:
        embed(model, b, settings)


@dataclass(frozen=True)
class ThroughputConfig:
    """How `encoding_throughput` measures: every (threads, batch size) combination in turn, each for ``budget_s``
    seconds of interleaved repetitions on ``sentences[batch size]`` sentences.

    All of it is part of the throughput stages' cache keys (`key`), so a stored measurement is never read back
    for other settings (a throughput stored before the interval existed, without ``n_bootstrap``, is measured
    again). Frozen: a run's measurement settings are chosen once, by its caller, and passed down.
    """

    threads: tuple[int, ...] = cfg_field((1, 2), "torch threads of the measurements, each in turn")
    batch_sizes: tuple[int, ...] = cfg_field((32, 1), "sentences per batch of the measurements, each in turn")
    budget_s: float = cfg_field(10.0, "seconds of interleaved repetitions per (threads, batch size) combination")
    sentences: dict[int, int] = cfg_field({32: 512, 1: 64}, "sentences timed per batch size (a seeded sample "
                                                             "of the texts; all of them when fewer)")
    n_bootstrap: int = cfg_field(2000, "bootstrap resamples of each speedup's 95% interval")

    def __post_init__(self):
        # tuples and plain numbers, so equal settings give equal keys however they were written (lists, ints)
        object.__setattr__(self, "threads", tuple(int(t) for t in self.threads))
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        object.__setattr__(self, "budget_s", float(self.budget_s))
        object.__setattr__(self, "sentences", {int(b): int(n) for b, n in self.sentences.items()})
        if not self.threads or min(self.threads) < 1:
            raise ValueError(f"throughput threads must be one or more counts >= 1, got {list(self.threads)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"throughput batch sizes must be one or more sizes >= 1, got {list(self.batch_sizes)}")
        missing = [b for b in self.batch_sizes if self.sentences.get(b, 0) < 1]
        if missing:
            raise ValueError(f"throughput sentences must give a count >= 1 for every batch size; "
                             f"missing or < 1 for {missing}")
        if self.budget_s < 0 or self.n_bootstrap < 1:
            raise ValueError(f"throughput budget_s must be >= 0 and n_bootstrap >= 1, got {self.budget_s:g} and "
                             f"{self.n_bootstrap}")

    def key(self) -> dict:
        """The settings as the cache keys and reports hold them: ``{"threads", "batch_sizes", "budget_s",
        "sentences", "n_bootstrap"}`` (the dict the stages' keys always held, so stored measurements stay valid)."""
        return asdict(self)


#: The process-wide defaults of a run that passes no `ThroughputConfig` (`default_throughput`), as a dict of its
#: fields; at import they are the dataclass's defaults. Code that chooses a measurement (the benchmarks) passes a
#: `ThroughputConfig` down instead of writing here; the tests shorten every default measurement through it.
THROUGHPUT = ThroughputConfig().key()


def default_throughput() -> ThroughputConfig:
    """The `ThroughputConfig` of a run that passes none: `THROUGHPUT`'s values."""
    return ThroughputConfig(**THROUGHPUT)


def throughput_config(config: ThroughputConfig | dict | None = None) -> ThroughputConfig:
    """``config`` itself, `default_throughput` for None, or `default_throughput` with the fields a dict gives
    replaced (``{"threads": (1,), "budget_s": 2.0}``)."""
    if config is None:
        return default_throughput()
    if isinstance(config, ThroughputConfig):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"a throughput config is a ThroughputConfig or a dict of its fields, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(config) - {f.name for f in fields(ThroughputConfig)})
    if unknown:
        raise ValueError(f"unknown throughput settings {unknown}; known: "
                         f"{[f.name for f in fields(ThroughputConfig)]}")
    return replace(default_throughput(), **config)


def encoding_throughput(models: dict, tokenizer, texts: list[str], settings: dict, max_length: int,
                        seed: int = 0, config: ThroughputConfig | dict | None = None) -> dict:
    """Measured sentences per second of every model in ``models`` (name -> encoder) on real ``texts``.

    ``config`` (`throughput_config`: None for `default_throughput`, or a dict of fields replaced in it) gives
    the thread counts, batch sizes, seconds per combination, sentences per batch size and bootstrap resamples.
    For each thread count and batch size a seeded sample of ``texts`` (``config.sentences[batch]`` of them)
    is tokenised once and batched as sentence-transformers' ``encode`` does (sorted by length, longest first,
    each batch padded to its longest text); one call encodes the whole sample (forward pass and pooling,
    no tokenisation), and the models' calls are interleaved round-robin (`cahp.bench.timing.time_round_robin`)
    so a slow stretch of a shared machine touches every model alike.

    A model's speedup is the median over repetitions of the per-repetition ratio (first model's seconds /
    this model's, both from the same round): a slowdown of the machine lasting a round multiplies both and
    cancels. Its 95% interval is the percentile bootstrap of that median over the repetitions
    (`cahp.bench.figures.bootstrap_medians_ci`, ``config.n_bootstrap`` resamples, seeded by ``seed``);
    ``[nan, nan]`` with fewer than 2 repetitions.

    Returns:
        ``{"t{threads}_b{batch}": {"sentences", "tokens", "reps", name: {"sentences_per_s", "seconds_median"},
        "speedup": {name: median over repetitions of (first model's seconds / this model's)},
        "speedup_ci95": {name: [lo, hi]}}}`` (the speedups of every model but the first).
    """
    from cahp.bench.figures import bootstrap_medians_ci
    from cahp.bench.timing import time_round_robin

    config = throughput_config(config)
    rng = np.random.default_rng(seed)
    names = list(models)
    out = {}
    for threads in config.threads:
        with num_threads(threads):  # the caller's thread count is back after each thread count's timings
            for batch in config.batch_sizes:
                n = min(len(texts), config.sentences[batch])
                sample = [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False).tolist())]
                ds = encode_texts(tokenizer, sample, max_length)
                batches = [{k: v for k, v in b.items() if k != "index"} for b in make_batches(
                    ds, batch, shuffle=False, pad_token_id=tokenizer.pad_token_id or 0)]

                runners = {m: functools.partial(_encode_all, models[m], batches, settings) for m in names}
                times = time_round_robin(runners, budget_s=config.budget_s, min_reps=3, max_reps=50, warmup=1)
                entry = {"sentences": n, "tokens": int(sum(ds.lengths())), "reps": len(times[names[0]])}
                for m in names:
                    med = float(np.median(times[m]))
                    entry[m] = {"sentences_per_s": n / med, "seconds_median": med}
                # (reps,) per-repetition ratios: the first model's call and this model's from the same round
                ratios = {m: np.asarray(times[names[0]]) / np.asarray(times[m]) for m in names[1:]}
                entry["speedup"] = {m: float(np.median(r)) for m, r in ratios.items()}
                entry["speedup_ci95"] = {m: bootstrap_medians_ci([r], lambda med: med, config.n_bootstrap, seed)
                                         for m, r in ratios.items()}
                out[f"t{threads}_b{batch}"] = entry
                log.info("throughput, %d thread(s), batch %d: %s", threads, batch, ", ".join(
                    f"{m} {entry[m]['sentences_per_s']:.1f}/s" for m in names))
    return out



def speedup_interval(entry: dict, name: str) -> list[float] | None:
    """Model ``name``'s 95% speedup interval ``[lo, hi]`` in one `encoding_throughput` entry, or None when there is
    none (fewer than 2 repetitions, stored as ``[null, null]`` in JSON, or a result from before intervals)."""
    ci = (entry.get("speedup_ci95") or {}).get(name)
    if ci is None or any(x is None or not np.isfinite(x) for x in ci):
        return None
    return [float(ci[0]), float(ci[1])]


def speedup_text(entry: dict, name: str) -> str:
    """``"1.23x [1.10, 1.35]"``: model ``name``'s speedup in one `encoding_throughput` entry with its 95% interval
    (``"1.23x [no interval]"`` when there is none)."""
    ratio, ci = entry["speedup"][name], speedup_interval(entry, name)
    return f"{ratio:.2f}x [no interval]" if ci is None else f"{ratio:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"


def speedup_goal(entry: dict, name: str, goal: float) -> str:
    """Whether model ``name``'s speedup in one `encoding_throughput` entry meets ``goal``, decided by its 95%
    interval: "met" when the interval's low end is at least ``goal``, "not met" when its high end is below,
    "undecided" when it straddles ``goal`` or there is no interval."""
    ci = speedup_interval(entry, name)
    if ci is None:
        return "undecided"
    if ci[0] >= goal:
        return "met"
    if ci[1] < goal:
        return "not met"
    return "undecided"
