"""halffull: LLM scheduling for Ray Serve + vLLM (SAL token-aware routing, LARRY memory-aware engine scheduling).

One import namespace over the repository's top-level folders (pyproject.toml maps them with setuptools'
``package-dir``, for editable installs and wheels alike):

    halffull.router     router/     load-balancing policies + the Ray Serve RequestRouter adapter
    halffull.replicas   replicas/   engine core, engine policies, simulated and vLLM backends, the replica deployment
    halffull.deploy     deploy/     the OpenAI-compatible ingress app and Serve configs
    halffull.loadtest   loadtest/   offline cluster simulator, experiments, live load tests, benchmarks, the CLI

The README's Architecture section describes the files inside.
"""

__version__ = "0.1.0"
