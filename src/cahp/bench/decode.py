"""Decode speed of a dense causal LM against a pruned copy: generation with the KV cache, and prefill.

What `cahp compare` measures on a decoder (`cahp.pipelines.compare_decoder`):
greedy `generate` with the KV cache (by default batch 1 and 8, 32 new tokens
after a 16-token random prompt) and one prefill forward (batch 1 x 128 tokens),
the two models interleaved call by call (`cahp.bench.timing.time_round_robin`),
generated tokens per second from the median call, and the median speed ratio
with a 95% bootstrap interval over the aligned repetitions
(`cahp.bench.figures.ratio_ci`). On the CPU with one thread by default.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from cahp.bench.figures import ratio_ci, summarize
from cahp.bench.timing import make_inputs, time_round_robin, torch_runner
from cahp.core.configs import field as cfg_field
from cahp.core.threads import num_threads

__all__ = ["DecodeTimingConfig", "check_timing", "time_decode"]


@dataclass
class DecodeTimingConfig:
    """How the dense decoder and CAHP's pruned ones are timed (generation with the KV cache, and prefill)."""

    seconds: float = cfg_field(20.0, "seconds of interleaved repetitions per measurement (0: no timing)")
    new_tokens: int = cfg_field(32, "tokens generated per call (greedy, with the KV cache)")
    prompt_tokens: int = cfg_field(16, "random prompt tokens per sequence before generation")
    batch_sizes: list[int] = cfg_field([1, 8], "generation batch sizes", metavar="B")
    prefill_tokens: int = cfg_field(128, "tokens of the prefill forward (batch 1; clipped to the positions)")
    threads: int = cfg_field(1, "torch threads while timing")
    device: str = cfg_field("cpu", "device the timed copies run on")
    min_reps: int = cfg_field(5, "fewest repetitions per measurement, whatever the seconds")
    max_reps: int = cfg_field(200, "most repetitions per measurement")
    n_bootstrap: int = cfg_field(2000, "bootstrap resamples of each ratio's interval")


def check_timing(timing: DecodeTimingConfig) -> None:
    """Refuse timing settings that cannot run (one-line ValueErrors), before any model loads."""
    if timing.seconds < 0:
        raise ValueError(f"the timing seconds must be >= 0 (0: no timing), got {timing.seconds}")
    counts = {"new_tokens": timing.new_tokens, "prompt_tokens": timing.prompt_tokens,
              "prefill_tokens": timing.prefill_tokens, "threads": timing.threads, "min_reps": timing.min_reps,
              "n_bootstrap": timing.n_bootstrap, "batch size": min(timing.batch_sizes, default=0)}
    bad = [f"{k} {v}" for k, v in counts.items() if v < 1]
    if bad:
        raise ValueError(f"timing counts must be at least 1, got {', '.join(bad)}")
    if timing.max_reps < timing.min_reps:
        raise ValueError(f"timing max_reps {timing.max_reps} is below min_reps {timing.min_reps}")


def _pair(times: dict[str, list[float]], batch: int, seq: int, n_bootstrap: int) -> dict:
    """Dense and pruned summaries (`summarize`: median ms, tokens/s) and the speed ratio dense / pruned time
    (> 1: the pruned model is faster) with its 95% bootstrap interval over the aligned repetitions."""
    d, p = times["dense"], times["pruned"]
    return {"dense": summarize(d, batch, seq), "pruned": summarize(p, batch, seq),
            "speedup": float(np.median(d) / np.median(p)), "speedup_ci95": ratio_ci(d, p, n_bootstrap)}


def time_decode(dense: nn.Module, pruned: nn.Module, timing: DecodeTimingConfig, pad_token_id: int,
                seed: int = 0) -> dict:
    """Decode throughput and prefill latency of copies of ``dense`` and ``pruned`` on ``timing.device``.

    Decode: greedy `generate` with the KV cache of exactly ``new_tokens`` tokens after a random prompt of
    ``prompt_tokens`` (batch ``b`` for each of ``batch_sizes``), so a call's time is its prompt's prefill plus
    ``new_tokens`` steps and ``tokens_per_s`` = b x new_tokens / median call. Prefill: one forward of batch 1 x
    ``prefill_tokens`` (clipped to the model's positions). The two models run interleaved call by call
    (`time_round_robin`, ``timing.threads`` torch threads). Returns ``{"decode": {b: pair}, "prefill": pair,
    "settings"}`` with each pair as `_pair` makes it.
    """
    models = {"dense": copy.deepcopy(dense).to(timing.device).eval(),
              "pruned": copy.deepcopy(pruned).to(timing.device).eval()}
    limit = getattr(dense.config, "max_position_embeddings", None) or timing.prefill_tokens
    prompt = min(timing.prompt_tokens, max(1, limit - timing.new_tokens))
    # a GPU runs asynchronously: each timed call ends when its kernels have
    sync = torch.cuda.synchronize if str(timing.device).startswith("cuda") else None
    reps = {"warmup": 1, "budget_s": timing.seconds, "min_reps": timing.min_reps, "max_reps": timing.max_reps,
            "sync": sync}
    out: dict = {"decode": {}, "settings": {**asdict(timing), "prompt_tokens_used": prompt}}
    n = timing.new_tokens
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "use_cache": True,
          "pad_token_id": pad_token_id}
    with num_threads(timing.threads):  # the caller's count is back afterwards, also on an error
        for b in timing.batch_sizes:
            inputs = make_inputs(models["dense"], b, prompt, timing.device, seed)

            def generate(m, inputs=inputs):
                with torch.inference_mode():
                    return m.generate(**inputs, **kw)

            runners = {name: (lambda m=m: generate(m)) for name, m in models.items()}
            out["decode"][str(b)] = _pair(time_round_robin(runners, **reps), b, n, timing.n_bootstrap)
        seq = min(timing.prefill_tokens, limit)
        inputs = make_inputs(models["dense"], 1, seq, timing.device, seed)
        runners = {name: torch_runner(m, inputs) for name, m in models.items()}
        out["prefill"] = _pair(time_round_robin(runners, **reps), 1, seq, timing.n_bootstrap)
        out["settings"]["prefill_tokens_used"] = seq
    return out
