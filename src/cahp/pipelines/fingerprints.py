"""Fingerprints of what a cached stage read: the task's data files and the starting model's files.

A stage's cache key holds these beside its settings (`cahp.pipelines.cache`), so
an edited data file or a replaced model re-runs exactly the stages that read
it. Contents are hashed (SHA-256), never judged by size and modification time
alone: a file rewritten within the same second with the same size still
counts as changed. Hashing a large model folder on every run would be slow,
so each file's digest is remembered per (path, size, modification time in
nanoseconds, inode) in ``$CAHP_CACHE_DIR/file-digests.json``: an edit changes
the modification time, and a digest is only reused for a file whose four
values are all unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from cahp.core.io import read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["data_fingerprints", "file_digest", "model_fingerprint"]

_CHUNK = 8 << 20  # bytes read per update of the hash
_lock = threading.Lock()
_memory: dict[str, str] = {}


def _digest_store() -> Path:
    from cahp.model.loading import cache_dir  # the one cache folder of cahp

    return cache_dir() / "file-digests.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, remembered per path, size, modification time and inode."""
    path = Path(path)
    key = _stat_key(path)
    with _lock:
        if key in _memory:
            return _memory[key]
    store = _digest_store()
    try:
        stored = read_json(store) if store.is_file() else {}
    except (OSError, ValueError):
        stored = {}
    digest = stored.get(key) if isinstance(stored, dict) else None
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
        digest = h.hexdigest()
        if path.stat().st_size >= (1 << 20):  # only large files are worth remembering on disk
            try:
                # entries of files that are gone are dropped, so the store does not grow with temporary folders
                stored = {k: v for k, v in (stored if isinstance(stored, dict) else {}).items()
                          if Path(k.rsplit("|", 3)[0]).exists()}
                stored[key] = digest
                write_json(store, stored)
            except OSError as e:  # a read-only home: hash again next time
                log.debug("cannot remember file digests in %s: %s", store, e)
    with _lock:
        _memory[key] = digest
    return digest


def _folder_digest(folder: Path) -> str:
    """SHA-256 over (relative path, digest) of every regular file under ``folder`` (hidden ones skipped)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # e.g. .cache/ of huggingface_hub downloads, editors' swap files
        h.update(f"{rel.as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """The starting model's identity: a digest of its folder's files, or its Hub id when it has no folder here.

    Short names resolve to their packaged folder (`cahp.model.loading.resolve_model`).
    """
    from cahp.model.loading import ModelLoadError, resolve_model

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        try:
            path = Path(resolve_model(name_or_path))
        except ModelLoadError:
            return f"name:{name_or_path}"
    if path.is_dir():
        return "sha256:" + _folder_digest(path)
    return f"hub:{name_or_path}"  # a Hub id: its files live in the Hub's cache, at the revision it serves


def _examples_digest(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.text_pair, ex.label]).encode())
        h.update(b"\n")
    return h.hexdigest()


def data_fingerprints(task) -> dict[str, str]:
    """Per split of ``task``: the digest of the file it is read from, else of its parsed examples."""
    out = {}
    for split in task.splits:
        path = task.split_files.get(split)
        if path is not None and Path(path).is_file():
            out[split] = "sha256:" + file_digest(path)
        elif path is not None and Path(path).is_dir():
            out[split] = "sha256:" + _folder_digest(Path(path))
        else:
            out[split] = "examples:" + _examples_digest(task.load(split))
    return out
