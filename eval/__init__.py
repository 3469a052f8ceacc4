"""Benchmarks and evaluation scripts. Run them from the repository root as modules, e.g.
`python -m eval.bench_memory`; results go to `outputs/` unless a script is asked (`--update_docs`) to refresh the
committed figures in `docs/`."""
