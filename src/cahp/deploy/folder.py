"""Self-contained pruned folders: the remote code and config entries that plain transformers needs.

`make_self_contained` runs on a folder `cahp.save_pruned` has just written
(config.json, weights): it copies the hub files of `cahp.arch.hub` beside the
weights and rewrites config.json to name them, so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # Llama, Qwen2, Mistral decoders

build the pruned model without cahp, and the same calls without
``trust_remote_code`` ask for it. A model with sentence-transformers settings
(`cahp.load_model(..., kind="encoder")`) also gets the sentence-transformers
files (see `cahp.deploy.sentence`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cahp.arch import hub
from cahp.deploy.sentence import write_sentence_transformers

log = logging.getLogger(__name__)


def make_self_contained(folder: str | Path, model) -> Path:
    """Add remote code (and sentence-transformers files where the model has settings) to a saved folder."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    config_dict = json.loads(cfg_file.read_text())
    if hub.has_remote_code(config_dict):
        for name in hub.CODE_FILES:
            shutil.copyfile(hub.HUB_DIR / name, folder / name)
        cfg_file.write_text(json.dumps(hub.to_remote(config_dict), indent=2, sort_keys=True) + "\n")
    else:
        log.warning(
            "%s: no remote code for this model family; load it with cahp.load_pruned", type(model).__name__
        )
    write_sentence_transformers(folder, model.config)
    return folder


__all__ = ["make_self_contained"]
