"""How a latency benchmark times its models: `BenchConfig`, shapes, devices, reserved labels.

One definition of every timing setting, shared by `cahp bench`, `bench_models`,
`head_count_sweep` and ``benchmarks/bench_latency.py`` (through
`cahp.core.configs.add_dataclass_args`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cahp.arch.base import ATTENTION_KERNELS
from cahp.core.configs import field as cfg_field

#: Labels of the two yardsticks, and the prefixes of a model's onnxruntime copies (fp32, int8).
DENSE, NO_ATTENTION = "dense", "no_attention"
ONNX_PREFIX = "onnx:"
INT8_PREFIX = "onnx-int8:"
#: (batch, sequence) pairs timed by default.
DEFAULT_SHAPES = ((1, 32), (1, 128), (32, 32), (32, 128))
#: Clock names -> the function read before and after each call.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KERNEL_POLICIES = ("auto", *ATTENTION_KERNELS)


class BenchError(ValueError):
    """A benchmark request that cannot be run (bad ratio, mismatched models...)."""


def format_shapes(shapes: Sequence[tuple[int, int]]) -> str:
    """[(1, 32), (32, 128)] -> ``"1x32,32x128"`` (the form `parse_shapes` reads)."""
    return ",".join(f"{b}x{s}" for b, s in shapes)


def parse_shapes(text: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``"1x32,32x128"`` -> [(1, 32), (32, 128)] (batch x sequence); a list of pairs passes through."""
    if not isinstance(text, str):
        return [(int(b), int(s)) for b, s in text]
    shapes = []
    for part in text.split(","):
        try:
            b, s = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise BenchError(f"bad shape {part!r}: write BATCHxSEQUENCE, e.g. 32x128") from None
        if b < 1 or s < 1:
            raise BenchError(f"bad shape {part!r}: batch and sequence must be positive")
        shapes.append((b, s))
    return shapes


def resolve_devices(devices: str | Sequence[str]) -> list[str]:
    """Device names to time on, in order, without repeats; "auto" is cpu plus cuda when torch sees a GPU."""
    if isinstance(devices, str):
        devices = [devices]
    out = []
    for d in devices:
        if d == "auto":
            out.append("cpu")
            if torch.cuda.is_available():
                out.append("cuda")
        elif d == "cpu" or d.startswith("cuda"):
            if d.startswith("cuda") and not torch.cuda.is_available():
                raise BenchError(f"device {d!r} asked for, but torch sees no GPU")
            out.append(d)
        else:
            raise BenchError(f"unknown device {d!r}; use cpu, cuda or auto")
    return list(dict.fromkeys(out))


@dataclass
class BenchConfig:
    """How models are timed (what is timed comes with the call: models, or a model name and a selection)."""

    shapes: str = cfg_field(format_shapes(DEFAULT_SHAPES), "BATCHxSEQUENCE list, comma separated")
    device: str = cfg_field("auto", "cpu, cuda, or auto: cpu plus cuda when present")
    seed: int = cfg_field(0, "seed of the random selections and the inputs")
    threads: int | None = cfg_field(2, "CPU threads for torch and onnxruntime")
    kernel: str = cfg_field(
        "auto", "attention kernel of every model; auto: the dense model's fastest per shape",
        choices=list(KERNEL_POLICIES),
    )
    reps: int | None = cfg_field(None, "timed repetitions (none: as many as --budget allows)")
    budget: float = cfg_field(20.0, "seconds of timing per shape without --reps")
    min_reps: int = cfg_field(10, "at least this many repetitions")
    max_reps: int = cfg_field(200, "at most this many repetitions within --budget")
    warmup: int = cfg_field(2, "untimed calls of each model first")
    clock: str = cfg_field(
        "wall", "wall: latency; cpu: process CPU time, for a busy machine (work, not latency)", choices=list(CLOCKS)
    )
    malloc_default: bool = cfg_field(
        False,
        "leave the C allocator as it is; by default freed memory is held in the process (glibc), so large "
        "activations are not page-faulted in again on every call",
    )
    onnx: bool = cfg_field(False, "also export to ONNX and time onnxruntime (CPU)")
    int8: bool = cfg_field(
        False, "with --onnx: also time an int8 copy of every ONNX file (onnxruntime dynamic quantisation)"
    )

    def __post_init__(self):
        # Checked here, before any model loads: a bad setting fails in a second, not after the loading.
        if self.kernel not in KERNEL_POLICIES:
            raise BenchError(f"unknown kernel {self.kernel!r}; choose auto or one of {', '.join(ATTENTION_KERNELS)}")
        if self.clock not in CLOCKS:
            raise BenchError(f"unknown clock {self.clock!r}; choose {' or '.join(CLOCKS)}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be at least 1, got {self.threads}")
        if self.reps is not None and self.reps < 1:
            raise BenchError(f"--reps must be at least 1 (or unset: as many as --budget allows), got {self.reps}")
        if self.min_reps < 1 or self.max_reps < self.min_reps:
            raise BenchError(f"need 1 <= --min-reps <= --max-reps, got {self.min_reps} and {self.max_reps}")
        if self.warmup < 0 or self.budget <= 0:
            raise BenchError(f"--warmup must be >= 0 and --budget > 0, got {self.warmup} and {self.budget}")
        if self.int8 and not self.onnx:
            raise BenchError("--int8 times the int8 copy of the ONNX export: add --onnx")
        parse_shapes(self.shapes)

    @property
    def shape_list(self) -> list[tuple[int, int]]:
        """`shapes` as (batch, sequence) pairs."""
        return parse_shapes(self.shapes)

    @property
    def hold_memory(self) -> bool:
        """Keep freed memory in the process (`cahp.core.allocator.hold_freed_memory`) before timing."""
        return not self.malloc_default

    def timing(self) -> dict:
        """The repetition settings as keyword arguments of `time_round_robin`."""
        return {"reps": self.reps, "warmup": self.warmup, "budget_s": self.budget, "min_reps": self.min_reps,
                "max_reps": self.max_reps, "clock": self.clock}
