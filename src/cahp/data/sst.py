"""Stanford Sentiment Treebank PTB trees: one tree per line, the root label is the sentence label."""

from __future__ import annotations

import re
from pathlib import Path

from cahp.data.readers import iter_lines
from cahp.data.types import TaskError

__all__ = ["parse_sst_tree", "read_sst_trees"]

_TREE_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_SST_NODE_LABELS = frozenset("01234")
_PTB_UNESCAPE = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LSB-": "[",
    "-RSB-": "]",
    "-LCB-": "{",
    "-RCB-": "}",
}


def _unescape_ptb(token: str) -> str:
    token = _PTB_UNESCAPE.get(token, token)
    if "\\" in token:
        token = token.replace("\\/", "/").replace("\\*", "*")
    return token


def parse_sst_tree(line: str) -> tuple[int, str]:
    """Parse one SST PTB tree such as ``(3 (2 It) (4 (4 rocks) (2 .)))``.

    Every node label must be 0..4. Leaves are unescaped (see the module docstring) and joined by spaces.

    Args:
        line: One tree.

    Returns:
        ``(root label, sentence)``.

    Raises:
        ValueError: When the tree is malformed (the caller adds file and line).
    """
    tokens = _TREE_TOKEN.findall(line)
    if not tokens:
        raise ValueError("empty tree")
    if tokens[0] != "(":
        raise ValueError(f"a tree must start with '(', found {tokens[0]!r}")
    children: list[int] = []  # number of children of each open node
    expect_label = False
    root_label: int | None = None
    leaves: list[str] = []
    for pos, tok in enumerate(tokens):
        if pos > 0 and not children:
            raise ValueError(f"unexpected text after the end of the tree: {tok!r}")
        if tok == "(":
            if expect_label:
                raise ValueError("missing node label after '('")
            if children:
                children[-1] += 1
            children.append(0)
            expect_label = True
        elif tok == ")":
            if expect_label:
                raise ValueError("empty node '()'")
            if children[-1] == 0:
                raise ValueError("node without children")
            children.pop()
        elif expect_label:
            if tok not in _SST_NODE_LABELS:
                raise ValueError(f"invalid node label {tok!r} (expected 0..4)")
            if root_label is None:
                root_label = int(tok)
            expect_label = False
        else:
            leaves.append(_unescape_ptb(tok))
            children[-1] += 1
    if children:
        raise ValueError(f"unbalanced parentheses: {len(children)} node(s) not closed")
    if not leaves or root_label is None:
        raise ValueError("tree without words")
    return root_label, " ".join(leaves)


def read_sst_trees(path: Path) -> list[tuple[int, int, str]]:
    """Read an SST tree file into ``(line number, root label, sentence)`` triples."""
    out: list[tuple[int, int, str]] = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            raise TaskError("blank line (expected a tree)", path, lineno)
        try:
            label, text = parse_sst_tree(line)
        except ValueError as e:
            raise TaskError(f"unparseable tree: {e}", path, lineno) from None
        out.append((lineno, label, text))
    if not out:
        raise TaskError("empty file", path)
    return out
