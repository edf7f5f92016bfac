"""Tasks: the public facade of the data room; loads the benchmark data sets and user data as :class:`Example` lists.

Built-in tasks (see :func:`available_tasks`):

* ``sst5``: Stanford Sentiment Treebank, five classes, from ``<data>/sst5/{train,dev,test}.txt``
  (PTB trees, one per line; the root label is the sentence label).
* ``sst2``: binary SST. From ``<data>/glue/SST-2`` when present (``train.tsv`` minus a 5 % hold-out is
  ``train``, the hold-out is ``dev``, the official GLUE ``dev.tsv`` is ``test``); otherwise derived from the
  SST-5 trees (label 2 dropped, 0-1 -> 0, 3-4 -> 1) with the trees' own train/dev/test.
* ``rte``: GLUE RTE sentence pairs. ``train.tsv`` minus a 10 % hold-out is ``train``, the hold-out is
  ``dev``, the official ``dev.tsv`` is ``test``.
* ``mnli``: the official MultiNLI splits (GLUE TSV or JSONL layout). ``dev`` is a 2 % hold-out of train,
  ``validation_matched`` is the test split and ``validation_mismatched`` an extra evaluation split.
* ``mnli-small``: the reduced protocol on ``<data>/mnli/dev_matched.jsonl`` split by ``idx % 5``.
* ``stsb``: GLUE STS-B sentence pairs, a regression task (scores 0..5; Pearson / Spearman). ``train.tsv``
  minus a 10 % hold-out is ``train``, the hold-out is ``dev``, the official ``dev.tsv`` is ``test``.

User tasks: ``get_task("csv:/path/to/folder")`` or ``get_task("/path/to/folder")`` for a folder holding
``train.{csv,tsv,jsonl}`` and optionally ``dev.*`` (or ``validation.*``) and ``test.*``; columns are
chosen with ``text_column``, ``text_pair_column`` and ``label_column``. A task is a classification task
(``num_labels`` classes) or a regression task (``num_labels == 1``, float labels): user tasks detect it
from the training labels or take ``task_type``. :meth:`Task.validate` parses and checks every split; call
it before any work.

Conventions:

* Every data problem raises :class:`TaskError` naming the file and the 1-based line number where there is
  one. No line is ever skipped silently; blank lines, blank labels and empty texts are errors too. (The
  only deliberate omission is SST-2 derived from the trees, which drops the neutral sentences by
  definition.)
* TSV files are read with quoting off (plain split on tab), as the GLUE files require. CSV files are read
  with the standard ``csv`` dialect (double-quote quoting). Text fields are stripped of surrounding
  whitespace.
* SST trees: the sentence is the leaves joined by single spaces, with the PTB escapes ``-LRB-``/``-RRB-``
  (and ``-LSB-``, ``-RSB-``, ``-LCB-``, ``-RCB-``) turned back into brackets and ``\\/``, ``\\*`` into
  ``/``, ``*``. The quote tokens `````` and ``''`` are kept as they are, which matches the text of the GLUE
  SST-2 files.
* Hold-out splits are deterministic: the ``round(fraction * n)`` rows (at least 1) whose SHA-256 hash of
  ``"cahp-holdout:<i>"`` is smallest are held out, where ``i`` is the 0-based row index in the file (header
  excluded). Both parts keep the file order. The choice does not depend on Python's ``hash()``, the
  platform or the process.

Where things live: :mod:`cahp.data.types` (Task, Example, TaskError), :mod:`cahp.data.folder` (the data
directory), :mod:`cahp.data.readers` (CSV/TSV/JSONL), :mod:`cahp.data.sst` (PTB trees),
:mod:`cahp.data.holdout`, :mod:`cahp.data.builtin` and :mod:`cahp.data.mnli` (built-in tasks),
:mod:`cahp.data.user` (user tasks), :mod:`cahp.data.registry` (:func:`get_task`). Import from here.
"""

from cahp.data.builtin import RTE_LABEL_NAMES, SST2_LABEL_NAMES, SST5_LABEL_NAMES, STSB_LABEL_NAMES
from cahp.data.folder import DATA_DIR_ENV, resolve_data_dir
from cahp.data.holdout import holdout_indices
from cahp.data.mnli import NLI_LABEL_NAMES
from cahp.data.registry import available_tasks, get_task
from cahp.data.sst import parse_sst_tree
from cahp.data.types import TASK_TYPES, Example, Task, TaskError

__all__ = [
    "DATA_DIR_ENV",
    "NLI_LABEL_NAMES",
    "RTE_LABEL_NAMES",
    "SST2_LABEL_NAMES",
    "SST5_LABEL_NAMES",
    "STSB_LABEL_NAMES",
    "TASK_TYPES",
    "Example",
    "Task",
    "TaskError",
    "available_tasks",
    "get_task",
    "holdout_indices",
    "parse_sst_tree",
    "resolve_data_dir",
]
