"""Measure, never decide: signatures (step 1), distances (step 2), gate gradients (salience, Fisher)."""
