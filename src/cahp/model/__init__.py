"""Model mechanics: head bookkeeping, gates, surgery, attention capture, checkpoints, loading."""
