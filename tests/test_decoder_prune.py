"""CAHP on grouped-query decoders: KV-group selection, perplexity through gates, the decoder prune pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import cahp
from cahp.budget.perplexity import kv_curve, lm_loss, perplexity
from cahp.cli import main
from cahp.data.lm import lm_batches, lm_texts
from cahp.model.heads import kept_kv_heads, kv_cache_bytes_per_token
from cahp.model.surgery import keep_heads, remove_heads
from cahp.pipelines.guard import build_task
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.selectors.base import HeadStats, SelectionContext
from cahp.selectors.gqa import (
    GQA_SELECTORS,
    KVBudgetError,
    check_kv_mask,
    gqa_stats,
    group_distances,
    group_magnitudes,
)
from cahp.selectors.registry import make_selector
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import collect_signatures
from cahp.train.finetune import FinetuneConfig

from .test_decoder import HEADS, LAYERS, VOCAB, tiny_decoder

WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` ([PAD] = 0, [UNK] = 1), whitespace-split."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


def sentences(n: int, seed: int) -> list[str]:
    """``n`` random sentences of 4..11 words with a little structure (each word tends to follow the last)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = int(rng.integers(0, len(WORDS)))
        words = []
        for _ in range(int(rng.integers(4, 12))):
            words.append(WORDS[w])
            w = (w + int(rng.integers(1, 4))) % len(WORDS)
        out.append(" ".join(words))
    return out


def write_decoder_folder(root, sizes: tuple[int, int, int], seed: int, label=None):
    """``root`` with model/ (a tiny Llama, 3 KV heads per layer, and its tokenizer) and task/ (train, dev and
    test jsonl of ``sizes`` `sentences`, split i drawn with seed ``seed + i``); ``label(j, text)`` gives row j's
    label (default: alternating 0 / 1). Returns ``root``."""
    label = label or (lambda j, _text: j % 2)
    tiny_decoder(kv_heads=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "task").mkdir()
    for i, (split, n) in enumerate(zip(("train", "dev", "test"), sizes)):
        rows = [json.dumps({"text": t, "label": label(j, t)}) for j, t in enumerate(sentences(n, seed=seed + i))]
        (root / "task" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(root with model/ (a tiny Llama with 3 KV heads per layer and its tokenizer) and task/ (jsonl splits))."""
    return write_decoder_folder(tmp_path_factory.mktemp("decoder"), (120, 40, 20), seed=0)


@pytest.fixture(scope="module")
def stats_setup():
    """A tiny decoder (3 KV heads per layer, groups of 2), calibration batches and its `GQAStats`."""
    model = tiny_decoder(kv_heads=3)
    batches = lm_batches(tiny_tokenizer(), sentences(24, seed=5), max_length=16, batch_size=8)
    sig = collect_signatures(model, batches, progress=False)
    sal = gate_gradients(model, batches, progress=False, loss_fn=lm_loss)
    stats = gqa_stats(HeadStats(head_ids=sig.head_ids, shape=(LAYERS, HEADS), distances=sig.distances,
                                salience=sal["salience"], fisher=sal["fisher"], entropy=sig.entropy), model)
    return model, batches, stats


@pytest.mark.parametrize("name", list(GQA_SELECTORS))
def test_kv_selectors_keep_whole_groups_and_exactly_k(stats_setup, name):
    model, batches, stats = stats_setup
    ctx = SelectionContext(model=model, batches=batches)
    assert stats.n_kv == LAYERS * 3
    for k in range(1, stats.n_kv + 1):
        mask = make_selector(name, seed=1).select(k, stats, ctx)
        check_kv_mask(mask, k, stats)
        assert int(mask.sum()) == 2 * k  # two query heads per group
        assert torch.equal(mask, make_selector(name, seed=1).select(k, stats, ctx))
        kv = kept_kv_heads(keep_heads(tiny_decoder(kv_heads=3), mask))
        assert sum(len(v) for v in kv.values()) == k
    for bad in (0, stats.n_kv + 1):
        with pytest.raises(KVBudgetError, match="cannot keep"):
            make_selector(name).select(bad, stats, ctx)


def test_a_split_group_or_a_wrong_count_is_refused(stats_setup):
    _, _, stats = stats_setup
    mask = stats.mask_of_groups([0, 4])
    check_kv_mask(mask, 2, stats)
    with pytest.raises(KVBudgetError, match="keeps 2 KV heads, not 3"):
        check_kv_mask(mask, 3, stats)
    mask[0, 1] = False  # query head 1 goes, query head 0 of its group stays
    with pytest.raises(KVBudgetError, match="splits KV group 0 of layer 0"):
        check_kv_mask(mask, 2, stats)


def test_group_distance_is_the_mean_over_query_head_pairs(stats_setup):
    _, _, stats = stats_setup
    D = stats.distances["js"].double()
    G = group_distances(stats, "js")
    assert G.shape == (9, 9) and np.allclose(G, G.T) and np.all(np.diag(G) == 0)
    a, b = stats.groups[1][2], stats.groups[7][2]  # layer 0 KV 1, layer 2 KV 1
    assert G[1, 7] == pytest.approx(float(D[a][:, b].mean()), rel=1e-9)


def test_gradient_and_fisher_rank_groups_by_summed_scores(stats_setup):
    model, batches, stats = stats_setup
    sums = stats.group_sum(stats.salience)
    best = int(np.argmax(sums))
    assert torch.equal(make_selector("gqa-gradient").select(1, stats), stats.mask_of_groups([best]))
    fisher_best = int(np.argmax(stats.group_sum(stats.fisher)))
    assert torch.equal(make_selector("gqa-fisher").select(1, stats), stats.mask_of_groups([fisher_best]))
    # CAHP with k = 1 (greedy allocation, the default): the layer of the most salient group keeps one group, that one
    assert torch.equal(make_selector("gqa-cahp").select(1, stats), stats.mask_of_groups([best]))


def test_perplexity_through_gates_equals_after_surgery_and_the_lm_loss(stats_setup):
    model, batches, stats = stats_setup
    mask = make_selector("gqa-cahp").select(4, stats)
    gated = perplexity(model, batches, mask)
    pruned = perplexity(keep_heads(tiny_decoder(kv_heads=3), mask), batches)
    assert gated["tokens"] == pruned["tokens"] > 0
    assert gated["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-5)
    dense = perplexity(model, batches)
    assert dense["perplexity"] != pytest.approx(gated["perplexity"], rel=1e-3)
    # right padding: transformers' own shifted loss over the same tokens
    total = count = 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            total += float(loss) * n
            count += n
    assert dense["nll"] == pytest.approx(total / count, rel=1e-5)
    points = kv_curve(model, make_selector("gqa-random"), stats, [9, 4], batches, progress=False)["points"]
    assert [p["k"] for p in points] == [9, 4] and points[0]["perplexity"] == pytest.approx(dense["perplexity"])
    assert points[1]["score"] == pytest.approx(-np.log(points[1]["perplexity"]))


def test_lm_text_keeps_splits_apart_and_never_reads_test(tiny_run, monkeypatch):
    task = build_task(str(tiny_run / "task"))
    load = task.load

    def no_test(split):
        assert split != task.test_split, "the test split was read"
        return load(split)

    monkeypatch.setattr(task, "load", no_test)
    calib, held = lm_texts(task, 50, 30, seed=0)
    assert len(calib) == 50 and len(held) == 30 and not set(calib) & set(held)
    assert set(calib) <= {e.text for e in load("train")} and set(held) <= {e.text for e in load("dev")}
    assert lm_texts(task, 50, 30, seed=0) == (calib, held)


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      calibration_examples=60, curve_examples=30, stats_batch_size=16, grid_step=1, **kw)
    return cfg, FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, max_length=16, seed=0)


def test_decoder_pipeline_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_run, out)
    r = run_prune(cfg, ft, progress=False).report
    for name in ("report.json", "curve.png", "heads.png", "run.json", "log.txt"):
        assert (out / name).is_file(), name
    assert r["kind"] == "causal-lm" and r["budget_unit"] == "kv_heads" and r["kv_heads_before"] == 9
    assert [p["k"] for p in r["curve"]] == list(range(9, 0, -1))
    k = r["kv_heads_kept"]
    assert r["k_source"] == "knee" and k == r["k_star"] and r["heads_kept"] == 2 * k
    assert sum(r["kv_heads_per_layer"]) == k and sum(r["heads_per_layer"]) == 2 * k
    kv = r["kv_cache_bytes_per_token"]
    assert kv["dense"] == 9 * 8 * 2 * 4 and kv["pruned"] * 9 == kv["dense"] * k
    ppl = r["perplexity"]
    assert ppl["after_pruning"] == pytest.approx(ppl["after_pruning_gated"], rel=1e-5)
    assert all(ppl[s] > 1 for s in ("before_pruning", "after_pruning", "after_finetune"))
    assert r["parameters"]["after"] < r["parameters"]["before"]
    assert json.loads((out / "report.json").read_text())["kept_kv_heads"] == {str(a): b for a, b in
                                                                              r["kept_kv_heads"].items()}
    # the saved folder reloads as the fine-tuned pruned model
    loaded, tok = cahp.load_pruned(out / "model")
    assert {int(a): b for a, b in kept_kv_heads(loaded).items()} == {int(a): b for a, b in r["kept_kv_heads"].items()}
    assert kv_cache_bytes_per_token(loaded) == kv["pruned"]
    task = build_task(str(tiny_run / "task"))
    _, held = lm_texts(task, 60, 30, seed=0)
    again = perplexity(loaded, lm_batches(tok, held, 16, 16))
    assert again["perplexity"] == pytest.approx(ppl["after_finetune"], rel=1e-5)
    # a cached re-run computes nothing; another --keep (KV heads) reuses statistics and curve
    r2 = run_prune(cfg, ft, progress=False).report
    assert all(s["cached"] for s in r2["stage_seconds"].values()), r2["stage_seconds"]
    assert r2["perplexity"] == ppl
    argv = ["prune", "--model", cfg.model, "--task", cfg.task, "--output-dir", str(out), "--calibration-examples",
            "60", "--curve-examples", "30", "--stats-batch-size", "16", "--grid-step", "1", "--epochs", "1",
            "--lr", "1e-3", "--batch-size", "16", "--max-length", "16"]
    assert main(argv) == 0  # the command prints the decoder's summary from the cached stages
    printed = capsys.readouterr().out
    assert f"kept {k} of 9 KV heads" in printed and "bytes per token" in printed and "held-out perplexity" in printed
    cfg3, _ = _cfgs(tiny_run, out, keep=3, skip_final_finetune=True, overwrite=True)
    r3 = run_prune(cfg3, ft, progress=False).report
    assert r3["kv_heads_kept"] == 3 and r3["k_source"] == "--keep" and r3["perplexity"]["after_finetune"] is None
    assert {s for s, v in r3["stage_seconds"].items() if not v["cached"]} == {"surgery_and_finetune"}


def test_decoder_keep_counts_kv_heads_and_encoder_options_are_refused(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("cahp.pipelines.decoder.collect_signatures", None)  # refused before any pass over data
    cfg, ft = _cfgs(tiny_run, tmp_path / "bad", keep=10, skip_final_finetune=True)
    with pytest.raises(KVBudgetError, match="cannot keep 10 KV heads: the model has 9"):
        run_prune(cfg, ft, progress=False)
    cfg, ft = _cfgs(tiny_run, tmp_path / "bad", ffn=True)
    with pytest.raises(ValueError, match="--ffn applies to encoders"):
        run_prune(cfg, ft, progress=False)
    cfg, ft = _cfgs(tiny_run, tmp_path / "bad", keep=2, keep_ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        run_prune(cfg, ft, progress=False)
    cfg, ft = _cfgs(tiny_run, tmp_path / "bad")
    with pytest.raises(ValueError, match="epochs"):
        run_prune(cfg, FinetuneConfig(epochs=0), progress=False)
    assert not (tmp_path / "bad").exists()  # nothing made: no folder left behind


def test_remove_heads_of_one_group_shrinks_the_cache_by_one_kv_head():
    model = tiny_decoder(kv_heads=3)
    dense = kv_cache_bytes_per_token(model)
    remove_heads(model, {1: [2, 3]})  # the whole KV group 1 of layer 1
    assert kv_cache_bytes_per_token(model) * 9 == dense * 8


def test_kv_selectors_on_an_already_pruned_decoder_with_uneven_groups():
    model = remove_heads(tiny_decoder(kv_heads=3), {0: [0, 1], 1: [3], 2: [0, 2, 5]})  # uneven groups, one gone
    batches = lm_batches(tiny_tokenizer(), sentences(16, seed=6), max_length=16, batch_size=8)
    sig = collect_signatures(model, batches, progress=False)
    sal = gate_gradients(model, batches, progress=False, loss_fn=lm_loss)
    stats = gqa_stats(HeadStats(head_ids=sig.head_ids, shape=(LAYERS, HEADS), distances=sig.distances,
                                salience=sal["salience"], fisher=sal["fisher"], entropy=sig.entropy), model)
    assert stats.n_kv == 8 and [len(m) for _, _, m in stats.groups] == [2, 2, 2, 1, 2, 1, 1, 1]
    ctx = SelectionContext(model=model, batches=batches)
    for name in GQA_SELECTORS:
        for k in (1, 4, 8):
            check_kv_mask(make_selector(name).select(k, stats, ctx), k, stats)
    # magnitude of layer 1's group 1 (query head 2 alone, KV head 1): q rows and o columns at position 2
    a, d = model.model.layers[1].self_attn, 8
    manual = (a.q_proj.weight[2 * d:3 * d].square().sum() + a.o_proj.weight[:, 2 * d:3 * d].square().sum()
              + a.k_proj.weight[d:2 * d].square().sum() + a.v_proj.weight[d:2 * d].square().sum()).sqrt().detach()
    assert group_magnitudes(model, stats)[3] == pytest.approx(float(manual), rel=1e-6)
