"""Two CPU processes (gloo, torchrun's environment variables) give the one-process results; only rank 0 writes.

One module-scoped run spawns 2 ranks that compute signatures, salience and
predictions on the tiny model, run a tiny `run_prune` (given fine-tuned model,
no final fine-tuning) and fine-tune a pruned model with an empty layer through
DDP. Each rank records every file it writes (audit hook) and saves its results;
the tests compare them with the same computations in this process.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import cahp
from cahp.core import distributed
from cahp.data.batching import encode, make_batches
from cahp.data.tasks import get_task
from cahp.pipelines.prune import run_prune, split_train
from cahp.selectors.base import HeadStats
from cahp.selectors.cahp import CAHPSelector
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import Signatures, collect_signatures
from cahp.train.evaluate import predict
from cahp.train.finetune import FinetuneConfig, finetune

from .test_pipeline import _cfgs, tiny_setup  # noqa: F401 - tiny_setup is a fixture

WORLD = 2
TIMEOUT_S = 300  # the whole 2-rank run; it takes seconds on an idle machine
EMPTY_LAYER = {1: [0, 1, 2, 3], 0: [2]}  # the DDP test's model keeps no head in layer 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_inputs(root: Path):
    """The tiny model and the pipeline's calibration and test batches (16 per batch)."""
    model, tok = cahp.load_model(str(root / "model"), num_labels=2)
    task = get_task(str(root / "task"))
    train = task.load(task.train_split)
    _, calib_idx, _ = split_train(len(train), 80, 64, 0)
    calib = make_batches(encode(tok, [train[i] for i in calib_idx]), 16, shuffle=False, pad_token_id=0)
    test_ds = encode(tok, task.load(task.test_split))
    test = make_batches(test_ds, 16, shuffle=False, pad_token_id=0)
    return model, tok, task, calib, test, len(test_ds)


def _stats(root: Path) -> dict:
    model, _, _, calib, test, n = _stats_inputs(root)
    sig = collect_signatures(model, calib, kinds=("js", "hellinger"), progress=False)
    sal = gate_gradients(model, calib, progress=False)
    preds, logits = predict(model, test, n, progress=False)
    return {"sig": sig.state_dict(), "sal": sal, "preds": preds, "logits": logits}


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fail():
    raise ValueError("rank 0 failed")


def _helpers() -> dict:
    """The helpers' results on this rank (the same calls as in `test_helpers_one_process`)."""
    items = list(range(7))
    mine = distributed.shard(items)
    total, count = distributed.all_reduce_sum(torch.tensor([float(len(mine)), 1.0]), len(mine))
    try:
        distributed.on_main(_fail)
        error = None
    except ValueError as e:
        error = str(e)
    with distributed.local():
        alone = distributed.shard(items)
    return {
        "shard": mine, "lazy": list(distributed.shard(iter(items))),
        "unshard": distributed.unshard([x * 10 for x in mine]),
        "padded": len(distributed.pad_batches(items)), "sum": total.tolist(), "count": count, "error": error,
        "main": distributed.on_main(distributed.rank), "alone": alone,
    }


def _is_write(args) -> bool:
    _, mode, flags = args
    if isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
        return True
    return isinstance(mode, str) and any(c in mode for c in "wax+")


_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


def _worker(rank: int, port: int, root: Path, work: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    watched = str(work)
    writes: list[str] = []

    def audit(event, args):
        try:
            if event == "open" and _is_write(args) or event in _WRITE_EVENTS:
                path = args[1] if event == "os.rename" else args[0]  # rename: where it lands
                if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(watched):
                    writes.append(f"{event} {os.fsdecode(path)}")
        except Exception:  # noqa: BLE001 - an audit hook must never break the operation
            pass

    sys.addaudithook(audit)
    distributed.init(timeout_s=TIMEOUT_S)
    assert distributed.is_active() and distributed.rank() == rank and distributed.world_size() == WORLD
    result = _stats(root)
    result["helpers"] = _helpers()

    cfg, ft = _cfgs(root, work / "run", finetuned=True, skip_final_finetune=True, keep=5)
    report = run_prune(cfg, ft, progress=False).report
    result["prune"] = {k: report[k] for k in ("kept_heads", "k_star", "curve", "heads_kept")}

    model, tok, task, *_ = _stats_inputs(root)
    cahp.remove_heads(model, EMPTY_LAYER)
    train = task.load(task.train_split)[:150]
    res = finetune(model, tok, task, FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, seed=0),
                   train_examples=train, output_dir=work / "ft", progress=False)
    result["ft"] = {"best_epoch": res.best_epoch, "dev": res.best_dev, "loss": res.history[0]["train_loss"],
                    "digest": _digest(model)}
    result["writes"] = writes
    torch.save(result, work / "results" / f"rank{rank}.pt")
    distributed.barrier()
    distributed.shutdown()


@pytest.fixture(scope="module")
def runs(tiny_setup, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("dist")
    (work / "results").mkdir()
    ctx = mp.start_processes(_worker, args=(_free_port(), tiny_setup, work), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"2-rank run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(work / "results" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: same kernels, same rounding
    try:
        one = _stats(tiny_setup)
        cfg, ft = _cfgs(tiny_setup, work / "one", finetuned=True, skip_final_finetune=True, keep=5)
        one["prune"] = run_prune(cfg, ft, progress=False).report
    finally:
        torch.set_num_threads(threads)
    return {"work": work, "ranks": ranks, "one": one}


def _head_stats(state: dict, sal: dict) -> HeadStats:
    sig = Signatures.from_state_dict(state)
    return HeadStats(head_ids=sig.head_ids, shape=(3, 4), distances=sig.distances, salience=sal["salience"],
                     fisher=sal["fisher"], entropy=sig.entropy)


def test_statistics_equal_one_process(runs):
    one = runs["one"]
    for r in runs["ranks"]:
        for key in ("distance_js", "distance_hellinger", "entropy"):
            torch.testing.assert_close(r["sig"][key], one["sig"][key], rtol=0, atol=1e-6)
        assert r["sig"]["rows"] == one["sig"]["rows"] and r["sig"]["examples"] == one["sig"]["examples"] == 64
        for key in ("salience", "fisher"):
            torch.testing.assert_close(r["sal"][key], one["sal"][key], rtol=1e-6, atol=1e-9)
    # every rank holds the same all-reduced values
    for key in ("distance_js", "entropy"):
        assert torch.equal(runs["ranks"][0]["sig"][key], runs["ranks"][1]["sig"][key])


def test_selected_heads_equal_one_process(runs):
    one = _head_stats(runs["one"]["sig"], runs["one"]["sal"])
    selector = CAHPSelector(distance="js", clustering="spectral", seed=0)
    for r in runs["ranks"]:
        stats = _head_stats(r["sig"], r["sal"])
        for k in (2, 5, 8):
            assert torch.equal(selector.select(k, stats), selector.select(k, one)), k


def test_predictions_equal_one_process(runs):
    one = runs["one"]
    for r in runs["ranks"]:
        np.testing.assert_array_equal(r["preds"], one["preds"])
        np.testing.assert_allclose(r["logits"], one["logits"], rtol=0, atol=1e-5)


def test_prune_two_ranks_matches_and_only_rank0_writes(runs):
    work, one = runs["work"], runs["one"]["prune"]
    for r in runs["ranks"]:
        assert r["prune"]["kept_heads"] == one["kept_heads"]
        assert r["prune"]["k_star"] == one["k_star"]
        assert [p["accuracy"] for p in r["prune"]["curve"]] == [p["accuracy"] for p in one["curve"]]
    results = str(work / "results")
    rank0 = [w for w in runs["ranks"][0]["writes"] if results not in w]
    assert any(str(work / "run" / "report.json") in w for w in rank0), "rank 0 should have written the outputs"
    assert [w for w in runs["ranks"][1]["writes"] if results not in w] == [], "rank 1 wrote outside its results"

    def files(d: Path):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.name.startswith("."))

    assert files(work / "run") == files(work / "one")


def test_ddp_finetune_two_ranks(runs):
    r0, r1 = (r["ft"] for r in runs["ranks"])
    assert r0 == r1  # same weights, same dev scores and loss on both ranks
    model, _ = cahp.load_pruned(runs["work"] / "ft")
    assert cahp.kept_heads(model)[1] == [] and cahp.num_kept(model) == 12 - 5
    assert _digest(model) == r0["digest"]
    saves = [w for w in runs["ranks"][0]["writes"] if w == f"os.rename {runs['work'] / 'ft'}"]
    assert len(saves) == 1, "rank 0 saves the fine-tuned model once"


def test_helpers_one_process():
    assert not distributed.is_active() and distributed.is_main() and distributed.world_size() == 1
    h = _helpers()
    assert h == {"shard": list(range(7)), "lazy": list(range(7)), "unshard": [x * 10 for x in range(7)],
                 "padded": 7, "sum": [7.0, 1.0], "count": 7, "error": "rank 0 failed", "main": 0,
                 "alone": list(range(7))}


def test_helpers_two_ranks(runs):
    h0, h1 = (r["helpers"] for r in runs["ranks"])
    assert h0["shard"] == h0["lazy"] == [0, 2, 4, 6] and h1["shard"] == h1["lazy"] == [1, 3, 5]
    for h in (h0, h1):
        assert h["unshard"] == [x * 10 for x in range(7)] and h["padded"] == 8
        assert h["sum"] == [7.0, 2.0] and h["count"] == 7
        assert h["error"] == "rank 0 failed" and h["main"] == 0 and h["alone"] == list(range(7))
