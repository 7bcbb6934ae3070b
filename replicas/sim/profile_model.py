"""The latency model of a named (GPU, model, tensor-parallel degree) profile: the one entry point.

    latency_model(gpu="h100", model="llama3-8b", tp=None, step_model="calibrated", **overrides) -> LatencyModel

``step_model`` (``STEP_MODELS``):

  calibrated  GPUs with a ``calibration`` entry in profiles.yaml (a100, h100, h200) get the per-operator model
              (operators.OperatorLatencyModel, fitted by calibrate.py); the others (a10g, l4: uncalibrated)
              the whole-step roofline (latency.LatencyModel). The default everywhere.
  roofline    the whole-step roofline for every GPU: the step model before the calibration, kept so that what
              the calibration moves (results, simulator speed) can be measured side by side
              (``halffull simulate --step-model roofline``, ``halffull bench sim --step-model roofline``).

``tp=None`` takes the profile's default; ``overrides`` go to the model's constructor (engine constants such as
``step_overhead_s``).

It lives apart from both models because it picks between them: operators.py builds on latency.py, so the
choice cannot sit in latency.py without an import circle.
"""

from __future__ import annotations

from halffull.replicas.sim.latency import LatencyModel, default_tp, load_profiles, lookup
from halffull.replicas.sim.operators import OperatorLatencyModel, calibration_for


STEP_MODELS = ("calibrated", "roofline")


def latency_model(gpu: str = "h100", model: str = "llama3-8b", tp: int | None = None, *,
                  step_model: str = "calibrated", **overrides) -> LatencyModel:
    """The step-time model of profile (gpu, model, tp) from profiles.yaml names (module docstring)."""
    check_step_model(step_model)
    profiles = load_profiles()
    gpu_spec = lookup(profiles.gpus, "gpu", gpu)
    model_spec = lookup(profiles.models, "model", model)
    tp = default_tp(gpu, model) if tp is None else tp
    if step_model == "calibrated" and gpu in profiles.calibration:
        return OperatorLatencyModel(gpu_spec, model_spec, tp, calibration=calibration_for(gpu), **overrides)
    return LatencyModel(gpu_spec, model_spec, tp, **overrides)


def check_step_model(step_model: str) -> None:
    if step_model not in STEP_MODELS:
        raise ValueError(f"step_model must be one of {', '.join(STEP_MODELS)}, got {step_model!r}")
