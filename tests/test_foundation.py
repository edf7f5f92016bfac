"""Head gates, surgery, checkpoints and capture on tiny models of every family."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import cahp
from cahp.arch import ResidualOnlyAttention, get_adapter
from cahp.model.heads import HeadIndexError, kept_mask

from .tiny import FAMILIES, HEAD_DIM, N_HEADS, N_LAYERS, tiny_batch, tiny_model

ATOL = 1e-5


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def zeroed_reference(model, batch, heads):
    """Reference: forward with the context of ``heads`` {layer: [heads]} zeroed by hand."""
    adapter = get_adapter(model)
    handles = []
    for layer_idx, layer in enumerate(adapter.layers(model)):
        hs = heads.get(layer_idx, [])
        if not hs:
            continue

        def hook(module, args, hs=hs):
            x = args[0].clone()
            for h in hs:
                x[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            return (x,)

        handles.append(adapter.heads(layer).o.register_forward_pre_hook(hook))
    try:
        return logits(model, batch)
    finally:
        for h in handles:
            h.remove()


def random_pattern(rng: random.Random, allow_all_of_layer: bool = True) -> dict[int, list[int]]:
    pattern = {}
    for layer in range(N_LAYERS):
        n = rng.randint(0, N_HEADS if allow_all_of_layer else N_HEADS - 1)
        pattern[layer] = sorted(rng.sample(range(N_HEADS), n))
    if sum(len(v) for v in pattern.values()) == N_LAYERS * N_HEADS:
        pattern[0] = pattern[0][1:]
    return pattern


def gate_mask(pattern):
    g = torch.ones(N_LAYERS, N_HEADS)
    for layer, hs in pattern.items():
        g[layer, hs] = 0
    return g


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gate_zero_equals_surgery_equals_reference(family, attn):
    model = tiny_model(family, attn=attn)
    batch = tiny_batch()
    pattern = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # layer 1 loses every head
    ref = zeroed_reference(model, batch, pattern)
    with cahp.head_gates(model, init=gate_mask(pattern)):
        gated = logits(model, batch)
    dense = logits(model, batch)
    assert not torch.allclose(ref, dense, atol=1e-4), "the pattern should change the outputs"
    torch.testing.assert_close(gated, ref, atol=ATOL, rtol=0)
    n_before = cahp.count_parameters(model)
    cahp.remove_heads(model, pattern)
    torch.testing.assert_close(logits(model, batch), ref, atol=ATOL, rtol=0)
    # parameter drop: per head, q/k/v rows (d x hidden + d bias each) and o columns (hidden x d).
    hidden = N_HEADS * HEAD_DIM
    per_head = 3 * (HEAD_DIM * hidden + HEAD_DIM) + hidden * HEAD_DIM
    removed = sum(len(v) for v in pattern.values())
    assert n_before - cahp.count_parameters(model) == removed * per_head
    assert isinstance(get_adapter(model).layers(model)[1].attention, ResidualOnlyAttention)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_one_is_identity_and_hooks_removed(family):
    model = tiny_model(family)
    batch = tiny_batch()
    dense = logits(model, batch)
    with cahp.head_gates(model) as g:
        torch.testing.assert_close(logits(model, batch), dense, atol=0, rtol=0)
        g.values[0, 0] = 0.5
        assert not torch.allclose(logits(model, batch), dense)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert hooks == 0
    torch.testing.assert_close(logits(model, batch), dense, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_gradients_nonzero(family):
    model = tiny_model(family)
    batch = tiny_batch()
    with cahp.head_gates(model, requires_grad=True) as g:
        out = model(**batch, labels=torch.tensor([0, 1, 2, 0]))
        out.loss.backward()
        grad = g.values.grad
    assert grad is not None and grad.shape == (N_LAYERS, N_HEADS)
    assert (grad.abs() > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_random_uneven_patterns_and_pruning_twice(family):
    rng = random.Random(family)
    batch = tiny_batch(seed=1)
    for _ in range(3):
        model = tiny_model(family)
        first = random_pattern(rng)
        second_candidates = [
            (l, h) for l in range(N_LAYERS) for h in range(N_HEADS) if h not in first.get(l, [])
        ]
        second_pairs = rng.sample(second_candidates, min(3, len(second_candidates) - 1))
        second = {}
        for l, h in second_pairs:
            second.setdefault(l, []).append(h)
        total = {l: sorted(set(first.get(l, [])) | set(second.get(l, []))) for l in range(N_LAYERS)}
        ref = zeroed_reference(model, batch, total)
        cahp.remove_heads(model, first)
        cahp.remove_heads(model, second)
        torch.testing.assert_close(logits(model, batch), ref, atol=ATOL, rtol=0)
        expected = torch.ones(N_LAYERS, N_HEADS, dtype=torch.bool)
        for l, hs in total.items():
            expected[l, hs] = False
        assert torch.equal(kept_mask(model), expected)
        # gates on a pruned model index original heads; gate 0 on a kept head == removing it
        kept = [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS) if expected[l, h]]
        if len(kept) > 1:
            l, h = kept[0]
            g = torch.ones(N_LAYERS, N_HEADS)
            g[l, h] = 0
            with cahp.head_gates(model, init=g):
                gated = logits(model, batch)
            cahp.remove_heads(model, {l: [h]})
            torch.testing.assert_close(logits(model, batch), gated, atol=ATOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.booleans(), min_size=N_LAYERS * N_HEADS, max_size=N_LAYERS * N_HEADS))
def test_hypothesis_any_mask_bert(bits):
    mask = torch.tensor(bits).view(N_LAYERS, N_HEADS)
    if mask.all():
        mask[0, 0] = False
    model = tiny_model("bert")
    batch = tiny_batch(seed=2)
    ref = zeroed_reference(
        model, batch, {l: torch.nonzero(mask[l]).flatten().tolist() for l in range(N_LAYERS)}
    )
    cahp.remove_heads(model, mask)
    torch.testing.assert_close(logits(model, batch), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    model = tiny_model(family)
    tok = None
    batch = tiny_batch()
    cahp.remove_heads(model, {0: [0, 2], 1: [0, 1, 2, 3], 2: [3]})
    expected = logits(model, batch)
    cahp.save_pruned(model, tok, tmp_path / "m")
    loaded, _ = cahp.load_pruned(tmp_path / "m", attn_implementation="eager", with_tokenizer=False)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=0, rtol=0)  # same kernel: bit-identical
    assert cahp.kept_heads(loaded) == cahp.kept_heads(model)
    assert cahp.count_parameters(loaded) == cahp.count_parameters(model)
    # pruning a reloaded model again still uses original numbering
    cahp.remove_heads(loaded, {2: [0]})
    assert cahp.kept_heads(loaded)[2] == [1, 2]


def test_plain_from_pretrained_refuses_pruned_folder(tmp_path):
    model = tiny_model("bert")
    cahp.remove_heads(model, {0: [0]})
    cahp.save_pruned(model, None, tmp_path / "m")
    # The folder declares its own model type: transformers asks for its code, never builds the full-size model.
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")


def test_save_is_atomic_and_overwrites(tmp_path):
    model = tiny_model("bert")
    cahp.save_pruned(model, None, tmp_path / "m")
    cahp.remove_heads(model, {1: [1]})
    cahp.save_pruned(model, None, tmp_path / "m")
    loaded, _ = cahp.load_pruned(tmp_path / "m", with_tokenizer=False)
    assert cahp.kept_heads(loaded)[1] == [0, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    "heads, message",
    [
        ({5: [0]}, "layer 5 does not exist"),
        ({0: [7]}, "head 7 of layer 0 does not exist"),
        ({0: [-1]}, "head -1 of layer 0 does not exist"),
        ({0: ["a"]}, "not an integer"),
        ({l: list(range(N_HEADS)) for l in range(N_LAYERS)}, "every attention head"),
    ],
)
def test_bad_head_indices(heads, message):
    model = tiny_model("bert")
    with pytest.raises(HeadIndexError, match=message):
        cahp.remove_heads(model, heads)


def test_already_removed_head():
    model = tiny_model("bert")
    cahp.remove_heads(model, {0: [1]})
    with pytest.raises(HeadIndexError, match="already removed"):
        cahp.remove_heads(model, {0: [1]})


def test_unsupported_architecture():
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)
    model = transformers.GPT2ForSequenceClassification(cfg)
    with pytest.raises(cahp.UnsupportedArchitectureError, match="supported model types: .*bert"):
        cahp.remove_heads(model, {0: [0]})


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_eager_attentions(family):
    model = tiny_model(family, attn="eager")
    batch = tiny_batch()
    with torch.no_grad():
        ref = model(**batch, output_attentions=True).attentions
    att = next(cahp.iter_attention(model, [batch]))
    mask = batch["attention_mask"].bool()
    for layer in range(N_LAYERS):
        got, want = att.probs[layer], ref[layer]
        # compare real query rows only; padded keys must carry no mass
        for b in range(mask.shape[0]):
            real = mask[b]
            torch.testing.assert_close(
                got[b][:, real][:, :, real], want[b][:, real][:, :, real], atol=1e-5, rtol=0
            )
            assert got[b][:, :, ~real].abs().max() == 0 if (~real).any() else True
    rows = att.real_rows()
    assert rows.shape == (int(mask.sum()), N_LAYERS * N_HEADS, mask.shape[1])
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_capture_sdpa_and_pruned(family):
    eager = tiny_model(family, attn="eager")
    sdpa = tiny_model(family, attn="sdpa")
    batch = tiny_batch()
    a = next(cahp.iter_attention(eager, [batch]))
    b = next(cahp.iter_attention(sdpa, [batch]))
    torch.testing.assert_close(a.real_rows(), b.real_rows(), atol=1e-6, rtol=0)
    cahp.remove_heads(sdpa, {0: [1, 2], 1: [0, 1, 2, 3]})
    c = next(cahp.iter_attention(sdpa, [batch]))
    assert c.probs[1] is None and c.head_ids[0] == [0, 3]
    torch.testing.assert_close(c.probs[0], a.probs[0][:, [0, 3]], atol=1e-6, rtol=0)
    # layer 2 sees other inputs once layers 0-1 lost heads, but stays a distribution per real row
    assert c.probs[2].shape == a.probs[2].shape
    torch.testing.assert_close(c.real_rows().sum(-1), torch.ones(c.real_rows().shape[:2]), atol=1e-5, rtol=0)
