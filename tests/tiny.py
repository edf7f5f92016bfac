"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("bert", "roberta", "electra", "distilbert", "mpnet")
N_LAYERS, N_HEADS, HEAD_DIM = 3, 4, 8


def tiny_config(family: str, num_labels: int = 3, attn: str = "eager"):
    hidden = N_HEADS * HEAD_DIM
    if family == "mpnet":
        attn = "eager"  # transformers has no sdpa path for MPNet
    common = dict(vocab_size=99, num_labels=num_labels, attn_implementation=attn)
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(
            dim=hidden,
            n_layers=N_LAYERS,
            n_heads=N_HEADS,
            hidden_dim=64,
            max_position_embeddings=64,
            **common,
        )
    else:
        cls = {
            "bert": transformers.BertConfig,
            "roberta": transformers.RobertaConfig,
            "electra": transformers.ElectraConfig,
            "mpnet": transformers.MPNetConfig,
        }[family]
        extra = {"embedding_size": hidden} if family == "electra" else {}
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=1 if family in ("roberta", "mpnet") else 0,
            **extra,
            **common,
        )
    return cfg


def tiny_model(family: str, num_labels: int = 3, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels, attn))
    if family == "mpnet":
        # Random init leaves the relative position bias near zero; make it matter in tests.
        with torch.no_grad():
            model.mpnet.encoder.relative_attention_bias.weight.normal_(0, 1.0)
    return model.eval()


def tiny_batch(seed: int = 0, batch: int = 4, seq: int = 10, vocab: int = 99):
    """Random ids with uneven right padding (row i has seq - i real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        real = max(2, seq - 2 * i)
        mask[i, real:] = 0
        ids[i, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}
