"""Shared benchmark plumbing: provenance metadata and atomic result files.

Every benchmark writes ``benchmarks/results/<name>.json`` holding its figures
and a ``meta`` block (command, date, machine, git revision, library versions).
`make_results.py` renders RESULTS.md from those files alone: no number in it
is typed by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    """Short revision of the checkout (+dirty when src/ differs from it).

    A copy of the tree without ``.git`` (a lent GPU machine gets one) says which
    revision it is through ``CAHP_GIT_REVISION``.
    """
    if os.environ.get("CAHP_GIT_REVISION"):
        return os.environ["CAHP_GIT_REVISION"]
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=REPO).returncode != 0
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


MACHINE_KEYS = ("cpu", "cores", "torch_threads", "gpu", "python", "torch", "platform")


#: The revision when the benchmark started: a long run's code is what was checked out then, whatever is
#: committed while it runs (`metadata` is often called only when the result is written).
REVISION_AT_START = git_revision()


def metadata() -> dict:
    """The command, date, machine and git revision (the one at start, `REVISION_AT_START`) of a result."""
    from cahp.core.io import environment

    env = environment()  # one probe: the date, versions and machine of the result
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": env["date"],
        "git_revision": REVISION_AT_START,
        "machine": {k: env[k] for k in MACHINE_KEYS},
        "transformers": env["transformers"],
    }


def write_result(name: str, data: dict, meta: dict | None = None) -> Path:
    """Write ``results/<name>.json`` = data plus provenance (``meta``)."""
    from cahp.core.io import write_json

    return write_json(RESULTS_DIR / f"{name}.json", {"meta": meta or metadata(), **data})


def load_result(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def meta_lines(meta: dict) -> str:
    m = meta["machine"]
    return (
        f"- command: `{meta['command']}`\n"
        f"- date: {meta['date']}, git revision: {meta['git_revision']}\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"torch {m['torch']}, transformers {meta.get('transformers', '?')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + "\n"
    )


def add_configuration_options(p, folder: str, result: str, result_note: str = "") -> None:
    """The options `run_configurations` reads, on a benchmark's parser: ``--output-dir`` (default
    ``runs/bench/FOLDER``), ``--data-dir``, ``--result-name`` (default ``results/RESULT_CONFIGURATION.json``;
    ``result_note`` adds to its help) and ``--quiet``."""
    p.add_argument("--output-dir", default=None, help=f"run folder (default: runs/bench/{folder}); "
                                                      "only with a single configuration")
    p.add_argument("--data-dir", default=None, help="data folder (default: $CAHP_DATA_DIR or ../shared/data)")
    p.add_argument("--result-name", default=None,
                   help=f"results/NAME.json instead of results/{result}_CONFIGURATION.json (an absolute path: "
                        f"PATH.json, outside results/){result_note}; one configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_configurations(build_parser, run, log) -> None:
    """The ``main`` of a benchmark over named configurations: parse ``build_parser()``'s options (a
    ``configs`` list, ``--output-dir`` and ``--result-name``, which take a single configuration), then
    ``run(name, args)`` for each configuration in order, logging the results file it wrote."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = build_parser()
    args = p.parse_args()
    if (args.output_dir or args.result_name) and len(args.configs) > 1:
        p.error("--output-dir and --result-name take a single configuration")
    for name in args.configs:
        log.info("wrote %s", run(name, args))
