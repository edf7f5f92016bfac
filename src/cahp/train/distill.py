"""The single fine-tuning of a pruned encoder by distillation: reproduce the dense model's embeddings.

No labels anywhere: the student (the pruned encoder) is trained to bring its
sentence embedding of every training text to the dense model's (the targets,
computed once, `cahp.train.objectives.teacher_embeddings`) under the embedding
distance (`cahp.train.objectives.EmbeddingLoss`, cosine by default). The
optimiser and schedule are the task fine-tuning's (`FinetuneConfig`: AdamW,
warm-up then linear decay, weight decay, clipping, length-bucketed batches
reshuffled every epoch); its ``metric`` setting does not apply.

Early stopping on held-out fidelity (mean cosine to the dense embeddings of
text not trained on): it is measured before the first epoch and after every
epoch, the best state is restored at the end, and training stops after
``patience`` epochs without a better one. The state before training is a
candidate too, so distillation never returns a model less faithful on the
held-out text than the one it was given.

The loop is the task fine-tuning's (`cahp.train.loop.train_loop`), judged by
held-out fidelity instead of the dev metric. Under torchrun the student trains
through `DistributedDataParallel` on each rank's share of the batches; every
rank measures the fidelity on all held-out batches, so the choice of epoch is
the same everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from cahp.data.batching import EncodedDataset
from cahp.train.finetune import FinetuneConfig, check_config
from cahp.train.loop import steps_per_epoch, train_loop
from cahp.train.objectives import EmbeddingLoss, EmbeddingObjectiveError, fidelity
from cahp.train.resume import EpochCheckpoint
from cahp.train.teacher import finetune_key

log = logging.getLogger(__name__)

__all__ = ["DistillResult", "distill"]


@dataclass
class DistillResult:
    """What a distillation did: the best epoch (0: the state before training), its held-out fidelity, history."""

    best_epoch: int
    best_fidelity: float
    initial_fidelity: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as plain data (JSON-ready)."""
        return asdict(self)


def distill(
    student: nn.Module,
    train_ds: EncodedDataset,
    train_targets: torch.Tensor,
    heldout_batches: list[dict],
    heldout_targets: torch.Tensor,
    loss: EmbeddingLoss,
    cfg: FinetuneConfig | None = None,
    pad_token_id: int = 0,
    progress: bool = True,
    checkpoint: EpochCheckpoint | None = None,
) -> DistillResult:
    """Train ``student`` in place to reproduce ``train_targets``; the most faithful epoch's weights are kept.

    Args:
        student: the pruned encoder (``AutoModel``), with the teacher's pooling settings.
        train_ds: unlabeled training texts (`cahp.data.text.encode_texts`).
        train_targets: (len(train_ds), D) teacher embeddings of ``train_ds``.
        heldout_batches: batches of held-out texts, indexing into ``heldout_targets`` (M, D).
        loss: the embedding loss; its targets are replaced by ``train_targets`` for training.
        cfg: optimiser settings (epochs, lr, batch size, warm-up, weight decay, clipping, patience, seed,
            ``max_train_examples``).
        checkpoint: keep the state after every epoch there and resume an interrupted run from it
            (`cahp.train.resume`); its key must name the student and the texts, the settings are added here.

    Returns:
        A `DistillResult`.
    """
    cfg = cfg or FinetuneConfig()
    check_config(cfg)
    if cfg.kd_alpha:
        raise EmbeddingObjectiveError("kd_alpha applies to a task's fine-tuning; the embedding objective's "
                                      "fine-tuning is a distillation already")
    if len(train_targets) != len(train_ds):
        raise EmbeddingObjectiveError(f"{len(train_ds)} training texts but {len(train_targets)} target embeddings")
    train_loss = EmbeddingLoss(train_targets, loss.settings, loss.distance)
    positions = np.arange(len(train_ds))
    if cfg.max_train_examples and cfg.max_train_examples < len(train_ds):
        positions = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_ds))[: cfg.max_train_examples])
        sub = EncodedDataset(features=[train_ds.features[i] for i in positions], labels=[])
        train_ds, train_loss.targets = sub, train_targets[torch.as_tensor(positions)]
    log.info("distillation: %d texts, %d epochs x %d steps, lr %g, %s distance", len(train_ds), cfg.epochs,
             steps_per_epoch(len(train_ds), cfg.batch_size), cfg.lr, loss.distance)

    def heldout() -> tuple[float, dict]:
        score = fidelity(student, heldout_batches, heldout_targets, loss.settings)
        return score, {"heldout_fidelity": score}

    # the state before training is a candidate (epoch 0); epochs' shuffle seeds count from seed * 1000 + 1, as
    # they always have; under DDP the BERT-style pooler is in the graph of no embedding (unused parameters)
    loop = train_loop(student, train_ds, train_loss, heldout, cfg, pad_token_id, score_name="held-out fidelity",
                      desc="distill", evaluate_before=True, epoch_seed_start=1, find_unused_parameters=True,
                      checkpoint=None if checkpoint is None else checkpoint.with_settings(
                          distill=finetune_key(cfg), distance=loss.distance),
                      progress=progress)
    # a distillation record keeps its own fields: epoch, train loss, held-out fidelity, seconds
    history = [loop.history[0]] + [{k: r[k] for k in ("epoch", "train_loss", "heldout_fidelity", "seconds")}
                                   for r in loop.history[1:]]
    log.info("distillation: best epoch %d, held-out fidelity %.4f -> %.4f", loop.best_epoch, loop.initial_score,
             loop.best_score)
    return DistillResult(best_epoch=loop.best_epoch, best_fidelity=loop.best_score,
                         initial_fidelity=loop.initial_score, history=history, train_seconds=loop.train_seconds,
                         config=asdict(cfg))
