"""How many heads: the score-vs-heads curve (step 6) and its knee."""
