"""Generate ``reasoning_long.csv``: real bursty arrivals, reasoning-model-shaped prompt and output lengths.

Deterministic (seeded ``random.Random``; no network): running it again rewrites the shipped file byte for byte
(tests/test_traces.py checks a golden slice and the summary). Derivation, also in README.md beside it:

  arrivals   the Azure 2023 conversation trace's own timestamps (AzureLLMInferenceTrace_conv.csv, CC-BY 4.0,
             Patel et al., Splitwise, ISCA 2024): production arrivals from many clients, bursts included.
             The first ``NUM_REQUESTS`` rows are kept and the timeline compressed ``TIME_COMPRESSION`` times,
             so that rate scale 1.0 sits at the knee of 4 H100 x Llama-3-8B under pow2+fcfs.
  prompt     lognormal, median ``PROMPT_MEDIAN`` tokens, sigma ``PROMPT_SIGMA`` (mean about 270): short
             questions, as math / code reasoning prompts are.
  output     lognormal, median ``OUTPUT_MEDIAN`` tokens, sigma ``OUTPUT_SIGMA`` (mean about 1,400, p99 about
             10,000): the long-chain-of-thought shape, drawn independently of the prompt.

Run: ``python loadtest/data/traces/make_reasoning_trace.py`` (from the repository root).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "AzureLLMInferenceTrace_conv.csv"
TARGET = HERE / "reasoning_long.csv"

SEED = 20261207
NUM_REQUESTS = 8000
TIME_COMPRESSION = 4.5
PROMPT_MEDIAN, PROMPT_SIGMA = 220.0, 0.65
OUTPUT_MEDIAN, OUTPUT_SIGMA = 760.0, 1.1
MAX_TOKENS = 32768  # a reasoning model's output cap; the simulator clips further to the model's context


def _arrivals() -> list[dt.datetime]:
    lines = SOURCE.read_text().splitlines()[1 : NUM_REQUESTS + 1]
    stamps = sorted(dt.datetime.fromisoformat(line.split(",")[0][:26]) for line in lines)
    t0 = stamps[0]
    return [t0 + (t - t0) / TIME_COMPRESSION for t in stamps]


def _length(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, min(MAX_TOKENS, round(rng.lognormvariate(math.log(median), sigma))))


def generate() -> str:
    rng = random.Random(SEED)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t in _arrivals():
        prompt = _length(rng, PROMPT_MEDIAN, PROMPT_SIGMA)
        output = _length(rng, OUTPUT_MEDIAN, OUTPUT_SIGMA)
        rows.append(f"{t.strftime('%Y-%m-%d %H:%M:%S.%f')},{prompt},{output}")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    TARGET.write_text(generate())
    print(f"wrote {TARGET}")
