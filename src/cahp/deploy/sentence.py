"""sentence-transformers settings: read from a source folder, kept on the config, written back, applied.

A sentence-transformers folder is a transformers folder plus ``modules.json``
(Transformer -> Pooling [-> Normalize]), ``1_Pooling/config.json`` and
``sentence_bert_config.json``. `read_settings` takes these from the source
folder into one dict that lives on the model config under `SETTINGS_KEY`
(so it survives `cahp.save_pruned` / `cahp.load_pruned` in config.json);
`write_sentence_transformers` writes the files back beside a saved model;
`embed` computes the embeddings the same way sentence-transformers does
(pooling over the real tokens, then optional L2 normalisation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SETTINGS_KEY = "cahp_sentence_transformers"
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
# Legacy pooling flags in the order sentence-transformers concatenates them.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")


class SentenceSettingsError(ValueError):
    """A sentence-transformers folder that cahp cannot reproduce (modules or pooling it does not know)."""


def _module_kind(entry: dict) -> str:
    # Newer sentence-transformers versions write their own module paths; the class name is what matters.
    return entry.get("type", "").rsplit(".", 1)[-1]


def read_settings(folder: str | Path) -> dict | None:
    """The sentence-transformers settings of ``folder``, or None when it is no sentence-transformers folder.

    Raises SentenceSettingsError for modules other than Transformer, Pooling
    and Normalize (a Dense projection, for instance), whose weights cahp would
    not carry over, and for pooling modes `embed` does not implement.
    """
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [_module_kind(m) for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown or kinds[:2] != ["Transformer", "Pooling"]:
        raise SentenceSettingsError(
            f"{folder} has sentence-transformers modules {kinds}; cahp keeps only Transformer, Pooling, Normalize"
        )
    pooling_entry = modules[1]
    pooling = json.loads((folder / pooling_entry["path"] / "config.json").read_text())
    modes = pooling_modes(pooling)
    bad = [m for m in modes if m not in SUPPORTED_MODES]
    if bad or not modes:
        raise SentenceSettingsError(
            f"{folder}: pooling {modes or 'none'} is not supported; cahp pools with {', '.join(SUPPORTED_MODES)}"
        )
    st_config = folder / "sentence_bert_config.json"
    extra = folder / "config_sentence_transformers.json"
    settings = {
        "pooling": pooling,
        "normalize": "Normalize" in kinds,
        "sentence_bert_config": json.loads(st_config.read_text()) if st_config.is_file() else {},
        # Prompts and similarity function; the versions that wrote the source are not ours to repeat.
        "config": {
            k: v for k, v in (json.loads(extra.read_text()) if extra.is_file() else {}).items() if k != "__version__"
        },
    }
    return settings


def pooling_modes(pooling: dict) -> list[str]:
    """Pooling modes of a pooling config, new form (``pooling_mode``) or legacy flags, in concatenation order."""
    if "pooling_mode" in pooling:
        mode = pooling["pooling_mode"]
        return [mode] if isinstance(mode, str) else list(mode)
    return [name for key, name in _LEGACY_MODES.items() if pooling.get(key)]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, settings: dict) -> torch.Tensor:
    """Sentence embeddings (B, modes * H) from token states (B, T, H) over the real tokens of ``attention_mask`` (B, T).

    Follows sentence-transformers' padded path: "cls" takes the first real
    token, "max" ignores padding, the means divide by the real-token count
    (its square root for "mean_sqrt_len_tokens", clamped at 1e-9); then L2
    normalisation when the source had a Normalize module.
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    out = []
    for mode in pooling_modes(settings["pooling"]):
        if mode == "cls":
            first = attention_mask.to(torch.int).argmax(dim=1)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
        elif mode == "max":
            out.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (hidden * mask).sum(dim=1)
            count = torch.clamp(mask.sum(dim=1), min=1e-9)
            out.append(total / (count if mode == "mean" else torch.sqrt(count)))
        else:
            raise SentenceSettingsError(f"pooling mode {mode!r} is not supported")
    emb = torch.cat(out, dim=-1)
    if settings.get("normalize"):
        emb = nn.functional.normalize(emb, p=2, dim=1)
    return emb


@torch.no_grad()
def embed(model: nn.Module, batch: dict, settings: dict | None = None) -> torch.Tensor:
    """Embeddings (B, D) of a tokenised ``batch`` by an encoder (``AutoModel``), pooled as sentence-transformers would.

    ``settings`` defaults to the ones kept on ``model.config`` (`SETTINGS_KEY`).
    """
    settings = settings or getattr(model.config, SETTINGS_KEY, None)
    if settings is None:
        raise SentenceSettingsError("the model has no sentence-transformers settings; load it with kind='encoder'")
    hidden = model(**batch).last_hidden_state
    return pool(hidden, batch["attention_mask"], settings)


@torch.no_grad()
def encode(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Embeddings (len(texts), D) of ``texts``, tokenised as sentence-transformers does (padding, truncation
    at the source's ``max_seq_length``), in batches of ``batch_size``."""
    settings = getattr(model.config, SETTINGS_KEY, None)
    if settings is None:
        raise SentenceSettingsError("the model has no sentence-transformers settings; load it with kind='encoder'")
    max_len = (settings.get("sentence_bert_config") or {}).get("max_seq_length")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out.append(embed(model, {k: v.to(device) for k, v in batch.items()}, settings))
    return torch.cat(out)


def write_sentence_transformers(folder: str | Path, config) -> bool:
    """Write the sentence-transformers files for a saved model whose config carries settings; False if none."""
    settings = getattr(config, SETTINGS_KEY, None)
    if settings is None:
        return False
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _POOLING},
    ]
    if settings.get("normalize"):
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
    _write_json(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _write_json(folder / "1_Pooling" / "config.json", settings["pooling"])
    _write_json(folder / "sentence_bert_config.json", settings.get("sentence_bert_config") or {})
    if settings.get("config"):
        _write_json(folder / "config_sentence_transformers.json", settings["config"])
    log.debug("wrote sentence-transformers files to %s", folder)
    return True


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


__all__ = [
    "SETTINGS_KEY",
    "SentenceSettingsError",
    "embed",
    "encode",
    "pool",
    "pooling_modes",
    "read_settings",
    "write_sentence_transformers",
]
