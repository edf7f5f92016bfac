"""Grouped-query attention decoders (Llama, Qwen2, Mistral): gates, surgery, KV cache, generation, save/load."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers

import cahp
from cahp.arch import get_adapter
from cahp.arch.llama import GroupedQueryError, HeadlessAttention, HeadlessMLP
from cahp.model import loading
from cahp.model.capture import iter_attention
from cahp.model.gates import head_gates
from cahp.model.heads import HeadIndexError, kept_kv_heads, kept_mask, kv_cache_bytes_per_token, kv_head_of
from cahp.model.neuron_surgery import remove_neurons
from cahp.model.neurons import neuron_gates
from cahp.model.surgery import count_parameters, keep_heads, remove_heads
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import collect_signatures

LAYERS, HEADS, HEAD_DIM, VOCAB = 3, 6, 8, 97
HIDDEN = HEADS * HEAD_DIM

# Uneven groups in layer 1 (query heads 1, 3 and 4 of groups {0,1,2} / {3,4,5} go, both KV heads stay),
# a whole group in layer 2, and every head of layer 0 (the layer the cache asks for the tokens seen).
MIXED = {0: list(range(HEADS)), 1: [1, 3, 4], 2: [0, 1, 2]}


def tiny_decoder(kv_heads: int = 2, family: str = "llama", attn: str = "sdpa", seed: int = 0):
    """A random causal LM of ``family`` with 3 layers, 6 query heads over ``kv_heads`` KV heads, hidden 48."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    cfg = cls[family](
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def batch(left_pad: bool = False, seed: int = 0):
    """Two rows of 9 random ids, the second padded by 3 (on the left or the right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    pad = slice(0, 3) if left_pad else slice(6, 9)
    mask[1, pad] = 0
    ids[1, pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def as_mask(heads: dict) -> torch.Tensor:
    """0/1 gate values (layers, heads): 0 on the heads of ``heads``."""
    g = torch.ones(LAYERS, HEADS)
    for layer, hs in heads.items():
        g[layer, hs] = 0
    return g


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    """Logits at the real tokens only, (real tokens, vocab): padded query rows differ between kernels."""
    return model(**inputs).logits[inputs["attention_mask"].bool()]


@torch.no_grad()
def reference(model, inputs, heads: dict) -> torch.Tensor:
    """Logits with the context of ``heads`` zeroed at each o_proj input by a plain hook (no cahp code)."""
    handles = []
    for layer, hs in heads.items():
        cols = torch.tensor([h * HEAD_DIM + j for h in hs for j in range(HEAD_DIM)], dtype=torch.long)

        def zero(module, args, cols=cols):
            x = args[0].clone()
            x[..., cols] = 0
            return (x,)

        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    try:
        return logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


def test_kv_head_of_maps_query_heads_to_their_group():
    assert kv_head_of(tiny_decoder(kv_heads=2).config) == [0, 0, 0, 1, 1, 1]
    assert kv_head_of(tiny_decoder(kv_heads=3).config) == [0, 0, 1, 1, 2, 2]
    assert kv_head_of(tiny_decoder(kv_heads=6).config) == list(range(6))  # plain multi-head attention


def test_gates_have_one_value_per_query_head():
    model = tiny_decoder()
    with head_gates(model) as gates:
        assert tuple(gates.values.shape) == (LAYERS, HEADS)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kv_heads", [2, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_gates_equal_surgery_equal_reference(family, kv_heads, attn, left_pad):
    model = tiny_decoder(kv_heads, family, attn)
    inputs = batch(left_pad)
    ref = reference(model, inputs, MIXED)
    with head_gates(model, init=as_mask(MIXED)):
        gated = logits(model, inputs)
    remove_heads(model, MIXED)
    pruned = logits(model, inputs)
    torch.testing.assert_close(gated, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned, gated, atol=1e-5, rtol=0)
    assert not torch.allclose(pruned, logits(tiny_decoder(kv_heads, family, attn), inputs), atol=1e-3)


def test_kv_heads_go_with_their_last_query_head():
    model = tiny_decoder(kv_heads=3)  # groups {0,1} {2,3} {4,5}
    remove_heads(model, {0: [0, 1, 2], 1: [5], 2: [0, 1, 2, 3]})
    assert kept_kv_heads(model) == {0: [1, 2], 1: [0, 1, 2], 2: [2]}
    attn = model.model.layers
    assert [a.self_attn.k_proj.out_features // HEAD_DIM for a in attn] == [2, 3, 1]
    assert [a.self_attn.v_proj.out_features // HEAD_DIM for a in attn] == [2, 3, 1]
    assert [a.self_attn.q_proj.out_features // HEAD_DIM for a in attn] == [3, 5, 2]
    assert [a.self_attn.o_proj.in_features // HEAD_DIM for a in attn] == [3, 5, 2]
    # Query head 3 keeps reading KV head 1 alone; heads 2 and 3 of layer 1 share KV head 1, head 4 has KV head 2.
    assert attn[0].self_attn.kv_index.tolist() == [0, 1, 1]
    assert attn[1].self_attn.kv_index.tolist() == [0, 0, 1, 1, 2]
    assert attn[2].self_attn.kv_index is None and attn[2].self_attn.num_key_value_groups == 2  # one even group


def test_parameters_drop_exactly():
    model = tiny_decoder(kv_heads=2)
    before = count_parameters(model)
    remove_heads(model, MIXED)
    qo = 2 * HIDDEN * HEAD_DIM  # one query head: its q_proj rows and o_proj columns (no biases in Llama)
    kv = 2 * HIDDEN * HEAD_DIM  # one KV head: its k_proj and v_proj rows
    # layer 0: 6 query and 2 KV heads; layer 1: 3 query heads; layer 2: 3 query heads and 1 KV head.
    assert before - count_parameters(model) == 12 * qo + 3 * kv


def test_qwen2_biases_follow_the_heads():
    model = tiny_decoder(kv_heads=3, family="qwen2")
    before = count_parameters(model)
    remove_heads(model, {1: [0, 1]})  # query heads 0, 1 and KV head 0, with their q/k/v biases
    a = model.model.layers[1].self_attn
    assert a.q_proj.bias.shape == (4 * HEAD_DIM,) and a.k_proj.bias.shape == (2 * HEAD_DIM,)
    assert before - count_parameters(model) == 2 * (2 * HIDDEN * HEAD_DIM + HEAD_DIM) + 2 * (HIDDEN + 1) * HEAD_DIM


def test_empty_layer_is_residual_only():
    model = tiny_decoder()
    remove_heads(model, {1: list(range(HEADS))})
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn, HeadlessAttention)
    assert get_adapter(model).heads(layer).o is None
    assert count_parameters(layer.self_attn) == 0
    hidden = torch.randn(2, 5, HIDDEN)
    assert torch.equal(layer.self_attn(hidden)[0], torch.zeros_like(hidden))


def test_removing_every_head_or_a_removed_head_is_refused():
    model = tiny_decoder()
    with pytest.raises(HeadIndexError, match="every attention head"):
        remove_heads(model, {layer: list(range(HEADS)) for layer in range(LAYERS)})
    remove_heads(model, {1: [1]})
    with pytest.raises(HeadIndexError, match="already removed"):
        remove_heads(model, {1: [1, 2]})
    with pytest.raises(HeadIndexError, match="does not exist"):
        remove_heads(model, {1: [HEADS]})


def test_pruning_twice_equals_pruning_once():
    inputs = batch()
    once = remove_heads(tiny_decoder(kv_heads=3), MIXED)
    twice = tiny_decoder(kv_heads=3)
    remove_heads(twice, {1: [3], 2: [0]})
    remove_heads(twice, {0: list(range(HEADS)), 1: [1, 4], 2: [1, 2]})
    assert kept_kv_heads(once) == kept_kv_heads(twice)
    torch.testing.assert_close(logits(twice, inputs), logits(once, inputs), atol=1e-6, rtol=0)
    kept = keep_heads(tiny_decoder(kv_heads=3), {0: [], 1: [0, 2, 5], 2: [3, 4, 5]})
    torch.testing.assert_close(logits(kept, inputs), logits(once, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("left_pad", [False, True])
def test_kv_cache_holds_only_kept_kv_heads(left_pad):
    model = remove_heads(tiny_decoder(kv_heads=3), {0: [0, 1], 1: list(range(HEADS)), 2: [5]})
    with torch.no_grad():
        out = model(**batch(left_pad), use_cache=True)
    cache = out.past_key_values
    shapes = [tuple(layer.keys.shape) for layer in cache.layers]
    assert shapes == [(2, 2, 9, HEAD_DIM), (2, 0, 9, HEAD_DIM), (2, 3, 9, HEAD_DIM)]
    assert [tuple(layer.values.shape) for layer in cache.layers] == shapes
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize(
    ("family", "heads", "attn"),
    [
        ("llama", MIXED, "sdpa"),
        ("llama", MIXED, "eager"),
        ("llama", {0: [0, 1, 2, 3]}, "sdpa"),
        ("llama", {2: list(range(HEADS))}, "eager"),
        ("qwen2", MIXED, "sdpa"),
        ("mistral", MIXED, "sdpa"),
    ],
)
def test_generation_with_cache_equals_without(family, heads, attn):
    model = remove_heads(tiny_decoder(kv_heads=2, family=family, attn=attn), heads)
    inputs = batch(left_pad=True)  # generation pads on the left
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(**inputs, use_cache=True, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert cached.shape == (2, 9 + 8)
    assert torch.equal(cached, uncached)
    with head_gates(tiny_decoder(kv_heads=2, family=family, attn=attn), init=as_mask(heads)) as gates:
        gated = gates.model.generate(**inputs, use_cache=True, **kw)
    assert torch.equal(cached, gated)


def test_save_load_round_trip_is_identical(tmp_path):
    model = remove_heads(tiny_decoder(kv_heads=3), MIXED)
    inputs = batch()
    cahp.save_pruned(model, None, tmp_path / "m")
    loaded, _ = cahp.load_pruned(tmp_path / "m", with_tokenizer=False)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.cahp_kept_heads == {"0": [], "1": [0, 2, 5], "2": [3, 4, 5]}
    assert count_parameters(loaded) == count_parameters(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**batch(True), **kw), model.generate(**batch(True), **kw))


def test_pruned_model_copies_and_pickles():
    model = remove_heads(tiny_decoder(kv_heads=3), MIXED)
    inputs = batch()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert torch.equal(logits(other, inputs), logits(model, inputs))


def test_gates_on_a_pruned_decoder_scale_kept_query_heads():
    model = remove_heads(tiny_decoder(kv_heads=2), {1: [1, 3, 4]})
    inputs = batch()
    with head_gates(model, init=as_mask({1: [0], 2: [2, 3]})):
        gated = logits(model, inputs)
    remove_heads(model, {1: [0], 2: [2, 3]})
    torch.testing.assert_close(logits(model, inputs), gated, atol=1e-5, rtol=0)


def test_ffn_neurons_slice_gate_and_up_together():
    model = tiny_decoder()
    inputs = batch()
    drop = torch.zeros(LAYERS, 64, dtype=torch.bool)
    drop[0, ::3] = True
    drop[2] = True  # layer 2's MLP goes completely
    with neuron_gates(model, init=(~drop).float()):
        gated = logits(model, inputs)
    before = count_parameters(model)
    remove_neurons(model, drop)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 64 - 22
    assert isinstance(model.model.layers[2].mlp, HeadlessMLP)
    assert before - count_parameters(model) == 3 * HIDDEN * (22 + 64)
    torch.testing.assert_close(logits(model, inputs), gated, atol=1e-5, rtol=0)


def test_smollm2_short_name_uses_the_cached_folder_or_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_smollm2_gguf", lambda: None)
    monkeypatch.setenv("CAHP_CACHE_DIR", str(tmp_path / "cache"))
    assert loading.resolve_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    assert loading.resolve_model("smollm2-135m") == str(target)


def test_causal_lm_kind_refuses_labels_and_mismatched_pruned_folders(tmp_path):
    cahp.save_pruned(tiny_decoder(), None, tmp_path / "dense")
    with pytest.raises(loading.ModelLoadError, match="no classification head"):
        loading.load_model(str(tmp_path / "dense"), kind="causal-lm", num_labels=3, with_tokenizer=False)
    cahp.save_pruned(remove_heads(tiny_decoder(), {1: [0]}), None, tmp_path / "m")
    with pytest.raises(loading.ModelLoadError, match="kind='causal-lm'"):
        loading.load_model(str(tmp_path / "m"), with_tokenizer=False)
    model, _ = loading.load_model(str(tmp_path / "m"), kind="causal-lm", with_tokenizer=False)
    assert kept_kv_heads(model)[1] == [0, 1]


@pytest.mark.integration
def test_smollm2_gates_equal_surgery_and_generation_runs():
    model, tok = loading.load_model("smollm2-135m", kind="causal-lm")
    adapter = get_adapter(model)
    n_layers, n_heads = adapter.num_layers(model.config), adapter.num_heads(model.config)
    assert (n_layers, n_heads, adapter.num_kv_heads(model.config)) == (30, 9, 3)
    # Whole KV groups (query heads 0-2 read KV head 0), query heads inside groups, and one empty layer.
    heads = {0: [3, 4, 5], 5: [0, 1, 2, 7], 11: [1, 4, 8], 17: list(range(9)), 29: [6, 7, 8]}
    inputs = tok(["The capital of France is", "Once upon a time, there"], padding=True, return_tensors="pt")
    before = count_parameters(model)
    g = torch.ones(n_layers, n_heads)
    for layer, hs in heads.items():
        g[layer, hs] = 0
    with head_gates(model, init=g):
        gated = logits(model, inputs)
    remove_heads(model, heads)
    # Logits reach ~30 over 30 layers in float32: the rounding of the sliced GEMMs is ~1e-6 of that.
    torch.testing.assert_close(logits(model, inputs), gated, atol=1e-4, rtol=1e-5)
    d, hidden = 64, 576
    # Query heads: 22 (q rows + o columns); KV heads: layer 0 one, layer 5 one, layer 17 three, layer 29 one.
    assert before - count_parameters(model) == 22 * 2 * hidden * d + 6 * 2 * hidden * d
    prompt = tok(["The capital of France is"], return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    out = model.generate(**prompt, use_cache=True, **kw)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    assert torch.equal(out, model.generate(**prompt, use_cache=False, **kw))


def captured(model, inputs):
    (att,) = list(iter_attention(model, [inputs]))
    return att


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_capture_matches_eager_attention_weights(family, left_pad):
    model = tiny_decoder(kv_heads=2, family=family, attn="eager")
    inputs = batch(left_pad)
    att = captured(model, inputs)
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions
    real = inputs["attention_mask"].bool()
    for layer in range(LAYERS):
        p = att.probs[layer]
        assert p.shape == (2, HEADS, 9, 9)
        # Real query rows: the model's own probabilities (causal, padded keys at exactly zero).
        ours, theirs = p.permute(0, 2, 1, 3)[real], eager[layer].permute(0, 2, 1, 3)[real]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert torch.all(p.triu(1) == 0)
        assert torch.all(p[~real[:, None, None, :].expand_as(p)] == 0)
    assert not torch.isnan(torch.stack(att.probs)).any()
    rows = att.real_rows()
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("left_pad", [False, True])
def test_capture_of_a_pruned_decoder_keeps_each_query_heads_own_kv_head(left_pad):
    dense = tiny_decoder(kv_heads=2)
    inputs = batch(left_pad)
    pruned = remove_heads(copy.deepcopy(dense), MIXED)
    att = captured(pruned, inputs)
    assert att.probs[0] is None and att.head_ids[1] == [0, 2, 5] and att.head_ids[2] == [3, 4, 5]
    real = inputs["attention_mask"].bool()
    # The gated dense model has the pruned model's hidden states; its kept heads must attend alike.
    with head_gates(dense, init=as_mask(MIXED)):
        gated = captured(dense, inputs)
    for layer in (1, 2):
        kept = att.head_ids[layer]
        ours = att.probs[layer].permute(0, 2, 1, 3)[real]
        theirs = gated.probs[layer][:, kept].permute(0, 2, 1, 3)[real]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_signatures_run_on_a_decoder_and_ignore_the_padding_side():
    model = remove_heads(tiny_decoder(kv_heads=3), {1: [1, 2, 3]})
    right = batch(left_pad=False)
    left = {k: v.clone() for k, v in right.items()}
    for k in left:  # the same second sentence, its 3 padding tokens moved to the front
        left[k][1] = torch.roll(right[k][1], 3)
    right, left = (collect_signatures(model, [b], progress=False) for b in (right, left))
    assert len(right.head_ids) == LAYERS * HEADS - 3
    assert right.rows == left.rows == 15
    # Rotary scores depend on position differences only: one sentence padded left or right gives the same rows.
    torch.testing.assert_close(right.distances["js"], left.distances["js"], atol=1e-5, rtol=0)
    torch.testing.assert_close(right.entropy, left.entropy, atol=1e-5, rtol=0)


def test_static_cache_generation_equals_uncached():
    model = remove_heads(tiny_decoder(kv_heads=2), MIXED)
    inputs = batch(left_pad=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    static = model.generate(**inputs, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(**inputs, use_cache=False, **kw))


def test_adapter_answers_the_encoder_questions_for_a_decoder():
    model = tiny_decoder(kv_heads=3)
    adapter = get_adapter(model)
    config = model.config
    assert adapter.name == "llama" and adapter.causal
    assert (adapter.num_layers(config), adapter.num_heads(config), adapter.head_dim(config)) == (3, 6, 8)
    assert adapter.intermediate_size(config) == 64
    assert adapter.max_positions(config) == 64
    assert adapter.input_names(config) == ["input_ids", "attention_mask"]
    ffn = adapter.ffn(model.model.layers[0])
    mlp = model.model.layers[0].mlp
    assert (ffn.inter, ffn.up, ffn.out, ffn.act) == (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    with cahp.head_gates(model) as gates:  # the package-level API
        assert gates.values.shape == (LAYERS, HEADS)
    cahp.remove_heads(model, {2: [4, 5]})
    assert kept_kv_heads(model)[2] == [0, 1]


def test_uneven_kv_split_is_refused():
    config = tiny_decoder().config
    config.num_key_value_heads = 4  # 6 query heads cannot share 4 key/value heads evenly
    with pytest.raises(GroupedQueryError, match="do not split into 4"):
        kv_head_of(config)


def test_kv_cache_bytes_per_token_follow_the_kept_kv_heads():
    model = tiny_decoder(kv_heads=3)
    dense = kv_cache_bytes_per_token(model)
    assert dense == LAYERS * 3 * HEAD_DIM * 2 * 4  # float32 keys and values
    remove_heads(model, {0: [0, 1, 2, 3], 1: [0], 2: list(range(HEADS))})  # KV heads left: 1, 3, 0
    assert kv_cache_bytes_per_token(model) == dense * 4 // 9
    assert kv_cache_bytes_per_token(model, torch.bfloat16) == dense * 4 // 9 // 2
    with torch.no_grad():
        cache = model(**batch(), use_cache=True).past_key_values
    stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert stored == kv_cache_bytes_per_token(model) * 2 * 9  # 2 rows of 9 tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_evenly_shrunk_groups_use_the_repeat_and_match_gates(attn):
    model = tiny_decoder(kv_heads=2, attn=attn)
    heads = {0: [0, 3], 1: [2, 5], 2: [0, 1, 3]}  # layers 0, 1: groups of 2 and 2; layer 2: groups of 1 and 2
    inputs = batch(left_pad=True)
    with head_gates(model, init=as_mask(heads)):
        gated = logits(model, inputs)
    remove_heads(model, heads)
    a = [layer.self_attn for layer in model.model.layers]
    assert [x.num_key_value_groups for x in a] == [2, 2, 1]
    assert a[0].kv_index is None and a[2].kv_index.tolist() == [0, 1, 1]
    torch.testing.assert_close(logits(model, inputs), gated, atol=1e-5, rtol=0)


def test_salience_from_the_language_modelling_loss():
    model = remove_heads(tiny_decoder(kv_heads=3), MIXED)
    inputs = batch(left_pad=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)  # no loss on padding
    out = gate_gradients(model, [{**inputs, "labels": labels}], progress=False)
    sal = out["salience"]
    assert sal.shape == (LAYERS, HEADS)
    assert torch.all(sal[~kept_mask(model)] == 0) and torch.all(sal[kept_mask(model)] > 0)
    # The same gradient by hand: next-token cross-entropy over real tokens, gates at 1.
    with head_gates(model, requires_grad=True) as gates:
        lm = model(**inputs).logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(lm.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
        (grad,) = torch.autograd.grad(loss, gates.values)
    torch.testing.assert_close(sal, grad.abs().double(), atol=1e-6, rtol=1e-5)
