"""cahp: Complementary Attention Head Pruning."""
