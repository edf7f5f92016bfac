"""Decoders pruned as sequence classifiers (``--decoder-head classifier``): loading with a pad token, gates and
surgery on LlamaForSequenceClassification, `run_prune` and `run_compare` on a tiny Llama classifier."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from cahp.arch import get_adapter
from cahp.cli import main
from cahp.model.gates import head_gates
from cahp.model.heads import kept_kv_heads
from cahp.model.loading import ModelLoadError, decoder_pad_token, load_model
from cahp.model.surgery import count_parameters, remove_heads
from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.guard import build_task
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.stats.signatures import collect_signatures
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig

from .test_decoder import HEADS, LAYERS, MIXED, batch, captured, tiny_decoder
from .test_decoder_prune import WORDS, tiny_tokenizer, write_decoder_folder

N_LABELS = 3


def eos_only_tokenizer():
    """A word-level tokenizer over ``WORDS`` with an eos token and no pad token (as Llama tokenizers often are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def tiny_classifier(kv_heads: int = 3, attn: str = "sdpa", seed: int = 0):
    """`tiny_decoder`'s architecture as LlamaForSequenceClassification with ``N_LABELS`` labels (pad id 0)."""
    config = tiny_decoder(kv_heads, attn=attn).config
    config.num_labels = N_LABELS
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def label_of(text: str) -> int:
    """A learnable label: the first word's number modulo ``N_LABELS``."""
    return int(text.split()[0][1:]) % N_LABELS


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    """root with model/ (a tiny Llama causal LM, 3 KV heads per layer, and its tokenizer) and task/ (3 labels)."""
    root = tmp_path_factory.mktemp("decoder-classifier")
    return write_decoder_folder(root, (150, 40, 40), seed=10, label=lambda _j, t: label_of(t))


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      decoder_head="classifier", calibration_examples=40, curve_examples=30, stats_batch_size=16,
                      grid_step=2, **kw)
    return cfg, FinetuneConfig(epochs=2, lr=2e-3, batch_size=16, max_length=16, seed=0)


def test_classifier_loads_with_a_pad_token_and_a_seeded_head(tmp_path, one_thread):
    folder = tmp_path / "lm"
    model = tiny_decoder(kv_heads=3)
    model.config.pad_token_id = None  # neither config nor tokenizer names a pad: eos becomes the pad
    model.save_pretrained(folder)
    eos_only_tokenizer().save_pretrained(folder)
    clf, tok = load_model(str(folder), num_labels=N_LABELS, seed=3)
    assert type(clf).__name__ == "LlamaForSequenceClassification" and clf.config.num_labels == N_LABELS
    assert clf.config.pad_token_id == tok.pad_token_id == tok.eos_token_id == 1 and tok.padding_side == "right"
    assert clf.model.embed_tokens.padding_idx == 1  # set before the weights, as a rebuilt folder has it
    again, _ = load_model(str(folder), num_labels=N_LABELS, seed=3)
    other, _ = load_model(str(folder), num_labels=N_LABELS, seed=4)
    assert torch.equal(clf.score.weight, again.score.weight)
    assert not torch.equal(clf.score.weight, other.score.weight)
    torch.testing.assert_close(clf.model.layers[1].self_attn.k_proj.weight,
                               model.model.layers[1].self_attn.k_proj.weight)
    # right padding: each row's logits are those of the row alone (the last real token is pooled)
    enc = tok(["w3 w4 w5 w6 w7", "w8 w9"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1, -1] == 1 and enc["attention_mask"][1, -1] == 0
    with torch.no_grad():
        padded = clf(**enc).logits
        alone = clf(**tok(["w8 w9"], return_tensors="pt")).logits
    torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=0)
    # a tokenizer's own pad token comes first; a decoder without pad and eos is refused
    assert decoder_pad_token(model.config, tiny_tokenizer()) == 0
    bare = transformers.LlamaConfig(pad_token_id=None, eos_token_id=None)
    with pytest.raises(ModelLoadError, match="neither a pad nor an eos token"):
        decoder_pad_token(bare, None)


def test_gates_equal_surgery_on_the_classifier(one_thread):
    model = tiny_classifier(kv_heads=3)
    adapter = get_adapter(model)
    assert adapter.causal and adapter.layers(model) == list(model.model.layers)
    inputs = batch()
    g = torch.ones(LAYERS, HEADS)
    for layer, hs in MIXED.items():
        g[layer, hs] = 0
    with torch.no_grad():
        dense = model(**inputs).logits
        with head_gates(model, init=g):
            gated = model(**inputs).logits
        before = count_parameters(model)
        remove_heads(model, MIXED)
        pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, gated, atol=1e-5, rtol=0)
    assert not torch.allclose(pruned, dense, atol=1e-3)
    assert count_parameters(model) < before
    # layer 1 keeps both KV heads (uneven groups), layer 2 loses KV head 0 (its query heads 0, 1 gone)
    assert kept_kv_heads(model) == {0: [], 1: [0, 1, 2], 2: [1, 2]}
    sig = collect_signatures(model, [{**inputs, "labels": torch.tensor([0, 1])}], progress=False)
    assert len(sig.head_ids) == LAYERS * HEADS - sum(len(v) for v in MIXED.values())


def test_capture_on_the_classifier_is_causal_and_matches_eager_attention(one_thread):
    model = tiny_classifier(kv_heads=3, attn="eager")
    inputs = batch()
    att = captured(model, inputs)  # the adapter's rotary and causal mask, found in model.model
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions
    real = inputs["attention_mask"].bool()
    for layer in range(LAYERS):
        p = att.probs[layer]
        torch.testing.assert_close(p.permute(0, 2, 1, 3)[real], eager[layer].permute(0, 2, 1, 3)[real],
                                   atol=1e-5, rtol=0)
        assert torch.all(p.triu(1) == 0)


def test_run_prune_as_a_classifier_reports_accuracy_and_reloads(tiny_cls, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_cls, out)
    r = run_prune(cfg, ft, progress=False).report
    assert r["settings"]["prune"]["decoder_head"] == "classifier" and r["metric"] == "accuracy"
    assert r["heads_before"] == LAYERS * HEADS and 1 <= r["heads_kept"] < r["heads_before"]
    assert r["parameters"]["after"] < r["parameters"]["before"]
    after = r["scores"]["after_finetune"]["test"]
    assert 0 <= after["accuracy"] <= 1 and after["n"] == 40
    assert all(0 <= p["accuracy"] <= 1 for p in r["curve"])
    assert json.loads((out / "run.json").read_text())["kind"] == "classifier-decoder"
    # the saved folder reloads as the fine-tuned pruned classifier, with its pad token
    loaded, tok = load_model(str(out / "model"), num_labels=N_LABELS)
    assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.pad_token_id == 0
    assert tok.pad_token_id == 0
    task = build_task(cfg.task)
    again = evaluate_task(loaded, tok, task, max_length=16, seed=0, progress=False)["test"]
    assert again["accuracy"] == after["accuracy"] and again["macro_f1"] == pytest.approx(after["macro_f1"])
    hub = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model", trust_remote_code=True).eval()
    enc = tok(["w3 w4 w5 w6", "w8 w9"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hub(**enc).logits, loaded(**enc).logits, atol=1e-6, rtol=0)
    with pytest.raises(ModelLoadError, match="kind='classifier'"):
        load_model(str(out / "model"), kind="causal-lm")
    # the command: the same run, read from the cache
    argv = ["prune", "--model", cfg.model, "--task", cfg.task, "--output-dir", str(out), "--decoder-head",
            "classifier", "--calibration-examples", "40", "--curve-examples", "30", "--stats-batch-size", "16",
            "--grid-step", "2", "--epochs", "2", "--lr", "2e-3", "--batch-size", "16", "--max-length", "16"]
    assert main(argv) == 0
    assert f"kept {r['heads_kept']} of {r['heads_before']} heads" in capsys.readouterr().out
    # without the option the pruned classifier folder is refused, as is the option on an encoder's run
    lm_cfg = PruneConfig(model=str(out / "model"), task=cfg.task, output_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="--decoder-head classifier"):
        run_prune(lm_cfg, ft, progress=False)
    assert not (tmp_path / "bad").exists()


def test_decoder_head_is_refused_where_it_does_not_apply(tiny_cls, tmp_path, monkeypatch):
    monkeypatch.setattr("cahp.pipelines.decoder.is_causal", lambda name: False)  # the model as an encoder
    cfg, ft = _cfgs(tiny_cls, tmp_path / "bad")
    with pytest.raises(ValueError, match="applies to decoders"):
        run_prune(cfg, ft, progress=False)
    monkeypatch.undo()
    cfg, ft = _cfgs(tiny_cls, tmp_path / "bad", ffn=True)
    with pytest.raises(ValueError, match="--ffn cannot go with --decoder-head classifier"):
        run_prune(cfg, ft, progress=False)
    assert not (tmp_path / "bad").exists()


def test_run_compare_as_a_classifier(tiny_cls, tmp_path, one_thread):
    cfg, ft = _cfgs(tiny_cls, tmp_path / "cmp")
    ccfg = CompareConfig(methods=["cahp", "random"], budgets=[0.5], seeds=1, n_bootstrap=200)
    r = run_compare(cfg, ft, ccfg, progress=False).report
    assert r["heads"] == LAYERS * HEADS and not r["partial"]
    for label in [b["label"] for b in r["budgets"]]:
        res = r["finetuned"]["results"][label]
        assert set(res) == {"cahp", "random"}
        assert all(0 <= res[m]["accuracy"] <= 1 for m in res)
        assert res["random"]["vs_cahp"]["pooled"]["verdict"] in ("win", "tie", "loss")
        assert res["cahp"]["parameters"] < r["finetuned"]["dense_control"]["parameters"]
    assert (tmp_path / "cmp" / "compare.md").is_file()
