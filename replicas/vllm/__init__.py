"""Real vLLM engine integration: the halffull engine policies inside vLLM's V1 scheduler.

``scheduler.HalffullScheduler`` is the only module of the project that imports vLLM's scheduler
(DESIGN.md §2). ``tiny_model`` writes the tiny random Llama of the CPU tests; ``parity`` checks that
halffull's engine core makes vLLM's decisions. Serving: ``backend.VllmBackend`` (an ``AsyncLLM`` engine behind
the replica's Backend interface), ``config.VllmEngineConfig`` (the Serve config's ``vllm:`` section, no vLLM
import), ``engine_stats`` (the scheduler classes the backend runs and the routing stats read inside vLLM's
engine process). Nothing here is imported by the core packages.
"""
