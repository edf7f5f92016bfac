"""cahp.budget.perplexity: per-sentence NLL sums (`sentence_nll`) against the perplexity; gates against surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp.budget.perplexity import perplexity, sentence_nll
from cahp.data.lm import lm_batches
from cahp.model.surgery import keep_heads

from .test_decoder import tiny_decoder
from .test_decoder_prune import sentences, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sentence_nll_sums_to_the_perplexity_and_gates_equal_surgery():
    model, tok = tiny_decoder(kv_heads=3), tiny_tokenizer()
    batches = lm_batches(tok, sentences(13, seed=3), max_length=16, batch_size=4)
    dense = sentence_nll(model, batches)
    ref = perplexity(model, batches)
    assert len(dense["nll"]) == 13 and sum(dense["tokens"]) == ref["tokens"]
    assert dense["mean_nll"] == pytest.approx(ref["nll"], rel=1e-6)  # float32 sums there, float64 here
    assert dense["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    # a row's tokens: its real length minus one (right padding is never predicted or read)
    lengths = sorted(int(b["attention_mask"][i].sum()) for b in batches for i in range(len(b["input_ids"])))
    assert sorted(dense["tokens"]) == [n - 1 for n in lengths]
    mask = np.zeros((3, 6), dtype=bool)
    mask[0, :2] = mask[2, 2:] = True  # KV group 0 of layer 0, groups 1 and 2 of layer 2, layer 1 empty
    mask = torch.from_numpy(mask)
    gated = sentence_nll(model, batches, mask)
    pruned = sentence_nll(keep_heads(tiny_decoder(kv_heads=3), mask), batches)
    assert gated["tokens"] == pruned["tokens"] == dense["tokens"]
    np.testing.assert_allclose(gated["nll"], pruned["nll"], rtol=1e-5)
    assert not np.allclose(gated["nll"], dense["nll"], rtol=1e-5)  # the gates act
