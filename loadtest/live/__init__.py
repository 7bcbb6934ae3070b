"""Live load tests against Ray Serve on 127.0.0.1: locust trace replay, the live policy comparison, the soak."""
