"""Experiments on the offline simulator: sweeps (``halffull compare``), the paper matrix, the report writers."""
