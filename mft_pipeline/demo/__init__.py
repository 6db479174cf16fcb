"""Demos of the pipeline on real corpora: `mft quickstart` and the corpora the benchmarks use.

Nothing in the pipeline packages (cache, data, teacher, distill, train, eval, sweep) imports
this package; it only uses them.
"""
