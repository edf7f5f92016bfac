"""Model cards and Hub-ready folders: everything a pruned output folder says, and no local path in it."""

from __future__ import annotations

import pytest

import cahp
from cahp.pipelines.card import base_model_info, strip_local_paths, write_model_card

from .test_deploy import pruned, tiny_sentence_folder


def report(tmp_path, model="minilm-l6"):
    """A prune report as `cahp.pipelines.prune` writes it, with local paths where a real run has them."""
    return {
        "model": model,
        "task": "sst5",
        "settings": {"prune": {"output_dir": str(tmp_path / "runs" / "out"), "data_dir": str(tmp_path / "data")}},
        "heads_before": 12,
        "kept_heads": {"0": [0, 2, 3], "1": [], "2": [1, 2]},
        "heads_per_layer": [3, 0, 2],
        "parameters": {"before": 1000, "after": 800},
        "scores": {
            "before_pruning": {"test": {"accuracy": 0.5122, "accuracy_ci95": [0.49, 0.53], "macro_f1": 0.4}},
            "after_pruning": {"test": {"accuracy": 0.391, "accuracy_ci95": [0.37, 0.41]}},
            "after_finetune": {"test": {"accuracy": 0.4814, "accuracy_ci95": [0.46, 0.50]}},
        },
        "speedup": {"1 x 32": {"ratio": 1.31, "ci95": [1.2, 1.4]}, "32 x 128": 1.18},
        "command": ["cahp", "prune", "--model", "minilm-l6", "--output-dir", str(tmp_path / "runs" / "out")],
        "environment": {"cahp": "0.1.0", "date": "2026-12-01"},
    }


def all_text(folder):
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    return {p.name: p.read_text(errors="replace") for p in files}


def test_card_says_what_and_how(tmp_path):
    folder = cahp.save_pruned(pruned("bert", ffn=False), None, tmp_path / "m")
    card = write_model_card(folder, report(tmp_path)).read_text()
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n")
    for text in (
        "task: sst5",
        "attention heads kept: 5 of 12, per layer [3, 0, 2]",
        "1: []",
        "parameters: 1,000 -> 800 (80.0%)",
        "| before pruning | 51.22 [49.00, 53.00] | 40.00 |",
        "| after pruning and one fine-tuning | 48.14 [46.00, 50.00] | - |",
        "batch 1 x 32: 1.31x [1.20, 1.40]",
        "batch 32 x 128: 1.18x",
        "cahp prune --model minilm-l6 --output-dir out",
        "cahp 0.1.0",
        "AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)",
    ):
        assert text in card, text
    assert "SentenceTransformer" not in card  # not a sentence-transformers folder


def test_no_local_paths_in_any_written_file(tmp_path):
    source = tiny_sentence_folder(tmp_path / "src")
    model, tok = cahp.load_model(str(source), kind="encoder")
    cahp.remove_heads(model, {0: [1], 2: [0, 1, 2, 3]})
    folder = cahp.save_pruned(model, tok, tmp_path / "pruned")
    card = write_model_card(folder, report(tmp_path, model=str(source))).read_text()
    assert 'SentenceTransformer("path/to/this/folder", trust_remote_code=True)' in card
    assert 'cahp.load_model("path/to/this/folder", kind="encoder")' in card
    assert "base model: `src`" in card
    files = all_text(folder)
    assert {"README.md", "config.json", "modules.json", "modeling_cahp.py", "tokenizer_config.json"} <= set(files)
    for name, text in files.items():
        for local in (str(tmp_path), "/tmp", "/root", "/home", "site-packages"):
            assert local not in text, f"{name} contains {local}"


def test_strip_local_paths_keeps_urls_and_relative_paths():
    text = "see https://huggingface.co/a/b, run --out /home/me/runs/x and ~/m/y; path/to/folder C:\\Users\\me\\z"
    assert strip_local_paths(text) == "see https://huggingface.co/a/b, run --out x and y; path/to/folder z"


@pytest.mark.parametrize(
    "name, hub_id",
    [("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2"), ("owner/model", "owner/model")],
)
def test_base_model_info(name, hub_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = base_model_info(name)
    assert info["hub_id"] == hub_id
    assert (info["license"] == "apache-2.0") == (name == "minilm-l6")


def test_card_of_a_decoder_loads_it_as_a_causal_lm(tmp_path):
    from cahp.pipelines.card import model_card

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "cahp-llama", "architectures": ["CahpLlamaForCausalLM"]}')
    card = model_card(folder, {**report(tmp_path, model="smollm2-135m"), "task": "sst5"})
    assert "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card
    assert 'cahp.load_model("path/to/this/folder", kind="causal-lm")' in card
