"""Decide which heads stay: CAHP and the baselines, peers behind one abstract base."""
