"""kdcache benchmarks: each module measures one thing against its physical limit (see
docs/BENCHMARKS.md); ``python -m bench.run`` runs them all and writes the report."""
