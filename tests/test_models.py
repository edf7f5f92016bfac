"""Model loading: short names, folders, clear errors, the MPNet piece cache."""

from __future__ import annotations

import io
import json
import random
import threading
import zipfile

import pytest
import torch

import cahp
from cahp.model import loading as models


def test_folder_without_config(tmp_path):
    with pytest.raises(cahp.ModelLoadError, match="no config.json"):
        cahp.load_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(cahp.ModelLoadError, match="no weights"):
        cahp.load_model(str(tmp_path))


def test_missing_folder_path():
    with pytest.raises(cahp.ModelLoadError, match="does not exist"):
        cahp.load_model("./no/such/model")


def test_unknown_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cahp.ModelLoadError, match="minilm-l6, mpnet-base"):
        cahp.load_model("surely-not-a-model-name-xyz")


def _fake_pieces(tmp_path, n=5):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 1000)
    data = buf.getvalue()
    step = len(data) // n + 1
    parts = []
    for i in range(n):
        p = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        p.write_bytes(data[i * step : (i + 1) * step])
        parts.append(p)
    return parts


def test_mpnet_pieces_unpack_once_and_atomically(tmp_path, monkeypatch):
    parts = _fake_pieces(tmp_path)
    monkeypatch.setattr(models, "_mpnet_parts", lambda: parts)
    monkeypatch.setenv("CAHP_CACHE_DIR", str(tmp_path / "cache"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(models._mpnet_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    assert results == [target] * 3
    assert (target / "model.safetensors").read_bytes() == b"x" * 1000
    # no temporary folders left behind
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["all-mpnet-base-v2"]


def test_mpnet_missing_package_falls_back_to_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_mpnet_parts", lambda: None)
    monkeypatch.setenv("CAHP_CACHE_DIR", str(tmp_path / "cache"))
    assert models.resolve_model("mpnet-base") == "sentence-transformers/all-mpnet-base-v2"


def test_mpnet_unpacked_copy_in_cache_needs_no_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_mpnet_parts", lambda: None)
    monkeypatch.setenv("CAHP_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    assert models.resolve_model("mpnet-base") == str(target)


@pytest.mark.integration
def test_minilm_prune_half_save_load(tmp_path):
    model, tok = cahp.load_model("minilm-l6", num_labels=5)
    assert cahp.count_parameters(model) == 22_715_141
    rng = random.Random(0)
    flat = rng.sample([(l, h) for l in range(6) for h in range(12)], 36)
    pattern: dict[int, list[int]] = {}
    for l, h in flat:
        pattern.setdefault(l, []).append(h)
    batch = tok(["a gorgeous, witty film", "it drags."], padding=True, return_tensors="pt")
    cahp.remove_heads(model, pattern)
    assert cahp.num_kept(model) == 36
    assert cahp.count_parameters(model) == 22_715_141 - 36 * (3 * (32 * 384 + 32) + 384 * 32)
    with torch.no_grad():
        before = model(**batch).logits
    cahp.save_pruned(model, tok, tmp_path / "pruned")
    loaded, tok2 = cahp.load_model(str(tmp_path / "pruned"))
    with torch.no_grad():
        after = loaded(
            **tok2(["a gorgeous, witty film", "it drags."], padding=True, return_tensors="pt")
        ).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.integration
def test_mpnet_prune_half_gate_equals_surgery_save_load(tmp_path):
    """The real mpnet-base: shared relative position bias sliced per layer after uneven pruning."""
    model, tok = cahp.load_model("mpnet-base", num_labels=3)
    n0 = cahp.count_parameters(model)
    assert n0 == 109_490_309 - 2 * (768 + 1)  # the 5-label head of the reference count, minus two classes
    rng = random.Random(1)
    flat = rng.sample([(l, h) for l in range(12) for h in range(12)], 72)
    pattern: dict[int, list[int]] = {}
    for l, h in flat:
        pattern.setdefault(l, []).append(h)
    batch = tok(["a gorgeous, witty film", "it drags on and on, and the ending is a letdown."], padding=True,
                return_tensors="pt")
    gates = torch.ones(12, 12)
    for l, hs in pattern.items():
        gates[l, hs] = 0
    with cahp.head_gates(model, init=gates), torch.no_grad():
        gated = model(**batch).logits
    cahp.remove_heads(model, pattern)
    with torch.no_grad():
        pruned = model(**batch).logits
    torch.testing.assert_close(pruned, gated, atol=1e-5, rtol=0)
    assert n0 - cahp.count_parameters(model) == 72 * (3 * (64 * 768 + 64) + 768 * 64)
    cahp.save_pruned(model, tok, tmp_path / "p")
    loaded, _ = cahp.load_pruned(tmp_path / "p", with_tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pruned, atol=0, rtol=0)
