"""Self-contained pruned folders: plain transformers (no cahp) loads them with trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

import cahp
from cahp.arch import get_adapter
from cahp.arch.hub import from_remote, to_remote
from cahp.model.surgery import _slice_linear

from .tiny import FAMILIES, tiny_batch, tiny_model

HEADS = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # heads removed: uneven, layer 1 left with none
FFN_KEPT = {0: [0, 1, 2, 3, 7, 9, 10, 11, 40, 63], 1: [], 2: list(range(5, 64))}  # uneven, layer 1 empty
FFN_RECORD = {"intermediate_size": 64, "counts": [10, 0, 59], "indices": ["0-3,7,9-11,40,63", "", "5-63"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def with_biases(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero biases: an empty block keeps its output bias, which must survive
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def slice_ffn_by_hand(model, kept=FFN_KEPT):
    """Neuron surgery written out in the test: rows of the intermediate, columns of the output projection."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        if not kept[i]:
            adapter.make_ffn_empty(layer, model.config)
            continue
        ffn = adapter.ffn(layer)
        idx = torch.tensor(kept[i])
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if child is ffn.inter:
                    setattr(parent, name, _slice_linear(child, idx, dim=0))
                elif child is ffn.out:
                    setattr(parent, name, _slice_linear(child, idx, dim=1))
    model.config.cahp_kept_neurons = FFN_RECORD
    return model


def pruned(family, ffn=True):
    model = cahp.remove_heads(with_biases(tiny_model(family)), HEADS)
    return slice_ffn_by_hand(model) if ffn else model


# Runs in a fresh interpreter where `import cahp` fails: only torch and transformers are there.
NO_CAHP = textwrap.dedent(
    """
    import json, sys
    sys.modules["cahp"] = None  # any `import cahp` now raises ImportError
    import torch, transformers
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        cls = getattr(transformers, job["auto"])
        model = cls.from_pretrained(job["folder"], trust_remote_code=True).eval()
        batch = torch.load(job["batch"])
        with torch.no_grad():
            out = model(**batch)
        torch.save(out[0], job["out"])
    """
)


def run_without_cahp(tmp_path, jobs):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", NO_CAHP, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def pruned_by_cahp(family, seed=0):
    """Heads and neurons removed by cahp's own surgery: random uneven widths, layer 0's FFN emptied."""
    model = cahp.remove_heads(with_biases(tiny_model(family)), {0: [0, 2], 2: [1, 2, 3]})
    g = torch.Generator().manual_seed(seed)
    d_ff = get_adapter(model).intermediate_size(model.config)
    remove = {0: list(range(d_ff))}
    for layer in (1, 2):
        remove[layer] = torch.randperm(d_ff, generator=g)[: int(torch.randint(1, d_ff - 1, (1,), generator=g))].tolist()
    return cahp.remove_neurons(model, remove)


def test_every_family_loads_without_cahp(tmp_path):
    batch = tiny_batch()
    torch.save(batch, tmp_path / "batch.pt")
    jobs, expected = [], {}
    for family in FAMILIES:
        for how, model in (("hand", pruned(family)), ("surgery", pruned_by_cahp(family))):
            folder = cahp.save_pruned(model, None, tmp_path / f"pruned-{family}-{how}")
            counts = json.loads((folder / "config.json").read_text())["cahp_kept_neurons"]["counts"]
            assert 0 in counts and len(set(counts)) == 3  # an empty FFN and uneven widths
            encoder = getattr(model, model.base_model_prefix)
            with torch.no_grad():
                expected[family, how, "logits"] = model(**batch).logits
                expected[family, how, "hidden"] = encoder(**batch).last_hidden_state
            for auto, what in (("AutoModelForSequenceClassification", "logits"), ("AutoModel", "hidden")):
                out = str(tmp_path / f"{family}-{how}-{what}.pt")
                jobs.append({"auto": auto, "folder": str(folder), "batch": str(tmp_path / "batch.pt"), "out": out})
    run_without_cahp(tmp_path, jobs)
    for family, how, what in expected:
        got = torch.load(tmp_path / f"{family}-{how}-{what}.pt")
        torch.testing.assert_close(got, expected[family, how, what], atol=1e-5, rtol=0, msg=f"{family} {how} {what}")


def test_folder_holds_code_and_auto_map(tmp_path):
    folder = cahp.save_pruned(pruned("bert"), None, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cahp-bert"
    assert config["architectures"] == ["CahpBertForSequenceClassification"]
    assert config["auto_map"]["AutoModel"] == "modeling_cahp.CahpBertModel"
    assert config["cahp_kept_neurons"] == FFN_RECORD
    assert config["cahp_kept_heads"]["1"] == []
    for name in ("configuration_cahp.py", "modeling_cahp.py"):
        code = (folder / name).read_text()
        assert "import cahp" not in code and "from cahp" not in code


@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForSequenceClassification"])
def test_plain_from_pretrained_asks_for_trust_remote_code(tmp_path, auto):
    folder = cahp.save_pruned(pruned("bert"), None, tmp_path / "m")
    with pytest.raises(ValueError, match="trust_remote_code"):
        getattr(transformers, auto).from_pretrained(folder)


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_trust_remote_code_in_process_matches(tmp_path, family):
    model = pruned(family)
    folder = cahp.save_pruned(model, None, tmp_path / f"m-{family}")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    batch = tiny_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in loaded.parameters()) == cahp.count_parameters(model)


def test_load_pruned_reads_self_contained_folder(tmp_path):
    model = pruned("mpnet", ffn=False)
    folder = cahp.save_pruned(model, None, tmp_path / "m")
    again, _ = cahp.load_pruned(folder, with_tokenizer=False)
    assert again.config.model_type == "mpnet" and not hasattr(again.config, "auto_map")
    assert cahp.kept_heads(again) == cahp.kept_heads(model)
    batch = tiny_batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
    # Saved again, the folder is the same self-contained form.
    second = json.loads((cahp.save_pruned(again, None, tmp_path / "m2") / "config.json").read_text())
    assert second["model_type"] == "cahp-mpnet" and second["architectures"] == ["CahpMPNetForSequenceClassification"]


def test_load_pruned_reads_old_format_folder(tmp_path):
    """A folder written before remote code: family model type, no auto_map, no code files."""
    model = pruned("bert", ffn=False)
    folder = tmp_path / "old"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)  # cahp_kept_heads is on the config already
    import safetensors.torch

    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    again, _ = cahp.load_pruned(folder, with_tokenizer=False)
    batch = tiny_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_remote_config_round_trip():
    base = {"model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"], "dim": 32}
    remote = to_remote(base)
    assert remote["model_type"] == "cahp-distilbert"
    assert remote["architectures"] == ["DistilBertForMaskedLM"]  # no hub class for this head: AutoModel only
    assert from_remote(remote) == base
    assert from_remote(base) == base


# --- sentence-transformers ---------------------------------------------------

WORDS = [f"w{i}" for i in range(94)]


def tiny_sentence_folder(path, family="bert", normalize=True, pooling=None):
    """A sentence-transformers folder of a tiny random encoder, with a word-level BERT tokenizer."""
    from .tiny import tiny_config

    torch.manual_seed(0)
    encoder = with_biases(transformers.AutoModel.from_config(tiny_config(family))).eval()
    encoder.save_pretrained(path)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(vocab_file=str(vocab), do_lower_case=False).save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = pooling or {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    return path


TEXTS = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16", "w20", "w30 w31 w5 w9 w9"]


@pytest.mark.parametrize(
    "family, normalize, pooling",
    [
        ("bert", True, None),
        ("mpnet", False, {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                          "pooling_mode_max_tokens": True}),
    ],
)
def test_sentence_transformers_round_trip(tmp_path, family, normalize, pooling):
    from sentence_transformers import SentenceTransformer

    from cahp.deploy.sentence import SETTINGS_KEY, encode

    source = tiny_sentence_folder(tmp_path / "src", family, normalize, pooling)
    model, tok = cahp.load_model(str(source), kind="encoder")
    assert type(model).__name__.endswith("Model") and getattr(model.config, SETTINGS_KEY)["normalize"] is normalize
    cahp.remove_heads(model, HEADS)
    folder = cahp.save_pruned(model, tok, tmp_path / "pruned")
    ours = encode(model, tok, TEXTS)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    theirs = st.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    if normalize:
        torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(TEXTS)))
    # cahp reads its own folder back as an encoder with the same settings.
    again, tok2 = cahp.load_model(str(folder), kind="encoder")
    torch.testing.assert_close(encode(again, tok2, TEXTS), ours, atol=1e-6, rtol=0)
    with pytest.raises(cahp.ModelLoadError, match="kind='encoder'"):
        cahp.load_model(str(folder))


def test_pool_matches_sentence_transformers_pooling():
    from sentence_transformers.models import Pooling

    from cahp.deploy.sentence import pool

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    for mode in ("cls", "max", "mean", "mean_sqrt_len_tokens"):
        ref = Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        got = pool(hidden, mask, {"pooling": {"pooling_mode": mode}})
        torch.testing.assert_close(got, ref, msg=mode)


def test_encoder_kind_errors(tmp_path):
    from cahp.deploy.sentence import SentenceSettingsError, read_settings

    source = tiny_sentence_folder(tmp_path / "src")
    with pytest.raises(cahp.ModelLoadError, match="unknown model kind"):
        cahp.load_model(str(source), kind="decoder")
    with pytest.raises(cahp.ModelLoadError, match="num_labels"):
        cahp.load_model(str(source), kind="encoder", num_labels=2)
    modules = json.loads((source / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (source / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SentenceSettingsError, match="Dense"):
        read_settings(source)
    with pytest.raises(cahp.ModelLoadError, match="Dense"):
        cahp.load_model(str(source), kind="encoder")


@pytest.mark.integration
def test_minilm_sentence_transformers_and_plain_transformers(tmp_path):
    """The real packaged minilm-l6 as an encoder: pruned, saved, reloaded by sentence-transformers and without cahp."""
    from sentence_transformers import SentenceTransformer

    from cahp.deploy.sentence import encode

    model, tok = cahp.load_model("minilm-l6", kind="encoder")
    cahp.remove_heads(model, {0: [0, 5], 2: list(range(12)), 4: [1, 2, 3]})
    folder = cahp.save_pruned(model, tok, tmp_path / "minilm-pruned")
    assert json.loads((folder / "modules.json").read_text())[-1]["type"].endswith("Normalize")
    texts = ["A tiny pruned encoder.", "Sentence embeddings survive head pruning.", "ok"]
    ours = encode(model, tok, texts)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    theirs = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    batch = tok(texts, padding=True, return_tensors="pt")
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    job = {"auto": "AutoModel", "folder": str(folder), "batch": str(tmp_path / "batch.pt")}
    run_without_cahp(tmp_path, [{**job, "out": str(tmp_path / "h.pt")}])
    torch.testing.assert_close(torch.load(tmp_path / "h.pt"), expected, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_minilm_classifier_loads_without_cahp(tmp_path):
    """The real minilm-l6 with a classification head, heads and FFN neurons removed, loaded without cahp."""
    model, tok = cahp.load_model("minilm-l6", num_labels=5)
    cahp.remove_heads(model, {1: [0, 1, 2], 3: list(range(12))})
    cahp.remove_neurons(model, {0: list(range(0, 1536, 2)), 5: list(range(1536))})
    folder = cahp.save_pruned(model, tok, tmp_path / "minilm-classifier")
    texts = ["a gripping film", "dull and far too long, with a plot that goes nowhere"]
    batch = tok(texts, padding=True, return_tensors="pt")
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    job = {"auto": "AutoModelForSequenceClassification", "folder": str(folder), "batch": str(tmp_path / "batch.pt")}
    run_without_cahp(tmp_path, [{**job, "out": str(tmp_path / "logits.pt")}])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)



@pytest.mark.integration
def test_load_pruned_never_asks_about_remote_code(tmp_path, monkeypatch):
    """config.json names cahp-bert: reading the folder (tokenizer included) must not ask on the terminal."""
    model, tok = cahp.load_model("minilm-l6", num_labels=2)
    cahp.remove_heads(model, {0: [1]})
    cahp.save_pruned(model, tok, tmp_path / "pruned")

    def no_prompt(*args, **kwargs):
        raise AssertionError("transformers asked whether to run the folder's remote code")

    for module in ("configuration_auto", "tokenization_auto", "auto_factory"):
        monkeypatch.setattr(f"transformers.models.auto.{module}.resolve_trust_remote_code", no_prompt)
    again, tok2 = cahp.load_pruned(tmp_path / "pruned")
    assert tok2 is not None and type(again).__name__ == "BertForSequenceClassification"
