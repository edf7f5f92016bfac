"""Latency benchmark: multiply-adds, the floor-relative figure, the attention-free floor, kernels."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import cahp
from cahp.arch import ResidualOnlyAttention, get_adapter
from cahp.arch.base import ATTENTION_KERNELS, project_out_residual
from cahp.bench import BenchConfig, BenchError, bench_models, head_count_sweep, run_bench
from cahp.bench.config import parse_shapes
from cahp.bench.macs import count_macs
from cahp.bench.report import format_table
from cahp.bench.variants import (
    emptied_layers_removal,
    no_attention_model,
    prepare_for_inference,
    random_removal,
    uniform_removal,
)
from cahp.cli import main as cli_main
from cahp.model.heads import HeadIndexError

from .tiny import FAMILIES, HEAD_DIM, N_HEADS, N_LAYERS, tiny_batch, tiny_model

PATTERN = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # heads left per layer: 3, 0, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def with_random_biases(model, seed=0):
    """HF init zeroes biases; real checkpoints do not (an empty layer keeps its output bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


# --- multiply-adds -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_count_macs_hand_count(family):
    model = cahp.remove_heads(tiny_model(family), PATTERN)
    batch, seq = 2, 10
    n, hidden, ffn, d = batch * seq, N_HEADS * HEAD_DIM, 64, HEAD_DIM
    heads = [3, 0, 2]
    # per head: q, k, v, o projections (4 N hidden d) + q k^T and probs v (2 batch seq^2 d)
    per_head = 4 * n * hidden * d + 2 * batch * seq * seq * d
    layers = sum(h * per_head for h in heads) + N_LAYERS * 2 * n * hidden * ffn
    # every tiny family's head: hidden x hidden then hidden x 3 labels, on one token per sequence
    head = batch * (hidden * hidden + hidden * 3)
    macs = count_macs(model, batch, seq)
    assert [x["heads"] for x in macs["layers"]] == heads
    assert macs["total"] == layers + head == 366400
    assert macs["attention"] == 5 * per_head
    assert macs["head"] == head and macs["embeddings"] == 0
    dense = count_macs(tiny_model(family), batch, seq)
    assert dense["total"] - macs["total"] == 7 * per_head


# --- selections and the attention-free floor ----------------------------------


def test_random_removal_is_seeded_uneven_and_exact():
    model = tiny_model("bert")
    a = random_removal(model, 0.5, seed=3)
    assert a == random_removal(model, 0.5, seed=3)
    assert sum(len(v) for v in a.values()) == N_LAYERS * N_HEADS // 2
    assert a != random_removal(model, 0.5, seed=4)
    cahp.remove_heads(model, a)  # valid selection
    # on a pruned model it draws among the heads still there
    b = random_removal(model, 0.5, seed=0)
    kept = cahp.kept_heads(model)
    assert all(h in kept[layer] for layer, hs in b.items() for h in hs)


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, "a", None, 0.01])
def test_random_removal_bad_ratio(ratio):
    with pytest.raises(BenchError, match="ratio"):
        random_removal(tiny_model("bert"), ratio)


def test_emptied_layers_removal():
    plan = emptied_layers_removal(tiny_model("bert"), every=2)
    assert plan == {1: list(range(N_HEADS))}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_attention_model_has_no_attention(family):
    model = tiny_model(family)
    floor = no_attention_model(model)
    adapter = get_adapter(floor)
    for layer in adapter.layers(floor):
        assert isinstance(layer.attention, ResidualOnlyAttention)
        assert adapter.heads(layer) == type(adapter.heads(layer))(None, None, None, None, None)
        weights = [n for n, p in layer.attention.named_parameters() if p.dim() > 1]
        assert weights == []  # only the output bias (and LayerNorm) remain
    assert count_macs(floor, 2, 10)["attention"] == 0
    assert cahp.num_kept(floor) == 0
    # the source model is untouched and the public refusal still holds
    assert cahp.num_kept(model) == N_LAYERS * N_HEADS
    with pytest.raises(HeadIndexError, match="every attention head"):
        cahp.remove_heads(model, {layer: list(range(N_HEADS)) for layer in range(N_LAYERS)})
    # every layer then is LayerNorm(h + output bias) followed by the feed-forward block
    batch = tiny_batch()
    with cahp.head_gates(model, init=torch.zeros(N_LAYERS, N_HEADS)):
        ref = logits(model, batch)
    torch.testing.assert_close(logits(floor, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_layer_in_eval_mode_has_no_dropout(family):
    """An emptied layer of an eval model must not apply dropout to its output bias."""
    model = with_random_biases(tiny_model(family)).eval()
    cahp.remove_heads(model, {1: list(range(N_HEADS))})
    layer = get_adapter(model).layers(model)[1]
    assert not layer.attention.training
    batch = tiny_batch()
    torch.testing.assert_close(logits(model, batch), logits(model, batch), atol=0, rtol=0)
    floor = no_attention_model(model)
    assert not any(m.training for m in floor.modules())


# --- attention kernels --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_agree_dense_and_pruned(family):
    batch = tiny_batch()
    for pattern in (None, PATTERN):
        model = with_random_biases(tiny_model(family))
        if pattern:
            cahp.remove_heads(model, pattern)
        get_adapter(model).set_attention_kernel(model, "eager")
        ref = logits(model, batch)
        for kernel in (*ATTENTION_KERNELS, "eager"):
            get_adapter(model).set_attention_kernel(model, kernel)
            torch.testing.assert_close(logits(model, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_compact_kernel_keeps_gates_capture_and_surgery(family):
    model = tiny_model(family)
    get_adapter(model).set_attention_kernel(model, "compact")
    batch = tiny_batch()
    g = torch.ones(N_LAYERS, N_HEADS)
    g[0, 1] = 0
    with cahp.head_gates(model, init=g):
        gated = logits(model, batch)
    att = next(cahp.iter_attention(model, [batch]))
    assert att.probs[0].shape[1] == N_HEADS
    cahp.remove_heads(model, {0: [1]})
    torch.testing.assert_close(logits(model, batch), gated, atol=1e-5, rtol=0)
    # a copy, or a pickled model, keeps the kernel
    torch.testing.assert_close(logits(copy.deepcopy(model), batch), gated, atol=1e-5, rtol=0)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(get_adapter(loaded).layers(loaded)[0].attention).__name__.startswith("Compact")
    torch.testing.assert_close(logits(loaded, batch), gated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_compact_fused_weights_follow_changes(family):
    """The cached q/k/v concatenation is rebuilt when a weight changes, and dropped with the kernel."""
    model = with_random_biases(tiny_model(family))
    adapter = get_adapter(model)
    batch = tiny_batch()
    adapter.set_attention_kernel(model, "compact")
    logits(model, batch)
    assert any("_cahp_fused_qkv" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        adapter.heads(adapter.layers(model)[0]).q.weight.mul_(2.0)
    changed = logits(model, batch)
    adapter.set_attention_kernel(model, "eager")
    assert not any("_cahp_fused_qkv" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(changed, logits(model, batch), atol=1e-5, rtol=0)
    # and with autograd on, the three projections run as modules (gradients reach them)
    adapter.set_attention_kernel(model, "compact")
    model(**batch).logits.sum().backward()
    assert adapter.heads(adapter.layers(model)[0]).q.weight.grad is not None


def test_project_out_residual_matches_the_module_and_reads_its_residual_only():
    torch.manual_seed(0)
    o = torch.nn.Linear(6, 4)
    context = torch.randn(2, 6, 3).transpose(1, 2)  # (2, 3, 6), not contiguous
    residual = torch.randn(2, 4, 3).transpose(1, 2)  # (2, 3, 4), not contiguous
    kept = residual.clone()
    expected = o(context) + residual
    with torch.inference_mode():
        got = project_out_residual(o, context, residual)
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(residual, kept, atol=0, rtol=0)
    # with autograd on, the module runs: gradients reach its weight
    project_out_residual(o, context, residual).sum().backward()
    assert o.weight.grad is not None
    # a hook on the projection sees its call
    seen = []
    o.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(project_out_residual(o, context, residual), expected.detach(), atol=1e-6, rtol=0)
    assert seen == [1]
    # under autocast the context comes in bfloat16: the module casts, as it would without the fold
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = project_out_residual(o, context.bfloat16(), residual)
    torch.testing.assert_close(mixed.float(), expected.detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_compact_block_leaves_its_input_alone(family):
    """The compact forward adds the residual inside a GEMM: into a new tensor, never the block's input."""
    model = with_random_biases(tiny_model(family)).eval()
    cahp.remove_heads(model, {0: [1]})
    adapter = get_adapter(model)
    block = adapter.layers(model)[0].attention
    hidden = torch.randn(2, 5, model.config.hidden_size)
    kept = hidden.clone()
    adapter.set_attention_kernel(model, "eager")
    with torch.inference_mode():
        ref = block(hidden)[0]
    adapter.set_attention_kernel(model, "compact")
    with torch.inference_mode():
        got = block(hidden)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, kept, atol=0, rtol=0)


def test_unknown_kernel():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_adapter(model).set_attention_kernel(model, "flash")
    with pytest.raises(BenchError, match="unknown kernel"):
        BenchConfig(kernel="flash")


def test_prepare_refuses_hooks():
    model = tiny_model("bert")
    with cahp.head_gates(model), pytest.raises(BenchError, match="hooks"):
        prepare_for_inference(model)
    prepare_for_inference(model, kernel="compact")
    assert all(p.is_contiguous() and not p.requires_grad for p in model.parameters())


# --- the benchmark itself (tiny, seconds) -------------------------------------


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_bench_models_smoke(family):
    dense = tiny_model(family)
    pruned = {"half": cahp.remove_heads(copy.deepcopy(dense), random_removal(dense, 0.5, seed=0))}
    cfg = BenchConfig(shapes="1x8,2x16", threads=1, kernel="auto", reps=3, warmup=1, onnx=family == "bert")
    result = bench_models(dense, pruned, cfg)
    assert result["threads"] == 1
    assert result["allocator"].startswith("glibc, freed memory held") or "default" in result["allocator"]
    assert set(result["variants"]) == {"dense", "half", "no_attention"}
    assert result["variants"]["half"]["share_removed"] == 0.5
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["kernel"] in ATTENTION_KERNELS
        assert set(run["kernel_calibration_ms"]) == set(ATTENTION_KERNELS)
        expected = {"dense", "half", "no_attention"}
        if family == "bert":
            expected |= {"onnx:" + k for k in expected}
        assert set(run["timings"]) == expected
        assert all(t["n"] == 3 and t["median_ms"] > 0 and t["iqr_ms"] >= 0 for t in run["timings"].values())
        assert run["macs"]["dense"] > run["macs"]["half"] > run["macs"]["no_attention"]
        assert "half" in run["floor_relative"] and "half" in run["floor_relative_paired"]
        assert "half" in run["floor_relative_ratio"] and len(run["floor_relative_ratio_ci95"]["half"]) == 2
        lo, hi = run["floor_relative_ci95"]["half"]
        assert (math.isnan(lo) and math.isnan(hi)) or lo <= hi
        assert all(len(t) == 3 for t in run["times_ms"].values())
        if family == "bert":
            # one thread: no thread pools, so PyTorch and onnxruntime calls are interleaved and paired
            assert run["runtimes_interleaved"] is True
            assert set(run["onnx_ratio"]) == {"dense", "half", "no_attention"}
            assert all(r > 0 for r in run["onnx_ratio"].values())
            lo, hi = run["onnx_ratio_ci95"]["half"]
            assert 0 < lo <= hi
        else:
            assert run["onnx_ratio"] == {} and "runtimes_interleaved" not in run
    if family == "bert":
        assert max(o["max_abs_diff"] for o in result["onnx"].values()) < 1e-4
    text = format_table(result)
    assert "floor-rel" in text and "no_attention" in text
    assert ("onnx / pytorch latency: dense" in text) == (family == "bert")
    # the dense model handed in is not changed
    assert cahp.num_kept(dense) == N_LAYERS * N_HEADS and not isinstance(
        get_adapter(dense).layers(dense)[0].attention, ResidualOnlyAttention
    )


def test_bench_rejects_mismatched_and_unpruned():
    dense, one = tiny_model("bert"), BenchConfig(shapes="1x8", reps=1)
    with pytest.raises(BenchError, match="longer than the model allows"):
        bench_models(dense, {"p": cahp.remove_heads(tiny_model("bert"), {0: [0]})}, BenchConfig(shapes="1x65", reps=1))
    with pytest.raises(BenchError, match="architecture"):
        bench_models(dense, {"p": tiny_model("mpnet")}, one)
    with pytest.raises(BenchError, match="nothing was removed"):
        bench_models(dense, {"p": tiny_model("bert")}, one)
    with pytest.raises(BenchError, match="reserved"):
        bench_models(dense, {"dense": cahp.remove_heads(tiny_model("bert"), {0: [0]})}, one)


@pytest.mark.parametrize("text, message", [("3", "BATCHxSEQUENCE"), ("0x8", "positive"), ("2xa", "BATCHxSEQUENCE")])
def test_parse_shapes_errors(text, message):
    with pytest.raises(BenchError, match=message):
        parse_shapes(text)
    assert parse_shapes("1x32, 32X128") == [(1, 32), (32, 128)]


def test_run_bench_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchError, match="ratio"):
        run_bench("minilm-l6", remove_ratio=1.0)
    with pytest.raises(cahp.ModelLoadError):
        run_bench(str(tmp_path / "no-such-model"))
    with pytest.raises(BenchError, match="not a folder written by cahp"):
        run_bench("minilm-l6", pruned=str(tmp_path))


def test_cli_bench_errors(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["bench", "--model", "minilm-l6", "--remove-ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err
    assert cli_main(["bench", "--model", "./no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["bench", "--model", "minilm-l6", "--shapes", "32"]) == 2
    assert "BATCHxSEQUENCE" in capsys.readouterr().err


def test_cli_bench_pruned_folder(tmp_path, capsys):
    dense = tiny_model("bert")
    dense.save_pretrained(tmp_path / "dense")
    pruned = cahp.remove_heads(copy.deepcopy(dense), PATTERN)
    cahp.save_pruned(pruned, None, tmp_path / "pruned")
    out = tmp_path / "bench.json"
    rc = cli_main(
        [
            "bench", "--model", str(tmp_path / "dense"), "--pruned", str(tmp_path / "pruned"),
            "--shapes", "1x8", "--threads", "1", "--reps", "2", "--warmup", "1", "--kernel", "compact",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pruned" in printed and "floor-rel" in printed
    import json

    data = json.loads(out.read_text())
    assert data["variants"]["pruned"]["heads_per_layer"] == [3, 0, 2]
    assert data["runs"][0]["kernel"] == "compact"
    assert data["environment"]["torch_threads"] == 1 and data["environment"]["cahp"] == cahp.__version__


def test_cli_bench_sweep(tmp_path, capsys):
    dense = tiny_model("bert")
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "sweep.json"
    args = ["bench", "--model", str(tmp_path / "dense"), "--sweep", "--shapes", "1x8", "--threads", "1",
            "--budget", "600", "--min-reps", "1", "--max-reps", "3", "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "ceiling" in printed and "| heads per layer | 4 | 3 | 2 | 1 | 0 (floor) |" in printed
    import json

    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["sweeps"]] == [1] and "fit" in data["sweeps"][0]
    # --max-reps ends the timing long before the budget
    assert {len(t) for t in data["sweeps"][0]["times_ms"].values()} == {3}
    assert data["environment"]["torch"] == torch.__version__
    # a sweep times --model itself: a pruned folder makes no sense with it
    assert cli_main(["bench", "--model", str(tmp_path / "dense"), "--sweep", "--pruned", str(tmp_path)]) == 2
    assert "--sweep" in capsys.readouterr().err


# --- the head-count sweep: where the line is lost -----------------------------


def test_uniform_removal():
    dense = tiny_model("bert")
    plan = uniform_removal(dense, 1)
    assert plan == {layer: list(range(1, N_HEADS)) for layer in range(N_LAYERS)}
    assert uniform_removal(dense, N_HEADS) == {}
    with pytest.raises(BenchError, match="cannot keep"):
        uniform_removal(dense, N_HEADS + 1)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_head_count_sweep_smoke(family):
    dense = tiny_model(family)
    r = head_count_sweep(dense, 1, 8, BenchConfig(threads=1, kernel="auto", reps=4, warmup=1), n_boot=200)
    assert r["kernel"] in ATTENTION_KERNELS and r["reps"] == 4
    assert set(r["median_ms"]) == {str(h) for h in range(N_HEADS + 1)}
    assert set(r["per_block_ms"]) == {str(h) for h in range(1, N_HEADS + 1)}
    assert all(len(t) == 4 for t in r["times_ms"].values())
    assert set(r["fit"]) == {"fixed_ms", "per_head_ms", "fixed_share", "uniform_ceiling"}
    lo, hi = r["uniform_ceiling_ci95"]
    assert (math.isnan(lo) and math.isnan(hi)) or lo <= hi
    assert cahp.num_kept(dense) == N_LAYERS * N_HEADS  # the model handed in is not changed
    with pytest.raises(BenchError, match="between 1 and"):
        head_count_sweep(dense, cfg=BenchConfig(reps=1), counts=[0])


# --- settings: one config for the CLI, the API and the benchmark script --------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_knows_inputs_and_longest_sequence(family):
    """Family knowledge lives in arch/: the inputs its forward takes and the positions it covers."""
    import inspect

    model = tiny_model(family)
    adapter = get_adapter(model)
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    assert adapter.input_names(model.config) == ["input_ids", "attention_mask", *(["token_type_ids"] * takes)]
    # RoBERTa-style position ids start after the padding id (pad_token_id 1 in tiny.py)
    offset = 2 if family in ("roberta", "mpnet") else 0
    assert adapter.max_positions(model.config) == 64 - offset
    longest = 64 - offset
    dense = tiny_model(family)
    with pytest.raises(BenchError, match=f"allows \\({longest}\\)"):
        bench_models(dense, {"p": cahp.remove_heads(tiny_model(family), {0: [0]})},
                     BenchConfig(shapes=f"1x{longest + 1}", reps=1))


def test_cli_bench_options_are_the_config_fields():
    from cahp.cli import build_parser
    from cahp.core.configs import from_args

    sub = build_parser()
    args = sub.parse_args(["bench", "--model", "m"])
    assert from_args(BenchConfig, args) == BenchConfig()
    assert (args.remove_ratio, args.pruned, args.sweep, args.out) == (0.5, None, False, None)
    args = sub.parse_args(["bench", "--model", "m", "--onnx", "--malloc-default", "--threads", "1", "--reps", "4",
                           "--budget", "5", "--min-reps", "2", "--max-reps", "9", "--warmup", "0", "--clock", "cpu",
                           "--kernel", "compact", "--shapes", "2x16", "--device", "cpu", "--seed", "3"])  # fmt: skip
    assert from_args(BenchConfig, args) == BenchConfig(
        shapes="2x16", device="cpu", seed=3, threads=1, kernel="compact", reps=4, budget=5.0, min_reps=2, max_reps=9,
        warmup=0, clock="cpu", malloc_default=True, onnx=True,
    )
    with pytest.raises(SystemExit):  # a pruned folder or a random selection, not both
        sub.parse_args(["bench", "--model", "m", "--pruned", "p", "--remove-ratio", "0.3"])
    with pytest.raises(BenchError, match="threads"):
        BenchConfig(threads=0)
    with pytest.raises(BenchError, match="clock"):
        BenchConfig(clock="gpu")
    with pytest.raises(BenchError, match="BATCHxSEQUENCE"):
        BenchConfig(shapes="32")


