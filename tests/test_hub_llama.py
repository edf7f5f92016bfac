"""Self-contained folders of pruned Llama-family decoders: plain transformers loads them with trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import cahp
from cahp.arch.hub import from_remote, to_remote
from cahp.arch.llama import HeadlessAttention, HeadlessMLP
from cahp.model.heads import kept_kv_heads

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, D_FF = 4, 6, 2, 8, 97, 64
HIDDEN = HEADS * HEAD_DIM

# Query heads {0,1,2} read KV head 0, {3,4,5} KV head 1. Layer 0 loses every head (the layer the cache asks
# for the tokens seen), layer 1 keeps 0, 2 | 5 (uneven groups: an index map), layer 2 keeps KV head 1 alone,
# layer 3 keeps 1, 2 | 4, 5 (even groups of two: transformers' own repeat).
HEADS_REMOVED = {0: list(range(HEADS)), 1: [1, 3, 4], 2: [0, 1, 2], 3: [0, 3]}
KEPT_KV = {0: [], 1: [0, 1], 2: [1], 3: [0, 1]}
FAMILIES = ("llama", "qwen2", "mistral")
NEW_TOKENS = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_decoder(family: str = "llama", head: str = "causal-lm", biases: bool = True, seed: int = 0) -> nn.Module:
    """A random ``family`` decoder (4 layers, 6 query heads over 2 KV heads, hidden 48) with random biases.

    Llama gets every optional bias (attention and MLP), so that the stand-ins of an emptied block must carry
    ``o_proj``'s and ``down_proj``'s biases; Qwen2 has q/k/v biases of its own, Mistral none.
    """
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    extra = {"attention_bias": biases, "mlp_bias": biases} if family == "llama" else {}
    cfg = cls[family](
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        **extra,
    )
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if head == "causal-lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases: the defaults are zeros, which would hide a dropped bias
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def pruned_decoder(family: str = "llama", head: str = "causal-lm", seed: int = 0) -> nn.Module:
    """`HEADS_REMOVED` and random uneven FFN widths (layer 2's MLP emptied) removed by cahp's own surgery."""
    model = cahp.remove_heads(tiny_decoder(family, head, seed=seed), HEADS_REMOVED)
    g = torch.Generator().manual_seed(seed + 2)
    remove = {2: list(range(D_FF))}
    for layer, n in ((0, 5), (1, 40), (3, 17)):
        remove[layer] = torch.randperm(D_FF, generator=g)[:n].tolist()
    return cahp.remove_neurons(model, remove)


def batch(left_pad: bool, seed: int = 0) -> dict:
    """Two rows of 9 random ids, the second padded by 3 on the left (generation) or the right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    pad = slice(0, 3) if left_pad else slice(6, 9)
    mask[1, pad] = 0
    ids[1, pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model: nn.Module, inputs: dict, use_cache: bool = True) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=use_cache)


def cache_heads(model: nn.Module, inputs: dict) -> list[int]:
    """Key/value heads each layer's cache holds after a forward of ``inputs``."""
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    return [layer.keys.shape[1] for layer in cache.layers]


# Runs in a fresh interpreter where `import cahp` fails: only torch and transformers are there.
NO_CAHP = textwrap.dedent(
    """
    import json, sys
    sys.modules["cahp"] = None  # any `import cahp` now raises ImportError
    import torch, transformers
    torch.set_num_threads(1)
    for job in json.loads(sys.argv[1]):
        model = getattr(transformers, job["auto"]).from_pretrained(job["folder"], trust_remote_code=True).eval()
        inputs = torch.load(job["batch"])
        out = {"parameters": sum(p.numel() for p in model.parameters())}
        with torch.no_grad():
            out["logits"] = model(**inputs).logits
        if job["generate"]:
            prompt = torch.load(job["prompt"])
            out["generated"] = model.generate(**prompt, max_new_tokens=job["generate"], do_sample=False,
                                              pad_token_id=0, use_cache=True)
            with torch.no_grad():
                cache = model(**prompt, use_cache=True).past_key_values
            out["cache_heads"] = [layer.keys.shape[1] for layer in cache.layers]
        torch.save(out, job["out"])
    """
)


def run_without_cahp(tmp_path, jobs: list[dict]) -> None:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", NO_CAHP, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_pruned_decoders_load_and_generate_without_cahp(tmp_path):
    inputs, prompt = batch(left_pad=False), batch(left_pad=True, seed=1)
    torch.save(inputs, tmp_path / "batch.pt")
    torch.save(prompt, tmp_path / "prompt.pt")
    cases = [(family, "causal-lm") for family in FAMILIES] + [("llama", "classifier")]
    jobs, expected = [], {}
    for family, head in cases:
        model = pruned_decoder(family, head)
        assert kept_kv_heads(model) == KEPT_KV
        assert isinstance(model.model.layers[0].self_attn, HeadlessAttention)
        assert isinstance(model.model.layers[2].mlp, HeadlessMLP)
        folder = cahp.save_pruned(model, None, tmp_path / f"{family}-{head}")
        with torch.no_grad():
            want = {"logits": model(**inputs).logits, "parameters": cahp.count_parameters(model)}
        causal = head == "causal-lm"
        if causal:
            want["generated"] = greedy(model, prompt)
            assert torch.equal(want["generated"], greedy(model, prompt, use_cache=False))  # the reference itself
            want["cache_heads"] = cache_heads(model, prompt)
            assert want["cache_heads"] == [len(KEPT_KV[i]) for i in range(LAYERS)]
        expected[family, head] = want
        auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
        jobs.append({"auto": auto, "folder": str(folder), "batch": str(tmp_path / "batch.pt"),
                     "prompt": str(tmp_path / "prompt.pt"), "generate": NEW_TOKENS if causal else 0,
                     "out": str(tmp_path / f"{family}-{head}.pt")})
    run_without_cahp(tmp_path, jobs)
    for (family, head), want in expected.items():
        got = torch.load(tmp_path / f"{family}-{head}.pt")
        msg = f"{family} {head}"
        torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=0, msg=msg)
        assert got["parameters"] == want["parameters"], msg
        if "generated" in want:
            assert got["generated"].shape == (2, 9 + NEW_TOKENS), msg
            assert torch.equal(got["generated"], want["generated"]), msg
            assert got["cache_heads"] == want["cache_heads"], msg  # the KV cache holds the kept KV heads only


def test_folder_declares_cahp_llama_and_carries_the_code(tmp_path):
    folder = cahp.save_pruned(pruned_decoder(), None, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cahp-llama"
    assert config["architectures"] == ["CahpLlamaForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cahp.CahpLlamaConfig",
        "AutoModel": "modeling_cahp.CahpLlamaModel",
        "AutoModelForCausalLM": "modeling_cahp.CahpLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_cahp.CahpLlamaForSequenceClassification",
    }
    assert config["num_key_value_heads"] == KV_HEADS  # the original count: the kept ones follow from the heads
    assert config["cahp_kept_heads"] == {"0": [], "1": [0, 2, 5], "2": [3, 4, 5], "3": [1, 2, 4, 5]}
    assert config["cahp_kept_neurons"]["counts"] == [D_FF - 5, D_FF - 40, 0, D_FF - 17]
    for name in ("configuration_cahp.py", "modeling_cahp.py"):
        code = (folder / name).read_text()
        assert "import cahp" not in code and "from cahp" not in code


@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForCausalLM"])
def test_plain_from_pretrained_asks_for_trust_remote_code(tmp_path, auto):
    folder = cahp.save_pruned(pruned_decoder(), None, tmp_path / "m")
    with pytest.raises(ValueError, match="trust_remote_code"):
        getattr(transformers, auto).from_pretrained(folder)


def test_in_process_remote_classes_follow_the_layout(tmp_path):
    """The bare decoder from the folder: each layer's stand-in or forward, hidden states, cached generation."""
    model = pruned_decoder("qwen2")
    folder = cahp.save_pruned(model, None, tmp_path / "m")
    bare = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    attn = [layer.self_attn for layer in bare.layers]
    assert type(attn[0]).__name__ == "CahpHeadlessAttention"
    assert type(attn[1]).__name__ == "CahpGroupedQwen2Attention" and attn[1].cahp_kv_index == (0, 0, 1)
    assert type(attn[2]).__name__ == "Qwen2Attention" and attn[2].num_key_value_groups == 3
    assert type(attn[3]).__name__ == "Qwen2Attention" and attn[3].num_key_value_groups == 2
    assert type(bare.layers[2].mlp).__name__ == "CahpHeadlessMLP"
    inputs = batch(left_pad=True, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(bare(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state,
                                   atol=1e-5, rtol=0)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(greedy(lm, inputs), greedy(lm, inputs, use_cache=False))
    static = lm.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         cache_implementation="static")
    assert torch.equal(static, greedy(model, inputs))
    # The eager kernel reads num_key_value_groups through repeat_kv; padded query rows differ between kernels.
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                              attn_implementation="eager").eval()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits[real], model(**inputs).logits[real], atol=1e-5, rtol=0)


def test_load_pruned_round_trip_is_identical(tmp_path):
    model = pruned_decoder()
    folder = cahp.save_pruned(model, None, tmp_path / "m")
    again, _ = cahp.load_pruned(folder, with_tokenizer=False)
    assert type(again).__name__ == "LlamaForCausalLM"
    assert again.config.model_type == "llama" and not hasattr(again.config, "auto_map")
    assert cahp.kept_heads(again) == cahp.kept_heads(model) and kept_kv_heads(again) == KEPT_KV
    assert cahp.count_parameters(again) == cahp.count_parameters(model)
    inputs, prompt = batch(left_pad=False, seed=3), batch(left_pad=True, seed=3)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
    assert torch.equal(greedy(again, prompt), greedy(model, prompt))
    # Saved again, the folder is the same self-contained form.
    second = json.loads((cahp.save_pruned(again, None, tmp_path / "m2") / "config.json").read_text())
    assert second["model_type"] == "cahp-llama" and second["architectures"] == ["CahpLlamaForCausalLM"]


def test_load_pruned_reads_old_format_decoder_folder(tmp_path):
    """A decoder folder written before remote code: family model type, no auto_map, no code files."""
    model = pruned_decoder("mistral")
    folder = tmp_path / "old"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)  # the kept heads and neurons are on the config already
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mistral"
    assert not (folder / "modeling_cahp.py").exists()
    again, _ = cahp.load_pruned(folder, with_tokenizer=False)
    assert type(again).__name__ == "MistralForCausalLM" and kept_kv_heads(again) == KEPT_KV
    inputs = batch(left_pad=True, seed=4)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
    assert torch.equal(greedy(again, inputs), greedy(model, inputs))


def test_remote_config_round_trip_for_decoders():
    for family, stem in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral")):
        for arch in (f"{stem}ForCausalLM", f"{stem}ForSequenceClassification", f"{stem}Model"):
            base = {"model_type": family, "architectures": [arch], "hidden_size": HIDDEN}
            remote = to_remote(base)
            assert remote["model_type"] == f"cahp-{family}" and remote["architectures"] == [f"Cahp{arch}"]
            assert remote["auto_map"]["AutoModelForCausalLM"] == f"modeling_cahp.Cahp{stem}ForCausalLM"
            assert from_remote(remote) == base
    # An encoder family gets no causal-LM entry.
    assert "AutoModelForCausalLM" not in to_remote({"model_type": "bert", "architectures": []})["auto_map"]
