"""Latency of dense, pruned and attention-free models (and of generation, for decoders).

- `config`: `BenchConfig` (how models are timed), shapes, devices;
- `variants`: the models timed (random and uniform selections, the attention-free floor, inference preparation);
- `macs`: analytic multiply-add counts;
- `timing`: inputs, runners, interleaved round-robin repetitions, the kernel choice;
- `figures`: floor-relative figures, bootstrap intervals, summaries;
- `latency`: `bench_models` and `run_bench`, the benchmark itself;
- `sweep`: `head_count_sweep`, one attention block's cost against its head count;
- `report`: plain-text and markdown tables;
- `decode`: a generative decoder's timing (`DecodeTimingConfig`, `time_decode`: decode throughput and prefill latency,
  dense against pruned, interleaved).
"""

from cahp.bench.config import BenchConfig, BenchError, parse_shapes
from cahp.bench.latency import bench_models, run_bench
from cahp.bench.macs import count_macs
from cahp.bench.report import format_sweep, format_table
from cahp.bench.sweep import head_count_sweep
from cahp.bench.variants import no_attention_model, prepare_for_inference, random_removal

__all__ = [
    "BenchConfig",
    "BenchError",
    "bench_models",
    "count_macs",
    "format_sweep",
    "format_table",
    "head_count_sweep",
    "no_attention_model",
    "parse_shapes",
    "prepare_for_inference",
    "random_removal",
    "run_bench",
]
