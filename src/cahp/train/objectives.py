"""The embedding objective: how far a gated or pruned encoder's sentence embeddings are from the dense model's.

An embedding model's users have no labels, only the embeddings. So the loss
that salience, Fisher scores, gradient baselines and the distillation after
surgery use is the distance between the student's sentence embedding and the
dense model's (the teacher's) for the same text, both pooled and normalised the
way the model's sentence-transformers configuration says (`cahp.deploy.sentence.pool`):

- ``cosine`` (default): mean over the batch of ``1 - cos(student, teacher)``.
  It is what embedding users compare (cosine similarity, or dot products of
  normalised vectors), it ignores the length of an unnormalised embedding, and
  it is 0 exactly when every student embedding points the teacher's way.
- ``mse``: mean over the batch and the embedding dimensions of the squared
  difference (sentence-transformers' ``MSELoss`` for distillation). It also
  asks for the teacher's length, which matters when the model does not
  normalise and users take dot products.

The teacher embeddings are computed once (`teacher_embeddings`: one pass of
the dense model over the dataset, no gradient) and looked up per batch by the
``index`` entry every batch carries (positions in its `EncodedDataset`), so a
shuffled or sharded batch order needs no second teacher pass. The fidelity of a
model is the mean cosine to the teacher over held-out text (1 for the dense model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from cahp.deploy.sentence import SETTINGS_KEY, SentenceSettingsError, pool
from cahp.train.evaluate import model_inputs

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_DISTANCES",
    "EmbeddingLoss",
    "EmbeddingObjectiveError",
    "check_distance",
    "embedding_distance",
    "fidelity",
    "sentence_embeddings",
    "sentence_settings",
    "teacher_embeddings",
]

#: Distances between student and teacher embeddings (see the module docstring).
EMBEDDING_DISTANCES = ("cosine", "mse")


class EmbeddingObjectiveError(ValueError):
    """An embedding objective that cannot be set up: unknown distance, no pooling settings, mismatched targets."""


def check_distance(distance: str) -> str:
    """``distance`` if it is one of `EMBEDDING_DISTANCES`, else a one-line error."""
    if distance not in EMBEDDING_DISTANCES:
        choices = " or ".join(EMBEDDING_DISTANCES)
        raise EmbeddingObjectiveError(f"unknown embedding distance {distance!r}; use {choices}")
    return distance


def sentence_settings(model: nn.Module) -> dict:
    """The sentence-transformers pooling/normalisation settings on ``model.config``; an error if it has none."""
    settings = getattr(model.config, SETTINGS_KEY, None)
    if settings is None:
        raise EmbeddingObjectiveError(
            "the model has no sentence-transformers pooling settings; the embedding objective needs a "
            "sentence-transformers model loaded with kind='encoder' (minilm-l6, mpnet-base or such a folder)"
        )
    return settings


def sentence_embeddings(model: nn.Module, batch: dict, settings: dict, device: torch.device | None = None):
    """Sentence embeddings (B, D) of a tokenised ``batch``, with gradients (unlike `cahp.deploy.sentence.embed`)."""
    device = device if device is not None else next(model.parameters()).device
    inputs = model_inputs(batch, device)
    hidden = model(**inputs).last_hidden_state  # (B, T, H)
    try:
        return pool(hidden, inputs["attention_mask"], settings)
    except SentenceSettingsError as e:
        raise EmbeddingObjectiveError(str(e)) from None


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Scalar distance between (B, D) student and teacher embeddings: mean ``1 - cos`` or mean squared error."""
    check_distance(distance)
    if student.shape != teacher.shape:
        raise EmbeddingObjectiveError(f"student embeddings {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    student, teacher = student.float(), teacher.float()
    if distance == "cosine":
        return (1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return nn.functional.mse_loss(student, teacher)


@torch.no_grad()
def teacher_embeddings(model: nn.Module, batches: Iterable[dict], n: int, settings: dict | None = None):
    """Embeddings (n, D) float32 of the ``n`` examples that ``batches`` cover, in dataset order (by ``index``).

    Eval mode, no gates: the dense model as deployed. Every rank computes all of them (no sharding), so the
    targets are the same everywhere.
    """
    settings = settings or sentence_settings(model)
    was_training = model.training
    model.eval()
    out, seen = None, torch.zeros(n, dtype=torch.bool)
    try:
        for batch in batches:
            emb = sentence_embeddings(model, batch, settings).float().cpu()
            if out is None:
                out = torch.zeros(n, emb.shape[1])
            out[batch["index"]] = emb
            seen[batch["index"]] = True
    finally:
        model.train(was_training)
    if out is None or not bool(seen.all()):
        raise EmbeddingObjectiveError(f"the batches cover {int(seen.sum())} of {n} examples")
    return out


class EmbeddingLoss:
    """``loss(model, batch, device)``: the distance of ``model``'s embeddings from the teacher's for ``batch``.

    Args:
        targets: (N, D) teacher embeddings of the dataset the batches index into (`teacher_embeddings`).
        settings: pooling settings (the model's sentence-transformers settings).
        distance: one of `EMBEDDING_DISTANCES`.
        target_noise: if > 0, the targets are moved by seeded Gaussian noise of this standard deviation
            relative to each target's norm (per dimension ``target_noise * |t| / sqrt(D)``, so the noise
            vector's length is about ``target_noise * |t|``). The loss of the dense model is then no longer at
            its minimum, where every gradient is 0: its gate gradients measure how strongly each head moves
            the embedding (the label-free salience pass).
        seed: seed of that noise (one fixed draw per example).

    It matches `cahp.stats.salience.LossFn`, so ``gate_gradients(model, batches, loss_fn=EmbeddingLoss(...))``
    gives label-free salience and Fisher scores.
    """

    def __init__(self, targets: torch.Tensor, settings: dict, distance: str = "cosine", target_noise: float = 0.0,
                 seed: int = 0):
        check_distance(distance)
        if target_noise < 0:
            raise EmbeddingObjectiveError(f"target_noise must be >= 0, got {target_noise}")
        if target_noise > 0:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(targets.shape, generator=g, dtype=targets.dtype)
            scale = target_noise * targets.norm(dim=-1, keepdim=True) / targets.shape[-1] ** 0.5  # (N, 1)
            targets = targets + scale * noise
        self.targets = targets
        self.settings = settings
        self.distance = distance

    def __call__(self, model: nn.Module, batch: dict, device: torch.device | None = None) -> torch.Tensor:
        device = device if device is not None else next(model.parameters()).device
        student = sentence_embeddings(model, batch, self.settings, device)
        teacher = self.targets[batch["index"].cpu()].to(device)
        return embedding_distance(student, teacher, self.distance)


@torch.no_grad()
def fidelity(model: nn.Module, batches: Sequence[dict], targets: torch.Tensor, settings: dict) -> float:
    """Mean cosine similarity, over the examples of ``batches``, of ``model``'s embeddings to ``targets`` (N, D).

    Gates or surgery applied by the caller take effect; eval mode for the pass.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            student = sentence_embeddings(model, batch, settings).float().cpu()
            cos = nn.functional.cosine_similarity(student, targets[batch["index"]], dim=-1)
            total += float(cos.double().sum())
            count += len(cos)
    finally:
        model.train(was_training)
    if count == 0:
        raise EmbeddingObjectiveError("fidelity of no examples")
    return total / count
