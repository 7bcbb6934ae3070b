"""Benchmarks that print figures (``halffull bench sim|router|serve``)."""
