"""Divergences between attention heads' attention distributions.

Every head gives, for every real (non-padding) query row, a probability distribution over the
key positions of its sequence. Two heads are compared row by row and the per-row divergences are
averaged over all real rows seen (CAHP step 2, see ``docs/METHOD.md``).

Input convention (one batch): ``P`` of shape ``(R, H, K)``

* ``R`` real query rows (padded query rows already dropped),
* ``H`` heads (all heads of all layers flattened, layer-major: ``h = layer * heads_per_layer + head``),
* ``K`` key positions; padded keys hold exact zeros and every ``P[r, h]`` sums to 1.

``K`` may differ between batches. Padded keys contribute exactly nothing to any divergence, so the
result does not depend on how much padding a batch had.

Kinds (per-row divergence D(p, q); unit; range):

* ``"js"``: Jensen-Shannon ``H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``;
  nats; ``[0, ln 2]`` (ln 2 ~ 0.693 for disjoint supports).
* ``"hellinger"``: ``sqrt(max(0, 1 - BC))`` with the Bhattacharyya coefficient
  ``BC = sum_k sqrt(p_k q_k)``; dimensionless; ``[0, 1]``.
* ``"jm"``: Jeffries-Matusita ``sqrt(2 (1 - BC)) = sqrt(2) * hellinger``; dimensionless;
  ``[0, sqrt 2]`` (~1.414).
* ``"skl"``: symmetric KL ``KL(p||q) + KL(q||p) = sum_k (p_k - q_k)(log p_k - log q_k)``; nats;
  ``[0, 2 ln(1/eps)]`` (~36.8 with ``eps = 1e-8``; unbounded without the eps floor).

Numerical notes

* The big products run in ``compute_dtype`` (float32 by default); row sums are accumulated in
  float64. ``compute_dtype=torch.float64`` is available for reference-grade accuracy at roughly
  twice the cost.
* Bhattacharyya-based kinds use ``1 - BC = (BC_pp + BC_qq) / 2 - BC_pq``, i.e. the squared Hellinger
  distance ``sum_k (sqrt p_k - sqrt q_k)^2 / 2`` written with the self-products of the same matrix
  product. That equals ``1 - BC`` for normalised rows and cancels rounding of the row sums, so
  identical heads give (nearly) exactly 0. Even so, because of the square root, float32 rounding
  (~1e-7 in ``1 - BC``) shows up as ~1e-5 (worst case ~1e-3) for heads whose distributions are
  practically identical; use float64 when that matters.
* Symmetric KL clamps probabilities at ``eps = 1e-8`` inside the logarithm only: ``log(max(p, eps))``.
  That keeps the divergence finite when one head puts (numerically) zero mass on a key that the other
  head uses. Keys where both heads are zero (padding) contribute ``0 * log(eps) = 0``.
* All results are symmetric, have an exactly zero diagonal, and tiny negative values from rounding
  are clamped to 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["DISTANCES", "SKL_EPS", "DistanceAccumulator", "row_divergence_sums"]

DISTANCES: tuple[str, ...] = ("js", "hellinger", "jm", "skl")

#: Probability floor used inside the logarithm of the symmetric KL divergence.
SKL_EPS: float = 1e-8

# Upper bound on the number of elements of the largest temporary tensor of one chunk
# (4M float32 elements = 16 MiB): bounds memory and keeps the working set cache-friendly.
_CHUNK_ELEMENTS = 1 << 22
# Jensen-Shannon works on two (rows, H - 1, K) buffers per chunk; ~1M elements each stays in cache.
_JS_CHUNK_ELEMENTS = 1 << 20
_LN2 = math.log(2.0)
_UPPER_BOUND = {"js": _LN2, "hellinger": 1.0, "jm": math.sqrt(2.0), "skl": 2.0 * math.log(1.0 / SKL_EPS)}
# Added to p + q before the logarithm so that keys where both heads are zero give 0 * log(tiny) = 0
# (no NaN); it changes log(p + q) only for p + q below ~1e-23, far below float32 softmax resolution.
_TINY = 1e-30


def _check_kind(kind: str) -> str:
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance kind {kind!r}; valid kinds are {', '.join(DISTANCES)}")
    return kind


def _check_batch(P: torch.Tensor, num_heads: int | None = None) -> None:
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P must be a torch.Tensor of shape (R, H, K), got {type(P).__name__}")
    if P.dim() != 3:
        raise ValueError(f"P must have shape (R, H, K) (rows, heads, keys), got shape {tuple(P.shape)}")
    if not P.is_floating_point():
        raise ValueError(f"P must be a floating-point tensor, got dtype {P.dtype}")
    if num_heads is not None and P.shape[1] != num_heads:
        raise ValueError(f"P has {P.shape[1]} heads (shape {tuple(P.shape)}) but the accumulator expects {num_heads}")


def _auto_chunk_rows(kind: str, H: int, K: int) -> int:
    if kind == "js":
        return max(1, _JS_CHUNK_ELEMENTS // max(1, (H - 1) * K))
    per_row = max(H * H, H * max(1, K))
    return max(1, _CHUNK_ELEMENTS // per_row)


def _js_chunk(Pc: torch.Tensor, out: torch.Tensor) -> None:
    """Add sum over rows of JS(P[r, h], P[r, g]) for h < g of a chunk into ``out`` (upper triangle).

    Pc: ``(c, H, K)``; out: ``(H, H)`` float64. Uses, with ``s = p + q`` and ``m = s / 2``,
    ``sum_k m log m = (sum_k s log s - ln 2 * sum_k s) / 2`` so that
    ``JS = (a_p + a_q - sum_k s log s) / 2`` with ``a_p = sum_k p log p + ln 2 * sum_k p``.
    One logarithm per (row, pair, key); heads are looped over so that every step is a broadcast
    (no gather) into preallocated buffers.
    """
    # Keys that are zero for every row and head of the chunk (common padding) contribute nothing.
    live = Pc.amax(dim=(0, 1)) > 0
    if not bool(live.all()):
        Pc = Pc[:, :, live].contiguous()
    c, H, K = Pc.shape
    a = torch.xlogy(Pc, Pc).sum(dim=-1).add_(Pc.sum(dim=-1), alpha=_LN2)  # (c, H)
    s_buf = torch.empty(c * (H - 1) * K, dtype=Pc.dtype, device=Pc.device)
    l_buf = torch.empty_like(s_buf)
    for h in range(H - 1):
        w = H - 1 - h
        s = s_buf[: c * w * K].view(c, w, K)
        torch.add(Pc[:, h + 1 :], Pc[:, h : h + 1], out=s)  # p_h + p_g for g > h: (c, w, K)
        slogs = l_buf[: c * w * K].view(c, w, K)
        torch.add(s, _TINY, out=slogs)  # 0 * log(tiny) = 0 where both are zero
        slogs.log_().mul_(s)
        js = (a[:, h + 1 :] + a[:, h : h + 1]).sub_(slogs.sum(dim=-1)).mul_(0.5)  # (c, w)
        out[h, h + 1 :] += js.clamp_(min=0).sum(dim=0, dtype=torch.float64)


def _bc_chunk(Pc: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum over rows of the Hellinger / JM distance for a chunk. Pc: (c, H, K). Returns (H, H) float64."""
    S = Pc.sqrt()
    G = torch.bmm(S, S.transpose(1, 2))  # (c, H, H): BC for every head pair
    d = torch.diagonal(G, dim1=1, dim2=2)  # (c, H): sum_k p_k (= 1 up to rounding)
    one_minus_bc = (d.unsqueeze(2) + d.unsqueeze(1)).mul_(0.5).sub_(G)
    one_minus_bc.clamp_(min=0.0, max=1.0)
    if kind == "jm":
        one_minus_bc.mul_(2.0)
    return one_minus_bc.sqrt_().sum(dim=0, dtype=torch.float64)


def _skl_chunk(Pc: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the symmetric KL for a chunk. Pc: (c, H, K). Returns (H, H) float64."""
    L = Pc.clamp(min=SKL_EPS).log_()
    C = torch.bmm(Pc, L.transpose(1, 2))  # (c, H, H): C[h, g] = sum_k p_h log q_g
    d = torch.diagonal(C, dim1=1, dim2=2)  # (c, H): sum_k p log p
    skl = (d.unsqueeze(2) + d.unsqueeze(1)).sub_(C).sub_(C.transpose(1, 2))
    return skl.clamp_(min=0).sum(dim=0, dtype=torch.float64)


def row_divergence_sums(
    P: torch.Tensor,
    kind: str = "js",
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum over query rows of the divergence between every pair of heads.

    Args:
        P: ``(R, H, K)`` attention probabilities: ``R`` real query rows, ``H`` heads, ``K`` keys.
            Each ``P[r, h]`` is a distribution over the keys (exact zeros on padded keys).
        kind: one of :data:`DISTANCES` (see the module docstring for units and bounds).
        chunk_rows: rows processed at once; ``None`` picks a size that bounds the temporaries:
            about 4M elements for the ``(rows, H, H)`` products, and about 1M elements for each
            of the two ``(rows, H - 1, K)`` buffers of ``"js"``.
            The result does not depend on it beyond floating-point rounding.
        compute_dtype: dtype of the per-row computation (float32 default, or float64).

    Returns:
        ``(H, H)`` float64 tensor on ``P``'s device: ``out[h, g] = sum_r D(P[r, h], P[r, g])``.
        Symmetric, zero diagonal, nonnegative, finite.
    """
    _check_kind(kind)
    _check_batch(P)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    R, H, K = P.shape
    out = torch.zeros(H, H, dtype=torch.float64, device=P.device)
    if R == 0 or H < 2:
        return out
    if chunk_rows is None:
        chunk_rows = _auto_chunk_rows(kind, H, K)
    elif isinstance(chunk_rows, bool) or int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)
    if K == 0:
        raise ValueError(f"P has no key positions (shape {tuple(P.shape)})")

    if kind == "js":
        for start in range(0, R, chunk_rows):
            _js_chunk(P[start : start + chunk_rows].to(compute_dtype), out)
        out = out + out.T
    else:
        for start in range(0, R, chunk_rows):
            Pc = P[start : start + chunk_rows].to(compute_dtype)
            out += _skl_chunk(Pc) if kind == "skl" else _bc_chunk(Pc, kind)
        out = (out + out.T) * 0.5  # exact symmetry regardless of matmul rounding
    out.fill_diagonal_(0.0)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"non-finite {kind} divergence: P contains NaN/inf or negative values (shape {tuple(P.shape)})"
        )
    # Rounding can push a per-row value a few ulps outside [0, bound]; keep the mean inside it.
    return out.clamp_(min=0.0, max=R * _UPPER_BOUND[kind])


class DistanceAccumulator:
    """Running mean over query rows of head-to-head divergences, batch by batch.

    ``sums`` is the ``(H, H)`` float64 tensor of summed per-row divergences and ``count`` the number
    of rows (a Python ``int``). Both are plain attributes so that distributed runs can all-reduce
    them (``dist.all_reduce(acc.sums)``; ``count`` via a one-element tensor) and then call
    :meth:`result`. :meth:`state_dict` / :meth:`load_state_dict` allow resuming a run.

    Args:
        num_heads: total number of heads ``H`` (all layers, layer-major).
        kind: one of :data:`DISTANCES`.
        device: device of ``sums`` (default CPU); batches are processed on their own device and the
            row sums moved here.
        chunk_rows: forwarded to :func:`row_divergence_sums`.
        compute_dtype: forwarded to :func:`row_divergence_sums`.
    """

    def __init__(
        self,
        num_heads: int,
        kind: str = "js",
        device: torch.device | str | None = None,
        chunk_rows: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(num_heads, bool) or int(num_heads) != num_heads or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        self.num_heads = int(num_heads)
        self.kind = _check_kind(kind)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_rows = chunk_rows
        self.compute_dtype = compute_dtype
        self.sums = torch.zeros(self.num_heads, self.num_heads, dtype=torch.float64, device=self.device)
        self.count = 0

    def add_batch(self, P: torch.Tensor) -> None:
        """Add one batch. ``P``: ``(R, H, K)`` with ``H == num_heads``; ``K`` may vary between batches."""
        _check_batch(P, self.num_heads)
        if P.shape[0] == 0:
            return
        s = row_divergence_sums(P, self.kind, chunk_rows=self.chunk_rows, compute_dtype=self.compute_dtype)
        self.sums += s.to(self.device)
        self.count += int(P.shape[0])

    def result(self) -> torch.Tensor:
        """Mean divergence over all rows seen: ``(H, H)`` float64 (symmetric, zero diagonal)."""
        if self.count <= 0:
            raise ValueError(f"DistanceAccumulator({self.kind!r}) has seen no rows; call add_batch first")
        return self.sums / self.count

    def merge(self, other: DistanceAccumulator) -> DistanceAccumulator:
        """Add another accumulator's rows into this one (same kind and head count). Returns ``self``."""
        if not isinstance(other, DistanceAccumulator):
            raise TypeError(f"can only merge a DistanceAccumulator, got {type(other).__name__}")
        if other.kind != self.kind or other.num_heads != self.num_heads:
            raise ValueError(
                f"cannot merge accumulator (kind={other.kind!r}, num_heads={other.num_heads}) into "
                f"(kind={self.kind!r}, num_heads={self.num_heads})"
            )
        self.sums += other.sums.to(self.device)
        self.count += other.count
        return self

    def state_dict(self) -> dict[str, Any]:
        """Serializable state: ``kind``, ``num_heads``, ``sums`` (CPU float64 copy) and ``count``."""
        return {
            "kind": self.kind,
            "num_heads": self.num_heads,
            "sums": self.sums.detach().cpu().clone(),
            "count": int(self.count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; kind and shape must match this accumulator."""
        missing = {"kind", "sums", "count"} - set(state)
        if missing:
            raise ValueError(f"state dict is missing keys: {sorted(missing)}")
        if state["kind"] != self.kind:
            raise ValueError(f"state dict is for kind {state['kind']!r}, accumulator is {self.kind!r}")
        sums = torch.as_tensor(state["sums"], dtype=torch.float64)
        if tuple(sums.shape) != (self.num_heads, self.num_heads):
            raise ValueError(
                f"state dict sums have shape {tuple(sums.shape)}, expected ({self.num_heads}, {self.num_heads})"
            )
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"state dict count must be >= 0, got {count}")
        self.sums = sums.to(self.device).clone()
        self.count = count

    def __repr__(self) -> str:
        return f"DistanceAccumulator(num_heads={self.num_heads}, kind={self.kind!r}, count={self.count})"
