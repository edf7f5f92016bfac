"""Distillation from the dense model's outputs during the one fine-tuning after pruning (ours; off by default).

A pruned model fine-tuned on the labels alone learns the task again from
``n`` labelled examples; the dense model it was cut from already knows more
than the labels say (how sure it is, which wrong class is nearly right). With
``kd_alpha = a > 0`` the fine-tuning loss becomes

    (1 - a) x label loss + a x distillation loss

- classification: the label loss is the cross-entropy; the distillation loss is
  Hinton et al.'s ``T^2 x KL(softmax(teacher / T) || softmax(student / T))``
  at temperature ``T = kd_temperature`` (the ``T^2`` keeps its gradients on the
  label loss's scale whatever ``T`` is);
- regression (one output): both are squared errors, against the label and
  against the teacher's output.

The teacher is the dense model the pruned one was cut from, in eval mode (no
dropout); its outputs over the training examples are computed once before the
first epoch (`teacher_outputs`, `cahp.train.evaluate.predict`) and looked up per
batch by the ``index`` entry every batch carries, so a reshuffled batch order
needs no second teacher pass. `cahp compare` applies the same setting to every
method and to the dense control (whose teacher is the dense model itself).

Its settings are `FinetuneConfig`'s ``kd_alpha`` and ``kd_temperature``;
`finetune_key` leaves them out of cache keys while ``kd_alpha`` is 0, so every
result cached before they existed still matches.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cahp.data.batching import EncodedDataset, iter_batches
from cahp.train.evaluate import model_inputs, predict

__all__ = ["KD_FIELDS", "DistillationLoss", "finetune_key", "kd_tag", "labels_only", "teacher_key", "teacher_outputs"]

#: The `FinetuneConfig` fields of this distillation.
KD_FIELDS = ("kd_alpha", "kd_temperature")


def finetune_key(cfg) -> dict:
    """A `FinetuneConfig` as a cache key: all its settings, less `KD_FIELDS` where ``kd_alpha`` is 0.

    Keys made before the distillation settings existed are then unchanged for every run without it.
    """
    d = dataclasses.asdict(cfg)
    if not d.get("kd_alpha"):
        for name in KD_FIELDS:
            d.pop(name, None)
    return d


def teacher_key(cfg) -> dict:
    """What a fine-tuning's cache key adds for its distillation: ``{"teacher": settings}``, or nothing without one."""
    return {"teacher": {name: getattr(cfg, name) for name in KD_FIELDS}} if cfg.kd_alpha else {}


def kd_tag(cfg) -> str:
    """A suffix for the names of cached fine-tunings with distillation (``"-kd0.5t2"``), so that they sit beside
    the labels-only ones instead of replacing them; empty without distillation."""
    return f"-kd{cfg.kd_alpha:g}t{cfg.kd_temperature:g}" if cfg.kd_alpha else ""


def labels_only(cfg):
    """``cfg`` without distillation: what trains the dense model itself (it has no teacher)."""
    return dataclasses.replace(cfg, kd_alpha=0.0)


def teacher_outputs(teacher: nn.Module, ds: EncodedDataset, batch_size: int, pad_token_id: int,
                    progress: bool = True) -> torch.Tensor:
    """The teacher's outputs (N, num_labels) float32, in ``ds`` order, eval mode, no gradient."""
    batches = iter_batches(ds, batch_size, shuffle=False, pad_token_id=pad_token_id)
    _, logits = predict(teacher, batches, len(ds), desc="teacher", progress=progress)
    return torch.from_numpy(logits).float()


class DistillationLoss:
    """``loss(model, batch, device)``: (1 - alpha) x label loss + alpha x distillation loss (module docstring).

    Args:
        targets: (N, num_labels) teacher outputs of the dataset the batches index into (`teacher_outputs`).
        alpha: weight of the distillation loss, in (0, 1].
        temperature: softmax temperature (classification only), > 0.
        regression: one output trained by squared errors instead of cross-entropy and KL.
    """

    def __init__(self, targets: torch.Tensor, alpha: float, temperature: float, regression: bool):
        if not 0.0 < alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"kd_alpha must be in (0, 1] and kd_temperature > 0, got {alpha}, {temperature}")
        self.targets, self.alpha, self.temperature, self.regression = targets, alpha, temperature, regression

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        logits = model(**model_inputs(batch, device)).logits.float()  # (B, C)
        teacher = self.targets[batch["index"].cpu()].to(device)  # (B, C)
        labels = batch["labels"].to(device)
        if self.regression:
            hard = nn.functional.mse_loss(logits[:, 0], labels.float())
            soft = nn.functional.mse_loss(logits[:, 0], teacher[:, 0])
        else:
            t = self.temperature
            hard = nn.functional.cross_entropy(logits, labels)
            soft = nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=-1),
                                        nn.functional.log_softmax(teacher / t, dim=-1),
                                        reduction="batchmean", log_target=True) * t * t
        return (1.0 - self.alpha) * hard + self.alpha * soft
