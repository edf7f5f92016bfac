"""Analytic multiply-add counts of one forward pass (attention projections, scores, feed-forward, the rest)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from cahp.arch import get_adapter


def _linear_macs(modules: Iterable[nn.Module]) -> int:
    return sum(m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear))


def count_macs(model: nn.Module, batch: int, seq: int) -> dict:
    """Analytic multiply-add count of one forward pass on ``batch`` x ``seq`` tokens.

    Per layer with ``h`` heads of size ``d`` (hidden size ``D``, ``N = batch*seq``):
    projections q, k, v, o ``4*N*D*h*d``; scores q k^T and probabilities x v
    ``2*batch*h*seq^2*d``; feed-forward ``N`` x (the layer's other Linear
    weights, ``2*D*F``). Outside the layers: Linear layers of the embeddings
    (per token, e.g. ELECTRA's projection) and of the pooler/classifier (per
    sequence, on the first token). Softmax, LayerNorm, biases and lookups are
    not multiply-adds.
    """
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    n_tok = batch * seq
    layers_out = []
    in_layers: set[int] = set()
    for layer in adapter.layers(model):
        lh = adapter.heads(layer)
        projections = [m for m in (lh.q, lh.k, lh.v, lh.o) if m is not None]
        heads = lh.q.out_features // d if lh.q is not None else 0
        proj_ids = {id(m) for m in projections}
        others = [m for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in proj_ids]
        in_layers.update(id(m) for m in layer.modules())
        layers_out.append(
            {
                "heads": heads,
                "attention_projections": n_tok * _linear_macs(projections),
                "attention_scores": 2 * batch * heads * seq * seq * d,
                "ffn": n_tok * _linear_macs(others),
            }
        )
    embed_macs = head_macs = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in in_layers:
            if "embeddings" in name.split("."):
                embed_macs += n_tok * m.in_features * m.out_features
            else:
                head_macs += batch * m.in_features * m.out_features
    attention = sum(x["attention_projections"] + x["attention_scores"] for x in layers_out)
    ffn = sum(x["ffn"] for x in layers_out)
    total = attention + ffn + embed_macs + head_macs
    return {
        "total": total,
        "attention": attention,
        "ffn": ffn,
        "embeddings": embed_macs,
        "head": head_macs,
        "attention_share": attention / total if total else 0.0,
        "layers": layers_out,
    }
