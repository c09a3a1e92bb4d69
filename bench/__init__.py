"""embedkit benchmarks. `harness` records runs; one `bench_<op>.py` module per op; `run` drives them."""
