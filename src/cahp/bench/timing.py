"""Timing: random inputs, one runner per model, interleaved round-robin repetitions, the kernel choice.

Models are interleaved within every repetition (the starting model rotates), so
a slow stretch of the machine touches every model alike; the per-call times of
one repetition stay aligned across models for the paired figures of
`cahp.bench.figures`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.arch.base import ATTENTION_KERNELS
from cahp.bench.config import CLOCKS, BenchConfig, BenchError
from cahp.core.allocator import hold_freed_memory, memory_held


def time_round_robin(
    runners: Mapping[str, Callable[[], object]],
    reps: int | None = None,
    warmup: int = 2,
    budget_s: float = 20.0,
    min_reps: int = 10,
    max_reps: int = 200,
    sync: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Per-call latencies (s) of each runner, interleaved round-robin.

    Each repetition runs every runner once; the starting runner rotates so no
    model always follows the same one. ``reps=None`` repeats until
    ``budget_s`` has passed (at least ``min_reps``, at most ``max_reps``).
    ``clock="cpu"`` measures the process's CPU time instead of wall time: work
    rather than latency (summed over threads), but much less disturbed by
    other jobs on a busy machine.
    """
    if clock not in CLOCKS:
        raise BenchError(f"unknown clock {clock!r}; choose {' or '.join(CLOCKS)}")
    timer = CLOCKS[clock]
    names = list(runners)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    # Outside the timed calls. Without reps the budget usually ends the loop long before max_reps,
    # so the bar counts the budget's seconds (its estimate of the end is then right).
    by_time = reps is None
    bar = tqdm(total=round(budget_s) if by_time else reps, desc="timing", unit="s" if by_time else "rep",
               mininterval=10, leave=False)
    start = time.perf_counter()
    r = 0
    while True:
        if reps is not None and r >= reps:
            break
        if reps is None and r >= min_reps and (r >= max_reps or time.perf_counter() - start > budget_s):
            break
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            sync()
            t0 = timer()
            runners[name]()
            sync()
            times[name].append(timer() - t0)
        r += 1
        if by_time:
            bar.update(min(round(time.perf_counter() - start), bar.total) - bar.n)
            bar.set_postfix_str(f"{r} repetitions", refresh=False)
        else:
            bar.update()
    bar.close()
    return times


def time_models(
    runners: Mapping[str, Callable[[], object]], cfg: BenchConfig, sync: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """`time_round_robin` with the repetition settings of ``cfg``."""
    return time_round_robin(runners, sync=sync, **cfg.timing())


def make_inputs(model: nn.Module, batch: int, seq: int, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids (no special tokens), every token real; token_type_ids when the model takes them."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    low = min(5, vocab - 1)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if "token_type_ids" in get_adapter(model).input_names(model.config):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {k: v.to(device) for k, v in inputs.items()}


def torch_runner(model: nn.Module, inputs: dict) -> Callable[[], object]:
    """One call of ``model`` on ``inputs`` without autograd."""

    def run():
        with torch.inference_mode():
            return model(**inputs)

    return run


def onnx_runner(session, inputs: dict) -> Callable[[], object]:
    """One call of an onnxruntime ``session`` on the ``inputs`` its graph takes."""
    feed = {k: v.cpu().numpy() for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}

    def run():
        return session.run(None, feed)

    return run


def apply_allocator(hold_memory: bool) -> str:
    """Apply the allocator policy; say what holds in this process (for the result)."""
    if hold_memory:
        hold_freed_memory()
    if memory_held():  # process-wide and permanent, whatever this call asked
        return "glibc, freed memory held (cahp.core.allocator.hold_freed_memory)"
    return "C library default" + (" (holding freed memory is glibc-only)" if hold_memory else "")


def choose_kernel(
    models: Sequence[nn.Module], kernel: str, inputs: dict, sync, warmup: int, candidates: dict, clock: str = "wall"
) -> tuple[str, dict | None]:
    """The kernel every model runs with; for "auto", the fastest for the first (dense) model at this shape.

    ``candidates`` caches one copy of the dense model per kernel (filled on first use).
    Every model of ``models`` is switched to the chosen kernel.
    """
    if kernel == "auto":
        if not candidates:
            for k in ATTENTION_KERNELS:
                m = copy.deepcopy(models[0])
                get_adapter(m).set_attention_kernel(m, k)
                candidates[k] = m
        runners = {k: torch_runner(m.to(inputs["input_ids"].device), inputs) for k, m in candidates.items()}
        times = time_round_robin(runners, reps=7, warmup=warmup, sync=sync, clock=clock)
        calib = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        chosen = min(calib, key=calib.get)
    else:
        chosen, calib = kernel, None
    for m in models:
        get_adapter(m).set_attention_kernel(m, chosen)
    return chosen, calib
