"""Cost model: what one attention head and one FFN neuron of each layer cost, at a target shape.

A `CostTable` holds, per layer, a `BlockCost` for the attention block (units:
heads) and one for the feed-forward block (units: neurons), each ``fixed +
per_unit * n`` for a block that keeps ``n >= 1`` units and ``empty`` for a
block that keeps none, plus ``rest``: everything else of a forward pass
(embeddings, LayerNorms outside the blocks, pooler and classifier).
`estimated_latency` turns kept counts into a share of the dense model's cost.

Two sources:

- ``"measured"`` (`cahp.budget.cost_measure.measure_table`, seconds): every
  layer's attention block and FFN block are timed at several widths, all of
  them and the whole model interleaved round-robin within every repetition (a
  slowdown of the machine hits every block alike), medians taken, and a line
  fitted through the medians of each block. The attention block is the
  layer's real module after head surgery (whatever kernel the model runs),
  replayed on the inputs it received in one forward pass; an empty attention
  block is the family's residual-only stand-in, timed too. The FFN block is
  the matmul work that neurons carry, ``out(act(inter(x)))``: its residual add
  and LayerNorm stay when the FFN is emptied, so they are part of ``rest`` and
  an empty FFN costs 0. ``rest`` is the median of the whole model minus the
  fitted blocks at the model's own widths.
- ``"macs"`` (`mac_table`, multiply-adds): analytic, the same counts as
  `cahp.bench.macs.count_macs`; no fixed costs.

Measured tables are cached as JSON (`cost_table`), under a key that names
every setting that changes a measurement (model config, shape, threads,
kernel, device, dtype, torch version, machine, widths, repetitions); a cached
file is used only when its stored key equals the requested one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.bench.macs import count_macs
from cahp.core.io import cpu_name, write_json
from cahp.model.heads import kept_heads, model_shape

log = logging.getLogger(__name__)

COST_VERSION = 1  # bump when what a table means changes: older cached files then never match
SOURCES = ("measured", "macs")


class CostModelError(ValueError):
    """A cost table that cannot be built or used (bad shape, counts or source)."""


@dataclass
class BlockCost:
    """Cost of one block as a function of the units it keeps.

    Attributes:
        units: units of the original architecture (heads or neurons).
        fixed: cost of the block once it keeps at least one unit, beyond the per-unit part.
        per_unit: cost of each kept unit.
        empty: cost of the block when it keeps no unit (its residual-only stand-in).
    """

    units: int
    fixed: float
    per_unit: float
    empty: float = 0.0

    def cost(self, n: int) -> float:
        """Cost with ``n`` units kept (0 <= n <= units)."""
        return self.empty if n == 0 else self.fixed + self.per_unit * n


@dataclass
class CostTable:
    """Per-layer block costs at one shape (see the module docstring).

    Attributes:
        source: "measured" (unit "s") or "macs" (unit "macs").
        batch, seq: the shape the costs hold for.
        attention, ffn: one `BlockCost` per layer.
        rest: cost of everything outside the blocks.
        key: the settings the table was made with (`cache_key`); empty for MAC tables.
        details: measured widths and medians per block, for reports.
    """

    source: str
    unit: str
    batch: int
    seq: int
    attention: list[BlockCost]
    ffn: list[BlockCost]
    rest: float
    key: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.attention)

    def dense_total(self) -> float:
        """Cost of the dense model: every block at its original width, plus ``rest``."""
        return self.rest + sum(b.cost(b.units) for b in (*self.attention, *self.ffn))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> CostTable:
        d = dict(d)
        d["attention"] = [BlockCost(**b) for b in d["attention"]]
        d["ffn"] = [BlockCost(**b) for b in d["ffn"]]
        return cls(**d)


def check_shape(batch: int, seq: int) -> None:
    """Raise `CostModelError` unless ``batch`` and ``seq`` are positive integers."""
    for name, v in (("batch", batch), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CostModelError(f"{name} must be a positive integer, got {v!r}")


def attention_block(layer: nn.Module) -> nn.Module:
    """The attention block of ``layer``: the module head surgery and `make_residual_only` replace."""
    # Every supported family calls its attention block `layer.attention`; surgery and
    # make_residual_only replace that module, so it is also what a pruned layer runs.
    return layer.attention


# ---------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------


def _counts(x, blocks: Sequence[BlockCost], what: str) -> list[int]:
    """Kept units per layer from counts, per-layer index lists, or a mapping layer -> either."""
    n_layers = len(blocks)
    if isinstance(x, Mapping):
        missing = sorted(set(range(n_layers)) - {int(k) for k in x})
        if missing:
            raise CostModelError(f"{what} per layer: layers {missing} are missing")
        x = [x.get(i, x.get(str(i))) for i in range(n_layers)]
    x = list(x.tolist() if isinstance(x, (torch.Tensor, np.ndarray)) else x)
    if len(x) != n_layers:
        raise CostModelError(f"{what} per layer: got {len(x)} layers, the cost table has {n_layers}")
    out = []
    for layer, (v, b) in enumerate(zip(x, blocks)):
        n = len(v) if isinstance(v, (list, tuple, set)) else v
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= b.units:
            raise CostModelError(f"layer {layer} keeps {v!r} {what}: expected a count in 0..{b.units}")
        out.append(int(n))
    return out


def _positive_total(table: CostTable) -> float:
    """``table.dense_total()``, which every share divides by: a `CostModelError` unless positive."""
    total = table.dense_total()
    if total <= 0:
        raise CostModelError("the cost table's dense total is not positive")
    return total


def estimated_latency(table: CostTable, heads_per_layer, neurons_per_layer) -> float:
    """Estimated cost of a model keeping these units, as a share of the dense model's (0..1).

    Args:
        table: a `CostTable`.
        heads_per_layer, neurons_per_layer: per layer, a count or the list of kept
            indices (a sequence over layers, or a mapping layer -> count/list).

    Returns:
        1.0 for the dense model; never increases when a unit is removed
        (``per_unit >= 0`` and ``empty <= fixed + per_unit`` in every table).
    """
    heads = _counts(heads_per_layer, table.attention, "heads")
    neurons = _counts(neurons_per_layer, table.ffn, "neurons")
    total = _positive_total(table)
    cost = table.rest
    cost += sum(b.cost(n) for b, n in zip(table.attention, heads))
    cost += sum(b.cost(n) for b, n in zip(table.ffn, neurons))
    return cost / total


def cost_summary(tables: Sequence[CostTable]) -> dict:
    """What a report records of its cost tables, so that two runs' budgets can be compared.

    A table is re-measured whenever its cache is gone, and its noise moves every
    selection made at an estimated share; the summary says what the run's
    tables priced each unit at.

    Returns:
        ``{"source", "shapes": ["BxS", ...], "per_shape": {"BxS": {...}}}`` where each
        shape holds ``machine`` (from the table's key; "" for MAC tables),
        ``dense_total`` (in the table's ``unit``), and ``head_share`` /
        ``neuron_share``: the mean over layers of one unit's ``per_unit`` cost as
        a share of the dense total (what removing one head or one neuron saves
        in the estimate, fixed costs aside).
    """
    if not tables:
        raise CostModelError("no cost table to summarise")
    per_shape = {}
    for t in tables:
        total = _positive_total(t)
        per_shape[f"{t.batch}x{t.seq}"] = {
            "unit": t.unit, "machine": str(t.key.get("machine", "")), "dense_total": total,
            "head_share": float(np.mean([b.per_unit for b in t.attention])) / total,
            "neuron_share": float(np.mean([b.per_unit for b in t.ffn])) / total,
        }
    return {"source": tables[0].source, "shapes": list(per_shape), "per_shape": per_shape}


def unit_counts(model: nn.Module) -> tuple[list[int], list[int]]:
    """Heads and FFN neurons each layer of ``model`` holds now (dense or pruned)."""
    adapter = get_adapter(model)
    kept = kept_heads(model.config)
    heads = [len(kept[i]) for i in range(len(kept))]
    neurons = []
    for layer in adapter.layers(model):
        inter = adapter.ffn(layer).inter
        neurons.append(0 if inter is None else inter.out_features)
    return heads, neurons


# ---------------------------------------------------------------------------
# Multiply-adds
# ---------------------------------------------------------------------------


def mac_table(model: nn.Module, batch: int, seq: int) -> CostTable:
    """Analytic cost table in multiply-adds (``source="macs"``), for the original widths.

    Per layer with hidden size ``D``, head size ``d`` and ``N = batch * seq``
    tokens: a head costs ``4*N*D*d`` (its q, k, v rows and o columns) plus
    ``2*batch*seq^2*d`` (scores and weighted values); a neuron ``2*N*D`` (its
    row of the intermediate projection and column of the output projection).
    No fixed costs. ``rest``: the Linear layers outside the encoder layers, as
    `cahp.bench.macs.count_macs` counts them. For a dense model
    ``dense_total()`` equals that function's total.
    """
    check_shape(batch, seq)
    adapter = get_adapter(model)
    config = model.config
    n_layers, n_heads = model_shape(config)
    d, hidden, d_ff = adapter.head_dim(config), adapter.hidden_size(config), adapter.intermediate_size(config)
    n_tok = batch * seq
    per_head = 4 * n_tok * hidden * d + 2 * batch * seq * seq * d
    per_neuron = 2 * n_tok * hidden
    macs = count_macs(model, batch, seq)
    return CostTable(
        source="macs",
        unit="macs",
        batch=batch,
        seq=seq,
        attention=[BlockCost(n_heads, 0.0, float(per_head)) for _ in range(n_layers)],
        ffn=[BlockCost(d_ff, 0.0, float(per_neuron)) for _ in range(n_layers)],
        rest=float(macs["embeddings"] + macs["head"]),
    )


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def machine() -> str:
    """The hardware a measurement ran on: processor model, cores, architecture, GPU if any."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no gpu"
    return f"{cpu_name()}; {os.cpu_count()} cores; {platform.machine()}; {gpu}"


def _kernel(model: nn.Module) -> str:
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        if hasattr(type(attention_block(layer)), "_cahp_compact_base"):
            return "compact"
    return str(getattr(model.config, "_attn_implementation", None))


def cache_key(model: nn.Module, batch: int, seq: int, threads: int | None = None, widths: int = 3,
              reps: int = 20, seed: int = 0) -> dict:
    """Every setting a measured table depends on; equal keys mean interchangeable tables."""
    p = next(model.parameters())
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {
        "version": COST_VERSION,
        "model": str(getattr(model.config, "name_or_path", "")),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "batch": batch,
        "seq": seq,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "kernel": _kernel(model),
        "device": str(p.device),
        "dtype": str(p.dtype),
        "torch": torch.__version__,
        "machine": machine(),
        "widths": widths,
        "reps": reps,
        "seed": seed,
    }


def default_cache_dir() -> Path:
    """``$CAHP_CACHE_DIR/cost``, else ``~/.cache/cahp/cost``."""
    root = os.environ.get("CAHP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "cahp") / "cost"


def cache_path(key: Mapping, cache_dir: str | os.PathLike) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"cost-{digest}.json"


def cost_table(
    model: nn.Module,
    batch: int = 1,
    seq: int = 32,
    source: str = "measured",
    threads: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    widths: int = 3,
    reps: int = 20,
    seed: int = 0,
) -> CostTable:
    """The cost table of ``model`` at ``batch`` x ``seq``: measured (and cached) or from multiply-adds.

    Args:
        source: "measured" (`cahp.budget.cost_measure.measure_table`) or "macs" (`mac_table`, never
            cached: it is exact and cheap).
        cache: read and write measured tables under ``cache_dir`` (default `default_cache_dir`);
            a file is used only if its stored key equals `cache_key` of this call.
        threads, widths, reps, seed: see `cahp.budget.cost_measure.measure_table`.
    """
    if source not in SOURCES:
        raise CostModelError(f"unknown cost source {source!r}; choose from {', '.join(SOURCES)}")
    if source == "macs":
        return mac_table(model, batch, seq)
    check_shape(batch, seq)
    key = cache_key(model, batch, seq, threads=threads, widths=widths, reps=reps, seed=seed)
    path = cache_path(key, cache_dir if cache_dir is not None else default_cache_dir()) if cache else None
    if path is not None and path.exists():
        try:
            stored = CostTable.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("cost model: ignoring unreadable cache file %s (%s)", path, e)
        else:
            if stored.key == key:
                log.info("cost model: cached table %s", path)
                return stored
            log.warning("cost model: cache file %s was made with other settings; measuring again", path)
    from cahp.budget import cost_measure  # it builds on this module's types: import late

    table = cost_measure.measure_table(model, batch, seq, widths=widths, reps=reps, threads=threads, seed=seed)
    table.key = key
    if path is not None:
        write_json(path, table.to_dict())
    return table
