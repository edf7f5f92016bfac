"""benchmarks/bench_embedding.py (issue 22): the text union, the run end to end on a tiny model, its goal lines."""

from __future__ import annotations

import json
import re

import pytest
from benchmarks import bench_embedding, make_results

from cahp.data.folder import resolve_data_dir
from cahp.data.text import read_text_file
from cahp.pipelines.embedding_eval import THROUGHPUT

from .test_embedding import _jsonl, lively_sentence_folder, task_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def quick_throughput(monkeypatch):
    """Throughput on a few sentences: the test checks its bookkeeping, not the speed."""
    monkeypatch.setitem(THROUGHPUT, "sentences", {32: 16, 1: 3})


def _texts_folder(folder, texts, pairs=None):
    """A user task of single texts (or sentence pairs with float scores) in train/dev/test .jsonl."""
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        rows = ([{"text": t, "label": i % 2} for i, t in enumerate(texts)] if pairs is None
                else [{"text": a, "text_pair": b, "label": 1.0 + i} for i, (a, b) in enumerate(pairs[split])])
        _jsonl(folder / f"{split}.jsonl", rows)
    return str(folder)


def test_text_union_is_deduplicated_ordered_and_free_of_similarity_sentences(tmp_path):
    a = _texts_folder(tmp_path / "a", ["w1 w2", "w3 w4", "w1 w2", "shared one", "  w5  "])
    b = _texts_folder(tmp_path / "b", ["w3 w4", "Shared  ONE", "w6", "w7 w8"])
    sim = _texts_folder(tmp_path / "sim", [], pairs={"train": [("w7 w8", "x1"), ("x5", "x6")], "dev": [("x2", "x3")],
                                                     "test": [("x4", "shared one")]})
    texts, info = bench_embedding.text_union([a, b], sim)
    # first-seen order over the tasks in order; "shared one" (test side) and "w7 w8" (train) are STS sentences,
    # "Shared  ONE" is the same sentence after case folding and whitespace normalisation
    assert texts == ["w1 w2", "w3 w4", "w5", "w6"]
    assert info["union"] == 7 and info["excluded_similarity_sentences"] == 3 and info["texts"] == 4
    assert info["similarity_sentences"] == 8 and list(info["sources"].values()) == [4, 4]
    again, _ = bench_embedding.text_union([a, b], sim)
    assert again == texts
    path = bench_embedding.write_texts(texts, tmp_path / "run")
    assert re.fullmatch(r"texts-[0-9a-f]{16}\.jsonl", path.name)
    assert read_text_file(path) == texts and bench_embedding.write_texts(again, tmp_path / "run") == path
    assert bench_embedding.write_texts(texts[::-1], tmp_path / "run") != path  # order is part of the content
    assert [p.name for p in (tmp_path / "run").iterdir()].count(path.name) == 1


@pytest.mark.skipif(resolve_data_dir() is None or not (resolve_data_dir() / "glue" / "STS-B").is_dir(),
                    reason="needs ../shared/data (SST-5, MNLI, STS-B)")
def test_the_real_text_union_holds_no_stsb_sentence():
    from cahp.data.tasks import get_task

    texts, info = bench_embedding.text_union(("sst5", "mnli-small"), "stsb")
    stsb = get_task("stsb")
    banned = {bench_embedding._norm(s) for split in stsb.splits for ex in stsb.load(split)
              for s in (ex.text, ex.text_pair)}
    assert not any(bench_embedding._norm(t) in banned for t in texts)
    assert len(set(texts)) == len(texts) == info["texts"] > 8000  # SST-5's 8,544 training sentences and more
    assert info["sources"]["sst5"] == len({ex.text for ex in get_task("sst5").load("train")})  # 10 repeats


def test_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    folder = lively_sentence_folder(tmp_path / "st")
    tasks = (str(task_folder(tmp_path / "t1")), str(task_folder(tmp_path / "t2", seed=2)))
    sim = str(task_folder(tmp_path / "sim", pairs=True, seed=1))
    monkeypatch.setitem(bench_embedding.CONFIGS, "tiny", (str(folder), tasks, sim))
    args = bench_embedding.build_parser().parse_args(
        ["tiny", "--methods", "cahp", "random", "fisher", "--budgets", "0.5", "--seeds", "2", "--n-bootstrap", "200",
         "--epochs", "1", "--lr", "2e-3", "--batch-size", "16", "--max-length", "16", "--max-train-examples", "40",
         "--calibration-examples", "32", "--curve-examples", "24", "--stats-batch-size", "16",
         "--throughput-seconds", "0.01", "--throughput-threads", "1", "--output-dir", str(tmp_path / "run"),
         "--result-name", str(tmp_path / "result"), "--quiet"])
    path = bench_embedding.run("tiny", args)
    assert path == tmp_path / "result.json"
    r = json.loads(path.read_text())
    assert r["configuration"] == "tiny" and r["meta"]["git_revision"]
    assert r["texts"] == r["texts_union"]["file"] and r["texts_union"]["file"].startswith(str(tmp_path / "run"))
    assert r["bench_settings"]["distillation"]["max_train_examples"] == 40
    assert r["settings"]["seeds"] == [0, 1] and r["settings"]["methods_run"] == ["cahp", "random", "fisher"]
    # throughput: dense against CAHP's selection at each budget, at the options' one thread
    speed = r["throughput"]
    assert list(speed["measurements"]) == ["t1_b32", "t1_b1"] and list(speed["models"]) == ["dense", "k*", "50%"]
    assert speed["models"]["50%"]["heads"] == 6 and speed["models"]["dense"]["heads"] == 12

    lines = bench_embedding.goal_lines(r)
    assert lines[0].startswith(f"{folder}: CAHP's knee k* = {r['k_star']} of 12 heads")
    fine, dense = r["finetuned"]["results"], r["dense"]
    for b in r["budgets"]:
        label = b["label"]
        dv = dense["vs_cahp"][label]["pooled"]
        want = (f"{label} ({b['k']} of 12 heads), after distillation: test Spearman dense "
                f"{dense['spearman'] * 100:.2f}, CAHP {fine[label]['cahp']['spearman'] * 100:.2f}; dense - CAHP "
                f"{dv['diff'] * 100:+.2f} [{dv['ci95'][0] * 100:+.2f}, {dv['ci95'][1] * 100:+.2f}] points, ")
        line = next(x for x in lines if x.startswith(want))
        assert ("within the 1.0-point bound" in line) == (dv["diff"] * 100 <= 1.0)
        head = speed["measurements"]["t1_b32"]
        ratio, (lo, hi) = head["speedup"][label], head["speedup_ci95"][label]
        assert lo <= ratio <= hi
        verdict = "met" if lo >= 1.5 else "not met" if hi < 1.5 else "undecided"
        speed_line = lines[lines.index(line) + 1]
        assert speed_line.startswith("  measured throughput at 1 thread, batch 32: ")
        assert f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}] (median" in speed_line
        assert f"the 1.5x goal is {verdict} (" in speed_line
        verdicts = [fine[label][m]["vs_cahp"]["pooled"]["verdict"] for m in ("random", "fisher")]
        counts = [verdicts.count(v) for v in ("win", "tie", "loss")]
        assert (f"{label} ({b['k']} of 12 heads), after distillation: CAHP wins {counts[0]}, ties {counts[1]}, "
                f"loses {counts[2]} against the 2 baselines") in lines
        per = fine[label]["random"]["vs_cahp"]["per_seed_verdicts"]
        assert any(x.startswith(f"  random: {verdicts[0]}, random - CAHP ") and x.endswith(
            f"per seed win / tie / loss {per['win']} / {per['tie']} / {per['loss']}") for x in lines)

    text = bench_embedding.render(r)
    assert "### k*:" in text and "### 50%: 6 of 12 heads" in text and "### Measured throughput" in text
    b32 = speed["measurements"]["t1_b32"]
    assert f"{b32['50%']['sentences_per_s']:.1f} ({b32['speedup']['50%']:.2f}x [{b32['speedup_ci95']['50%'][0]:.2f}, " \
        in text
    assert "| CAHP 50% | 6 |" in text and "- distillation texts: the training sentences of " in text
    assert f"{r['texts_union']['texts']:,} used ({r['data']['train_texts']:,} distilled on" in text
    assert all(f"- {line.strip()}" in text for line in lines)

    # a re-run reads every result from the run folder's caches, the throughput too
    again = json.loads(bench_embedding.run("tiny", args).read_text())
    assert again["timings"]["results_computed"] == 0 and again["throughput"] == speed
    # without timing, no throughput: the goal lines say nothing of speed
    args.throughput_seconds = 0
    quiet = json.loads(bench_embedding.run("tiny", args).read_text())
    assert quiet["throughput"] is None and not any("throughput" in x for x in bench_embedding.goal_lines(quiet))
    assert "Measured throughput" not in bench_embedding.render(quiet)


def test_results_sections_name_both_configurations():
    sections = {s: (m, t) for s, m, t in make_results.SECTIONS}
    for name in bench_embedding.CONFIGS:
        module, title = sections[f"embedding_{name}"]
        assert module == "bench_embedding" and title.endswith("(issue 22)")


@pytest.mark.parametrize("ci, verdict, why", [
    ([1.52, 1.8], "met", "the interval's low end is at or above it"),
    ([1.3, 1.45], "not met", "the interval's high end is below it"),
    ([1.45, 1.7], "undecided", "the interval straddles it"),
    ([None, None], "undecided", "no interval"),
])
def test_speed_goal_is_read_from_the_interval(ci, verdict, why):
    # the point estimate is above the goal in every case: only the interval decides
    entry = {"reps": 7, "dense": {"sentences_per_s": 100.0}, "50%": {"sentences_per_s": 160.0},
             "speedup": {"50%": 1.6}, "speedup_ci95": {"50%": ci}}
    speed = {"machine": "m", "models": {"dense": {"heads": 12, "parameters": 100}, "50%": {"heads": 6,
                                                                                         "parameters": 80}},
             "measurements": {"t1_b1": {**entry, "speedup": {"50%": 1.1}, "speedup_ci95": {"50%": [1.0, 1.2]}},
                              "t1_b32": entry}}
    line = bench_embedding._speed_line(speed, "50%")
    shown = "1.60x [no interval]" if ci[0] is None else f"1.60x [{ci[0]:.2f}, {ci[1]:.2f}]"
    assert line == (f"measured throughput at 1 thread, batch 32: 160.0 against 100.0 sentences/s, {shown} (median "
                    f"of per-repetition ratios over 7 repetitions, 95% bootstrap interval): the 1.5x goal is "
                    f"{verdict} ({why}); 1 thread, batch 1 1.10x [1.00, 1.20]")
    table = bench_embedding._speed_table(speed)
    assert f"| CAHP 50% | 6 | 80 | 160.0 (1.10x [1.00, 1.20]) | 160.0 ({shown}) |" in table


def _joint_args(folder_root, *extra):
    return bench_embedding.build_parser().parse_args(
        ["tiny_ffn", "--epochs", "2", "--lr", "2e-3", "--batch-size", "16", "--max-length", "16",
         "--max-train-examples", "40", "--calibration-examples", "32", "--curve-examples", "24",
         "--stats-batch-size", "16", "--throughput-seconds", "0.01", "--throughput-threads", "1",
         "--cost-source", "macs", "--cost-shapes", "1x12,4x16", "--grid-points", "6", "--min-share", "0.3",
         "--speedup-budget", "0.05", "--output-dir", str(folder_root / "run"),
         "--result-name", str(folder_root / "result"), "--quiet", *extra])


def test_joint_configuration_runs_the_automatic_ffn_prune_end_to_end(tmp_path, monkeypatch):
    folder = lively_sentence_folder(tmp_path / "st")
    tasks = (str(task_folder(tmp_path / "t1")), str(task_folder(tmp_path / "t2", seed=2)))
    sim = str(task_folder(tmp_path / "sim", pairs=True, seed=1))
    monkeypatch.setitem(bench_embedding.CONFIGS, "tiny_ffn", (str(folder), tasks, sim))
    assert bench_embedding.is_joint("tiny_ffn") and not bench_embedding.is_joint("tiny")
    throughput_before = dict(THROUGHPUT)
    path = bench_embedding.run("tiny_ffn", _joint_args(tmp_path))
    assert path == tmp_path / "result.json" and throughput_before == THROUGHPUT  # the options' timing, this run only
    r = json.loads(path.read_text())
    # the prune report of `cahp prune --objective embedding --ffn` at the knee, with the bench's provenance
    assert r["configuration"] == "tiny_ffn" and r["meta"]["git_revision"] and r["ffn"]
    assert r["objective"] == "embedding" and r["k_source"] == "knee" and r["target_speedup"] is None
    assert r["texts_union"]["file"].startswith(str(tmp_path / "run")) and r["texts"] == r["texts_union"]["file"]
    assert r["bench_settings"]["joint"]["cost_shapes"] == "1x12,4x16" and r["settings"]["prune"]["ffn"]
    assert r["bench_settings"]["distillation"]["max_train_examples"] == 40
    assert r["heads_kept"] <= 12 and r["neurons_kept"] < 3 * 64
    assert r["parameters"]["after"] < r["parameters"]["before"]
    assert list(r["throughput"]) == ["t1_b32", "t1_b1"]  # --throughput-threads 1 reached the pipeline
    assert set(r["measured_speedup"]) == {"1x12", "4x16"}

    g = r["goals"]
    assert g["scores_from"] == "after_distillation" and g["headline"] == "t1_b32"
    sc, vd = r["scores"], r["versus_dense"]["after_distillation"]["spearman"]
    dense, pruned = sc["dense"]["similarity_test"]["spearman"], sc["after_distillation"]["similarity_test"]["spearman"]
    sp = g["spearman"]
    assert sp["dense_minus_pruned_points"] == pytest.approx((dense - pruned) * 100)
    lo, hi = -vd["ci95"][1] * 100, -vd["ci95"][0] * 100  # pruned - dense, negated
    assert sp["ci95_points"] == pytest.approx([lo, hi]) and sp["basis"] == "interval"
    assert sp["verdict"] == ("met" if hi <= 1.0 else "not met" if lo > 1.0 else "undecided")
    for combo, entry in r["throughput"].items():
        t = g["throughput"][combo]
        ci = entry["speedup_ci95"]["pruned"]
        assert t["speedup"] == entry["speedup"]["pruned"] and t["ci95"] == ci
        assert t["verdict"] == ("met" if ci[0] >= 2.0 else "not met" if ci[1] < 2.0 else "undecided")
    for shape, m in r["measured_speedup"].items():
        lat = g["latency"][shape]
        assert lat["speedup"] == m["speedup"] and lat["ci95"] == m["ci95"] and lat["reps"] == m["reps"]
        assert lat["verdict"] == ("met" if m["ci95"][0] >= 2.0 else "not met" if m["ci95"][1] < 2.0 else "undecided")

    lines = bench_embedding.joint_goal_lines(r)
    assert lines[0].startswith(f"{folder} (heads + FFN neurons, knee on similarity_dev_spearman): kept "
                               f"{r['heads_kept']} of 12 heads and {r['neurons_kept']:,} of 192 FFN neurons")
    want = (f"{r['similarity_task']} test ({r['data']['similarity_test_pairs']} pairs), zero-shot, after "
            f"distillation: Spearman dense {dense * 100:.2f}, pruned {pruned * 100:.2f}; dense - pruned "
            f"{(dense - pruned) * 100:+.2f} [{lo:+.2f}, {hi:+.2f}] points (paired bootstrap over the test pairs): "
            f"the 1.0-point goal is {sp['verdict']} (")
    assert any(x.startswith(want) for x in lines), lines
    head = g["throughput"]["t1_b32"]
    speed_line = next(x for x in lines if x.startswith("measured throughput at 1 thread, batch 32: "))
    assert f"{head['speedup']:.2f}x [{head['ci95'][0]:.2f}, {head['ci95'][1]:.2f}]" in speed_line
    assert f"the 2x goal is {head['verdict']} (" in speed_line and "1 thread, batch 1 " in speed_line
    assert any(x.startswith("measured latency speedup") and "1x12 " in x and "4x16 " in x for x in lines)

    text = bench_embedding.render(r)  # a joint file renders as a joint run
    assert all(f"- {line}" in text for line in lines)
    assert "### Scores" in text and "### Kept per layer" in text and "### Measured latency" in text
    assert "| pruned, distilled |" in text and "### Measured throughput" in text and "### k*:" not in text
    assert f"{r['texts_union']['texts']:,} used ({r['data']['train_texts']:,} distilled on" in text

    # --target-speedup in the same folder: the statistics are reused, the selection is the target's
    again = json.loads(bench_embedding.run("tiny_ffn", _joint_args(tmp_path, "--target-speedup", "1.5")).read_text())
    assert again["k_source"] == "--target-speedup" and again["target_speedup"] == 1.5
    assert again["stage_seconds"]["neuron_stats"]["cached"] and again["stage_seconds"]["salience"]["cached"]
    assert again["estimated_share"] <= 1 / 1.5 + 1e-9  # the mean estimated share over the cost shapes


def test_joint_configuration_refuses_bad_options_before_work(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_embedding.CONFIGS, "tiny_ffn", ("unused", ("unused",), "unused"))
    for extra, match in ((["--throughput-seconds", "0"], "throughput-seconds must be > 0"),
                         (["--target-speedup", "0.8"], "target-speedup must be above 1")):
        args = _joint_args(tmp_path, *extra)
        with pytest.raises(ValueError, match=match):
            bench_embedding.run("tiny_ffn", args)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ci, verdict", [([-0.4, -0.1], "met"), ([-1.5, -1.2], "not met"), ([-1.3, 0.2], "undecided"),
                                         (None, "met")])
def test_joint_spearman_goal_is_read_from_the_paired_interval(ci, verdict):
    # pruned - dense Spearman is -0.008 (0.8 points below dense, within the bound by the point) in every case
    versus = None if ci is None else {"after_distillation": {"spearman": {"diff": -0.008,
                                                                          "ci95": [x / 100 for x in ci]}}}
    report = {"scores": {"dense": {"similarity_test": {"spearman": 0.85}},
                         "after_distillation": {"similarity_test": {"spearman": 0.842}}},
              "versus_dense": versus, "throughput": {}, "measured_speedup": None}
    g = bench_embedding.joint_goals(report)["spearman"]
    assert g["verdict"] == verdict and g["dense_minus_pruned_points"] == pytest.approx(0.8)
    assert g["basis"] == ("point" if ci is None else "interval")
    if ci is not None:
        assert g["ci95_points"] == pytest.approx([-ci[1], -ci[0]])
