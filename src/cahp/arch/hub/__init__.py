"""Family knowledge for self-contained pruned folders: the code copied into them and the config entries naming it.

`CODE_FILES` (configuration_cahp.py, modeling_cahp.py, both in this folder)
go beside the weights; they import only torch and transformers, never cahp.
A saved config.json then names its own model type (``cahp-bert``, ``cahp-llama``, ...) and an
``auto_map`` pointing at those files, so that transformers' Auto classes load
the pruned model with ``trust_remote_code=True`` and ask for that flag
without it. `to_remote` and `from_remote` convert a config dict between
transformers' family type (what cahp works with in memory) and that form;
`load_config` reads either form (and folders saved before remote code) as a
plain family config.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

HUB_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_cahp.py", "modeling_cahp.py")
_PREFIX = "Cahp"

# transformers' model type -> class-name stem in the hub files (CahpBertConfig, CahpBertModel, ...)
STEMS = {
    "bert": "Bert",
    "roberta": "Roberta",
    "electra": "Electra",
    "distilbert": "DistilBert",
    "mpnet": "MPNet",
    "llama": "Llama",
    "qwen2": "Qwen2",
    "mistral": "Mistral",
}
#: The decoder families (grouped-query attention), which also have a causal language-modelling head.
DECODERS = ("llama", "qwen2", "mistral")
# The heads the hub files provide per family, besides the bare model (AutoModel).
_ENCODER_HEADS = {"ForSequenceClassification": "AutoModelForSequenceClassification"}
_DECODER_HEADS = {"ForCausalLM": "AutoModelForCausalLM", **_ENCODER_HEADS}


def _heads(family: str) -> dict[str, str]:
    return _DECODER_HEADS if family in DECODERS else _ENCODER_HEADS


def remote_type(family_type: str) -> str | None:
    """The model type a saved folder declares for ``family_type`` ("bert" -> "cahp-bert"); None if unsupported."""
    return f"cahp-{family_type}" if family_type in STEMS else None


def has_remote_code(config_dict: dict) -> bool:
    """Whether a config dict can be written in the self-contained form."""
    return config_dict.get("model_type") in STEMS


def to_remote(config_dict: dict) -> dict:
    """A family config dict -> the dict a self-contained folder stores (model type, architectures, auto_map).

    ``architectures`` becomes the hub class of the same head where the hub
    files have one (``BertForSequenceClassification`` -> ``CahpBertForSequenceClassification``,
    ``LlamaForCausalLM`` -> ``CahpLlamaForCausalLM``); other heads keep their
    name and load through ``AutoModel`` only.
    """
    family = config_dict["model_type"]
    stem = STEMS[family]
    out = dict(config_dict)
    out["model_type"] = remote_type(family)
    auto_map = {
        "AutoConfig": f"configuration_cahp.{_PREFIX}{stem}Config",
        "AutoModel": f"modeling_cahp.{_PREFIX}{stem}Model",
    }
    heads = _heads(family)
    for suffix, auto in heads.items():
        auto_map[auto] = f"modeling_cahp.{_PREFIX}{stem}{suffix}"
    out["auto_map"] = auto_map
    known = {f"{stem}Model", *(f"{stem}{s}" for s in heads)}
    out["architectures"] = [_PREFIX + a if a in known else a for a in config_dict.get("architectures") or []]
    return out


def from_remote(config_dict: dict) -> dict:
    """Inverse of `to_remote`; a dict in the family form (an old-format folder) comes back unchanged."""
    model_type = config_dict.get("model_type", "")
    family = next((f for f in STEMS if remote_type(f) == model_type), None)
    if family is None:
        return dict(config_dict)
    out = {k: v for k, v in config_dict.items() if k != "auto_map"}
    out["model_type"] = family
    stem = STEMS[family]
    out["architectures"] = [
        a[len(_PREFIX) :] if a.startswith(_PREFIX + stem) else a for a in config_dict.get("architectures") or []
    ]
    return out


def load_config(folder: str | Path) -> transformers.PretrainedConfig:
    """The family config (``BertConfig``, ...) of a model folder, self-contained or not."""
    config_dict = from_remote(json.loads((Path(folder) / "config.json").read_text()))
    family = config_dict.pop("model_type", None)
    if family is None:
        return transformers.AutoConfig.from_pretrained(folder)
    return transformers.CONFIG_MAPPING[family].from_dict(config_dict)


__all__ = [
    "CODE_FILES",
    "DECODERS",
    "HUB_DIR",
    "STEMS",
    "from_remote",
    "has_remote_code",
    "load_config",
    "remote_type",
    "to_remote",
]
