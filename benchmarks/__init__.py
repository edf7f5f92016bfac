"""The benchmarks behind RESULTS.md, one script per subject (``python benchmarks/<name>.py``).

A package so that tests and `make_results` import them normally
(``from benchmarks import bench_latency``); each renders its own results files.
"""
