"""Tasks and batches: built-in and user tasks, readers, hold-outs, tokenised batching."""
