"""Load testing and measurement: ``sim`` (offline cluster simulator), ``experiments`` (sweeps, paper matrix,
reports), ``live`` (locust replay and live comparison on Ray Serve), ``bench`` (benchmarks); ``cli`` is the
``halffull`` command, ``command`` its subcommand protocol; the shipped traces are in ``data/traces/``."""
