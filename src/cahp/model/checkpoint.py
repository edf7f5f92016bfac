"""Saving and reloading pruned models.

A pruned folder is a ``save_pretrained``-style folder: ``config.json`` (with
the kept heads under ``cahp_kept_heads``, see `cahp.model.heads`, and, once FFN
neurons were removed, the kept neurons under ``cahp_kept_neurons``, see
`cahp.model.neurons`), ``model.safetensors`` and the tokenizer files.
`load_pruned` rebuilds the original architecture from the config, applies the
same surgery (heads, then neurons), then loads the weights strictly, so every
tensor must match in name and shape. The safetensors metadata repeats the kept
heads (and neurons): a config.json whose record was edited to other indices of
the same sizes ("same shapes, other heads") is refused instead of loading
mislabelled heads. Every malformed record or weights file is a one-line
`CheckpointError` naming the file and the problem.

Beside the weights `cahp.deploy.folder` writes the modeling and configuration
code of `cahp.arch.hub` and an ``auto_map``, and config.json declares its own
model type (``cahp-bert``, ``cahp-llama``, ...): ``AutoModel*.from_pretrained(path,
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
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import transformers
from torch import nn

from cahp.arch.hub import load_config
from cahp.core.io import dir_mode
from cahp.deploy.folder import make_self_contained
from cahp.model.heads import KEPT_HEADS_KEY, kept_heads, model_shape
from cahp.model.neuron_surgery import keep_neurons
from cahp.model.neurons import KEPT_NEURONS_KEY, NeuronRecordError, decode_kept_neurons, neuron_shape
from cahp.model.surgery import keep_heads

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CAHP_FORMAT_KEY = "cahp_format_version"
FORMAT_VERSION = 1
#: Files of which a model folder needs at least one to have a tokenizer (vocabularies and tokenizer models).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class CheckpointError(ValueError):
    """A folder that is not a loadable (pruned) checkpoint."""


def missing_tokenizer(path: str | os.PathLike) -> str | None:
    """None if the folder ``path`` holds tokenizer files, else a sentence naming what is missing.

    Without them transformers builds a tokenizer with a handful of special tokens, which maps every word
    to [UNK] and trains without complaint.
    """
    path = Path(path)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer of "
            "the model it was made from into it")


def _heads_record(record, cfg_file: Path, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """{layer: sorted heads} of a `KEPT_HEADS_KEY` record, or a CheckpointError naming the problem."""
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} must be an object {{layer: [heads]}}, "
                              f"got {type(record).__name__}")
    out: dict[int, list[int]] = {}
    for layer, heads in record.items():
        try:
            layer_i = int(layer)
        except (TypeError, ValueError):
            raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} has layer {layer!r}, not an integer") from None
        if not 0 <= layer_i < n_layers or layer_i in out:
            raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} has layer {layer!r}; the model has layers "
                                  f"0..{n_layers - 1}, each once")
        if not isinstance(heads, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
            raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} layer {layer_i} must be a list of head "
                                  f"indices, got {heads!r}")
        if len(set(heads)) != len(heads):
            raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} layer {layer_i} lists a head twice: {heads}")
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} layer {layer_i} has head {bad[0]}; heads are "
                                  f"numbered 0..{n_heads - 1}")
        out[layer_i] = sorted(heads)
    missing = [layer for layer in range(n_layers) if layer not in out]
    if missing:
        raise CheckpointError(f"{cfg_file}: {KEPT_HEADS_KEY} lacks layer(s) {missing} (an empty layer is [])")
    return out


def _weights_metadata(weights: Path) -> dict:
    """The safetensors header's metadata, or a CheckpointError for an unreadable (e.g. truncated) file."""
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{weights} is not a readable safetensors file ({first}); it may be truncated: "
                              "save or copy the model again") from None


def _check_metadata(meta: dict, key: str, record, weights: Path, cfg_file: Path) -> None:
    """The record in config.json must be the one the weights were saved with (when they carry one)."""
    saved = meta.get(key)
    if saved is None:
        if record is None:
            return
        log.debug("%s carries no %s (saved by an older cahp): not cross-checked", weights, key)
        return
    if record is None:
        raise CheckpointError(f"{cfg_file} has no {key}, but {weights.name} was saved pruned: restore the key "
                              "(the weights hold a pruned model)")
    try:
        saved = json.loads(saved)
    except json.JSONDecodeError:
        raise CheckpointError(f"{weights}: its {key} metadata is not JSON") from None
    if key == KEPT_HEADS_KEY and isinstance(saved, Mapping):  # compared in the sorted form of the record
        saved = {str(k): sorted(v) for k, v in saved.items()}
    if saved != json.loads(json.dumps(record)):
        raise CheckpointError(f"{cfg_file}: {key} differs from the one {weights.name} was saved with: the "
                              "weights belong to other heads or neurons")


def save_pruned(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` (dense or pruned) and ``tokenizer`` to ``path`` atomically.

    The folder is assembled next to ``path`` and renamed into place, so an
    interrupted save never leaves a half-written checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would outlive the rename
        config = model.config
        heads = {str(k): v for k, v in kept_heads(config).items()}
        setattr(config, KEPT_HEADS_KEY, heads)
        setattr(config, CAHP_FORMAT_KEY, FORMAT_VERSION)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        # The kept indices travel with the weights too: load_pruned checks config.json against them.
        meta = {"format": "pt", KEPT_HEADS_KEY: json.dumps(heads)}
        neurons = getattr(config, KEPT_NEURONS_KEY, None)
        if neurons is not None:
            meta[KEPT_NEURONS_KEY] = json.dumps(neurons)
        # save_model de-duplicates tied tensors (e.g. MLM decoders tied to embeddings).
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_NAME), metadata=meta)
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
        # the format key too: a folder written by save_pruned whose heads record was removed is still one
        return KEPT_HEADS_KEY in record or KEPT_NEURONS_KEY in record or CAHP_FORMAT_KEY in record
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
    if with_tokenizer and missing_tokenizer(path):
        raise CheckpointError(missing_tokenizer(path))
    meta = _weights_metadata(weights)
    try:
        config = load_config(path)  # self-contained (cahp-bert, ...) or older folders alike
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file} is not a readable model config ({str(e).splitlines()[0]})") from None
    kept = getattr(config, KEPT_HEADS_KEY, None)
    neurons = getattr(config, KEPT_NEURONS_KEY, None)
    if kept is not None:  # its form first, so that a malformed record is named as such
        try:
            shape = model_shape(config)
        except ValueError as e:  # an architecture cahp does not know
            raise CheckpointError(f"{cfg_file}: {e}") from None
        kept = _heads_record(kept, cfg_file, *shape)
    _check_metadata(meta, KEPT_HEADS_KEY, None if kept is None else {str(k): v for k, v in kept.items()},
                    weights, cfg_file)
    raw_neurons = neurons
    if neurons is not None:
        try:
            neurons = decode_kept_neurons(neurons, *neuron_shape(config))
        except NeuronRecordError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    _check_metadata(meta, KEPT_NEURONS_KEY, raw_neurons, weights, cfg_file)
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
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except RuntimeError as e:  # shapes that differ: the record does not describe these weights
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"{weights} does not match the heads and neurons recorded in {cfg_file} "
                              f"({first[:200]})") from None
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
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, config=config)
    return model, tokenizer


__all__ = ["TOKENIZER_FILES", "CheckpointError", "is_pruned_folder", "load_pruned", "missing_tokenizer",
           "save_pruned"]
