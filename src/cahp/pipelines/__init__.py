"""The two pipelines, prune and compare, their shared stage cache, reports and plots."""
