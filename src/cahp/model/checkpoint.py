"""Saving and reloading pruned models.

A pruned folder is a ``save_pretrained``-style folder: ``config.json`` (with
the kept heads under ``cahp_kept_heads``, see `cahp.model.heads`, and, once FFN
neurons were removed, the kept neurons under ``cahp_kept_neurons``, see
`cahp.model.neurons`), ``model.safetensors`` and the tokenizer files.
`load_pruned` rebuilds the original architecture from the config, applies the
same surgery (heads, then neurons), then loads the weights strictly, so every
tensor must match in name and shape.

Beside the weights `cahp.deploy.folder` writes the modeling and configuration
code of `cahp.arch.hub` and an ``auto_map``, and config.json declares its own
model type (``cahp-bert``, ...): ``AutoModel*.from_pretrained(path,
trust_remote_code=True)`` loads the pruned model without cahp, and without
``trust_remote_code`` transformers asks for it instead of building the
full-size architecture. `load_pruned` reads these folders and older ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import transformers
from torch import nn

from cahp.arch.hub import load_config
from cahp.deploy.folder import make_self_contained
from cahp.model.heads import KEPT_HEADS_KEY, kept_heads
from cahp.model.neuron_surgery import keep_neurons
from cahp.model.neurons import KEPT_NEURONS_KEY, NeuronRecordError, decode_kept_neurons, neuron_shape
from cahp.model.surgery import keep_heads

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CAHP_FORMAT_KEY = "cahp_format_version"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A folder that is not a loadable (pruned) checkpoint."""


def save_pruned(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` (dense or pruned) and ``tokenizer`` to ``path`` atomically.

    The folder is assembled next to ``path`` and renamed into place, so an
    interrupted save never leaves a half-written checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = model.config
        setattr(config, KEPT_HEADS_KEY, {str(k): v for k, v in kept_heads(config).items()})
        setattr(config, CAHP_FORMAT_KEY, FORMAT_VERSION)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        # save_model de-duplicates tied tensors (e.g. MLM decoders tied to embeddings).
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_self_contained(tmp, model)  # remote code, so plain transformers loads it too
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model to %s", path)
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_pruned_folder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        record = json.loads(cfg.read_text())
        return KEPT_HEADS_KEY in record or KEPT_NEURONS_KEY in record
    except (OSError, json.JSONDecodeError):
        return False


def load_pruned(path: str | os.PathLike, attn_implementation: str | None = None, with_tokenizer: bool = True):
    """Load a folder written by `save_pruned`; returns ``(model, tokenizer)``.

    The model comes back in eval mode with the same outputs as when saved.
    """
    path = Path(path)
    cfg_file, weights = path / "config.json", path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a model folder: {cfg_file.name} is missing")
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; cahp checkpoints store safetensors weights")
    config = load_config(path)  # self-contained (cahp-bert, ...) or older folders alike
    kept = getattr(config, KEPT_HEADS_KEY, None)
    neurons = getattr(config, KEPT_NEURONS_KEY, None)
    if neurons is not None:
        try:
            neurons = decode_kept_neurons(neurons, *neuron_shape(config))
        except NeuronRecordError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    arch = (config.architectures or ["AutoModelForSequenceClassification"])[0]
    model_cls = getattr(transformers, arch, None)
    if model_cls is None:
        raise CheckpointError(f"{cfg_file} names architecture {arch!r}, which transformers does not provide")
    # Build the original architecture, then cut it to the recorded heads and neurons.
    for key, record in ((KEPT_HEADS_KEY, kept), (KEPT_NEURONS_KEY, neurons)):
        if record is not None:
            delattr(config, key)
    model = model_cls(config)
    if kept is not None:
        keep_heads(model, {int(k): v for k, v in kept.items()})
    if neurons is not None:
        keep_neurons(model, neurons)
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    # Non-persistent buffers are never saved; everything else must match.
    if unexpected or missing:
        raise CheckpointError(
            f"{weights} does not match the architecture in {cfg_file}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    tokenizer = None
    if with_tokenizer:
        # The family config, not config.json's cahp-<family> type: otherwise transformers asks on the
        # terminal whether to run the folder's remote code (and hangs without one).
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, config=load_config(path))
    return model, tokenizer


__all__ = ["CheckpointError", "is_pruned_folder", "load_pruned", "save_pruned"]
