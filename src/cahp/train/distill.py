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

Under torchrun the student trains through `DistributedDataParallel` on each
rank's share of the batches, as `cahp.train.finetune` does; every rank measures
the fidelity on all held-out batches, so the choice of epoch is the same everywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.data.batching import EncodedDataset, make_batches
from cahp.train.finetune import FinetuneConfig, _param_groups, check_config, linear_schedule
from cahp.train.objectives import EmbeddingLoss, EmbeddingObjectiveError, fidelity

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

    Returns:
        A `DistillResult`.
    """
    cfg = cfg or FinetuneConfig()
    check_config(cfg)
    if len(train_targets) != len(train_ds):
        raise EmbeddingObjectiveError(f"{len(train_ds)} training texts but {len(train_targets)} target embeddings")
    train_loss = EmbeddingLoss(train_targets, loss.settings, loss.distance)
    positions = np.arange(len(train_ds))
    if cfg.max_train_examples and cfg.max_train_examples < len(train_ds):
        positions = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_ds))[: cfg.max_train_examples])
        sub = EncodedDataset(features=[train_ds.features[i] for i in positions], labels=[])
        train_ds, train_loss.targets = sub, train_targets[torch.as_tensor(positions)]
    n_proc = distributed.world_size() if distributed.is_active() else 1
    n_batches = -(-len(train_ds) // cfg.batch_size)
    steps_per_epoch = -(-n_batches // n_proc)  # every rank takes this many steps (batches padded)
    total = steps_per_epoch * cfg.epochs

    torch.manual_seed(cfg.seed + distributed.rank())  # dropout differs between ranks' batches
    device = next(student.parameters()).device
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, int(cfg.warmup_ratio * total)))
    initial = fidelity(student, heldout_batches, heldout_targets, loss.settings)
    best, best_epoch, bad = initial, 0, 0
    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    history = [{"epoch": 0, "heldout_fidelity": initial}]
    log.info("distillation: %d texts, %d epochs x %d steps, lr %g, %s distance; held-out fidelity %.4f",
             len(train_ds), cfg.epochs, steps_per_epoch, cfg.lr, loss.distance, initial)
    # the model itself with one process; under DDP the BERT-style pooler is in the graph of no embedding
    train_model = distributed.wrap_ddp(student, find_unused_parameters=True)
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = make_batches(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                               pad_token_id=pad_token_id)
        batches = distributed.shard(distributed.pad_batches(batches))
        train_model.train()
        losses = []
        for batch in tqdm(batches, desc=f"distill {epoch}/{cfg.epochs}",
                          disable=not distributed.show_progress(progress), mininterval=2):
            value = train_loss(train_model, batch, device)
            value.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(value.item())
        loss_sum, n_losses = distributed.all_reduce_sum(torch.tensor(sum(losses), dtype=torch.float64), len(losses))
        score = fidelity(student, heldout_batches, heldout_targets, loss.settings)
        record = {"epoch": epoch, "train_loss": float(loss_sum) / max(1, n_losses), "heldout_fidelity": score,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log.info("distill epoch %d: train loss %.5f, held-out fidelity %.4f (%.0f s)", epoch,
                 record["train_loss"], score, record["seconds"])
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                log.info("early stop: no better held-out fidelity for %d epochs", bad)
                break
    del train_model  # drops the DDP wrapper and its hooks; ``student`` keeps the weights
    student.load_state_dict(best_state)
    student.eval()
    log.info("distillation: best epoch %d, held-out fidelity %.4f -> %.4f", best_epoch, initial, best)
    return DistillResult(best_epoch=best_epoch, best_fidelity=best, initial_fidelity=initial, history=history,
                         train_seconds=time.perf_counter() - t_start, config=asdict(cfg))
