"""The benchmarks (run each as ``python bench/<name>.py``); bench/applied.py is shared by them."""
