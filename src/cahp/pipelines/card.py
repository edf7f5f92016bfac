"""Model cards: README.md of a pruned output folder, ready for the Hugging Face Hub.

`write_model_card(folder, report)` turns a prune report (the dict behind
``report.json``, see `cahp.pipelines.prune`) into a card: base model and its
licence, task, kept heads (and neurons) per layer, parameters, test scores
before and after with their 95% intervals, the measured speedup when the
report has one, the exact command, the cahp version, and how to load the
folder with plain transformers, sentence-transformers (when the folder is
one) and cahp. Nothing local goes in: an absolute path in the report (a model
folder, an output directory in the command) is written as its last component.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
_STAGES = (("before_pruning", "before pruning"), ("after_pruning", "after pruning"),
           ("after_finetune", "after pruning and one fine-tuning"))
_METRICS = ("accuracy", "macro_f1", "pearson", "spearman")
# An absolute POSIX or home path (not the "//" of a URL); Windows drives too.
_ABS_PATH = re.compile(r"(?<![\w:/.])(?:~?/|[A-Za-z]:[\\/])[^\s'\"`,;)]*")


def strip_local_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (``/home/me/runs/m`` -> ``m``)."""

    def last(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", m.group(0)) if p and p != "~"]
        return parts[-1] if parts else "."

    return _ABS_PATH.sub(last, text)


def _front_matter(folder: Path) -> dict[str, str]:
    """The flat ``key: value`` lines of a README's YAML front matter (enough for ``license``)."""
    readme = folder / CARD_NAME
    if not readme.is_file():
        return {}
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "-")) and value.strip():
            out[key.strip()] = value.strip()
    return out


def base_model_info(name: str) -> dict:
    """``{"name", "hub_id", "license"}`` of a base model given as a short name, local folder or Hub id.

    The licence comes from the model folder's own card (its front matter),
    where the folder is on this machine; otherwise it stays None.
    """
    from cahp.model.loading import PACKAGED, ModelLoadError, resolve_model

    hub_id = PACKAGED[name].hub_id if name in PACKAGED else None
    if hub_id is None and not Path(name).expanduser().is_absolute() and name.count("/") == 1:
        hub_id = name  # an "owner/name" Hub id
    license_ = None
    try:
        source = Path(resolve_model(name))
        if source.is_dir():
            license_ = _front_matter(source).get("license")
    except (ModelLoadError, OSError):
        pass
    shown = name if hub_id or not Path(name).expanduser().is_absolute() else Path(name).name
    return {"name": strip_local_paths(shown), "hub_id": hub_id, "license": license_}


def _by_layer(kept: dict) -> list[tuple[int, list[int]]]:
    """``{"0": [...], "10": [...]}`` in layer order (JSON keys are strings)."""
    return sorted(((int(k), v) for k, v in kept.items()), key=lambda kv: kv[0])


def _score_cell(result: dict | None, metric: str) -> str:
    if not result or result.get(metric) is None:
        return "-"
    value = 100 * result[metric]
    ci = result.get(f"{metric}_ci95")
    return f"{value:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else f"{value:.2f}"


def _scores_table(scores: dict) -> list[str]:
    split = next((s for stage, _ in _STAGES for s in (scores.get(stage) or {})), None)
    if split is None:
        return []
    rows = [(label, (scores.get(stage) or {}).get(split)) for stage, label in _STAGES]
    metrics = [m for m in _METRICS if any(r and r.get(m) is not None for _, r in rows)]
    lines = [f"| {split} split | " + " | ".join(f"{m} (95% interval)" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    lines += [f"| {label} | " + " | ".join(_score_cell(r, m) for m in metrics) + " |" for label, r in rows if r]
    return lines


def _speedup_lines(speedup) -> list[str]:
    """``{"1 x 32": 1.8, "32 x 128": {"ratio": 1.5, "ci95": [1.4, 1.6]}}`` -> bullet lines."""
    out = []
    for shape, value in (speedup or {}).items():
        if isinstance(value, dict):
            ratio = value.get("ratio", value.get("speedup"))
            ci = value.get("ci95")
            note = f" ({value['note']})" if value.get("note") else ""
            text = f"{ratio:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + note
        else:
            text = f"{value:.2f}x"
        out.append(f"- batch {shape}: {text}")
    return out


def _command(report: dict) -> str | None:
    command = report.get("command") or (report.get("meta") or {}).get("command")
    if isinstance(command, (list, tuple)):
        command = " ".join(map(str, command))
    return strip_local_paths(command) if command else None


def _loading(folder: Path, config: dict) -> list[str]:
    archs = config.get("architectures") or []
    head = any("ForSequenceClassification" in a for a in archs)
    causal = not head and any(a.endswith("ForCausalLM") for a in archs)
    auto = "AutoModelForSequenceClassification" if head else "AutoModelForCausalLM" if causal else "AutoModel"
    lines = [
        "## How to load",
        "",
        "The folder carries its own modeling code (`modeling_cahp.py`, torch + transformers only): "
        "load it with `trust_remote_code=True`; cahp is not needed.",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        'path = "path/to/this/folder"  # or its Hub id',
        f"model = {auto}.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
    ]
    if (folder / "modules.json").is_file():
        lines += [
            "",
            "With sentence-transformers (same pooling and normalisation as the base model):",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("path/to/this/folder", trust_remote_code=True)',
            'embeddings = model.encode(["A sentence.", "Another one."])',
            "```",
        ]
    kind = "" if head else ', kind="causal-lm"' if causal else ', kind="encoder"'
    lines += ["", "With cahp (to prune further or fine-tune):", "", "```python", "import cahp", "",
              f'model, tokenizer = cahp.load_model("path/to/this/folder"{kind})', "```"]
    return lines


def model_card(folder: str | Path, report: dict) -> str:
    """The text of the card for ``folder`` (a saved pruned model) from ``report``; see `write_model_card`."""
    import cahp

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    base = base_model_info(str(report.get("model", "")))
    license_ = report.get("license") or base["license"]
    task = report.get("task")
    sentence = (folder / "modules.json").is_file()
    version = (report.get("environment") or {}).get("cahp") or cahp.__version__
    tags = ["cahp", "pruned", "attention-head-pruning"] + (["sentence-transformers"] if sentence else [])
    front = ["---"]
    if license_:
        front.append(f"license: {license_}")
    if base["hub_id"]:
        front.append(f"base_model: {base['hub_id']}")
    front.append(f"library_name: {'sentence-transformers' if sentence else 'transformers'}")
    front.append("pipeline_tag: " + ("sentence-similarity" if sentence and not task else "text-classification"))
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]

    title = f"{base['name'] or 'model'}" + (f" pruned for {task}" if task else " pruned") + " by cahp"
    lines = [f"# {title}", ""]
    lines.append(
        f"Structured pruning of attention heads with CAHP (complementary attention head pruning), cahp {version}."
    )
    lines += ["", "## Base model and pruning", ""]
    shown_base = f"`{base['name']}`" + (f" ([{base['hub_id']}](https://huggingface.co/{base['hub_id']}))"
                                         if base["hub_id"] and base["hub_id"] != base["name"] else "")
    lines.append(f"- base model: {shown_base}")
    lines.append(f"- licence of the base model: {license_ or 'not known to cahp: see the base model card'}")
    if task:
        lines.append(f"- task: {task}")
    per_layer = report.get("heads_per_layer")
    if per_layer is None and report.get("kept_heads"):
        per_layer = [len(v) for _, v in _by_layer(report["kept_heads"])]
    if per_layer is not None:
        total = report.get("heads_before")
        kept = sum(per_layer)
        lines.append(f"- attention heads kept: {kept}" + (f" of {total}" if total else "")
                     + f", per layer {list(per_layer)}")
    if report.get("neurons_per_layer") is not None:
        lines.append(f"- feed-forward neurons kept per layer: {list(report['neurons_per_layer'])}")
    params = report.get("parameters") or {}
    if params.get("before") and params.get("after"):
        lines.append(f"- parameters: {params['before']:,} -> {params['after']:,} "
                     f"({100 * params['after'] / params['before']:.1f}%)")
    if report.get("kept_heads"):
        lines += ["", "Kept heads (original numbering, layer: heads):", "", "```"]
        lines += [f"{layer}: {heads}" for layer, heads in _by_layer(report["kept_heads"])]
        lines.append("```")
    table = _scores_table(report.get("scores") or {})
    if table:
        lines += ["", "## Scores", "", *table]
    speed = _speedup_lines(report.get("speedup"))
    if speed:
        lines += ["", "## Measured speedup over the dense model", "", *speed]
    command = _command(report)
    lines += ["", "## How it was made", ""]
    lines.append(f"```bash\n{command}\n```" if command else "The command was not recorded.")
    lines.append(f"\ncahp {version}; the full report with every setting is `report.json` where the run wrote it.")
    lines += ["", *_loading(folder, config), ""]
    return strip_local_paths("\n".join(front + lines))


def write_model_card(folder: str | Path, report: dict) -> Path:
    """Write README.md (the model card) into ``folder`` from a prune ``report``; returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(folder, report))
    log.info("wrote the model card %s", path)
    return path


__all__ = ["base_model_info", "model_card", "strip_local_paths", "write_model_card"]
