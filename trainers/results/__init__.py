"""Results: the run report, comparisons across runs, ablations, tracking."""
