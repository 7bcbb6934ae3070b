"""Output-length estimates. ``OutputLengthEstimator`` (below): an online mean of observed output lengths with
a prior, for SAL and the published stats. ``SurvivalLengthEstimator`` (end of file): the expected final length
of a request that has already generated g tokens, for LARRY's lifetime planning (its docstring).

    mean = (prior_mean * prior_weight + sum(observed)) / (prior_weight + count(observed))

``prior_mean`` (tokens, > 0; default 256) is what the estimate is before anything finished, and
``prior_weight`` (>= 0; default 8) is how many observations the prior is worth: with 8 the first real
observations move the mean quickly but one outlier does not swing it to an extreme.

Expected remaining decode tokens of a request that has generated ``generated`` tokens:

    expected_remaining(max_tokens, generated) =
        0                                   if generated >= max_tokens     (it is finishing)
        min(mean, max_tokens) - generated   if that is >= 1
        1                                   otherwise

The last case: a request that has outlived the mean is still running, so it will produce at least one more
token; estimating 0 would make a long-running request look free. (A heavier-tailed model would say "about
another mean"; 1 keeps the estimate conservative and simple.)

One object serves every caller of a policy: SAL's ``expected_decode_tokens(request)`` is
``expected_remaining(request.max_tokens, 0)``, and the simulator and the Ray adapter call it to fill
``delta_decode_tokens`` for the requests they route, so a router's deltas and its decisions share one
estimate.
A replica computing ``num_decode_tokens_remaining`` can use the same class for the same definition.
"""

from __future__ import annotations

import math


class OutputLengthEstimator:
    """Online mean of output lengths, seeded with a prior; updated only by ``observe``."""

    __slots__ = ("prior_mean", "prior_weight", "_sum", "_count", "_mean")

    def __init__(self, prior_mean: float = 256.0, prior_weight: float = 8.0) -> None:
        if not prior_mean > 0:
            raise ValueError(f"prior_mean must be > 0, got {prior_mean}")
        if not prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        self.prior_mean = float(prior_mean)
        self.prior_weight = float(prior_weight)
        self._sum = 0.0
        self._count = 0
        self._mean = self._compute_mean()  # read far more often than it changes

    @property
    def count(self) -> int:
        """Observations so far."""
        return self._count

    @property
    def mean(self) -> float:
        """Current estimate of a request's output length, in tokens."""
        return self._mean

    def _compute_mean(self) -> float:
        weight = self.prior_weight + self._count
        if weight == 0:  # no prior and no observation yet
            return self.prior_mean
        return (self.prior_mean * self.prior_weight + self._sum) / weight

    def observe(self, num_output_tokens: int) -> None:
        """Feed one finished request's output length (negative values are clamped to 0)."""
        self._sum += num_output_tokens if num_output_tokens > 0 else 0
        self._count += 1
        self._mean = self._compute_mean()

    def expected_remaining(self, max_tokens: int, generated: int = 0) -> float:
        """Expected decode tokens still to come for a request (see the module docstring)."""
        if generated >= max_tokens:
            return 0.0
        mean = self._mean
        remaining = (max_tokens if max_tokens < mean else mean) - generated  # min(mean, max_tokens), inlined
        return remaining if remaining >= 1.0 else 1.0


class SurvivalLengthEstimator:
    """Expected final output length of a request that has already generated ``g`` tokens.

    Observed output lengths (finished requests only) go into geometric buckets (ratio ``BUCKET_RATIO``); per
    bucket b the table holds the mean of every observation in buckets >= b. Then

        expected_total(g) = mean of observed lengths in g's bucket and above      (>= min_samples of them)
                          = max(prior_mean, 2 * g)                                 (fewer: "as long again")
        and never below g + 1 (it is still running, so at least one more token comes).

    Conditioning on survival is what makes it useful for heavy-tailed (reasoning) outputs: a request that has
    already outlived the mean is expected to run much longer, not to stop at once. Bucketing makes a query
    O(1) (the table is rebuilt on each observation: ``NUM_BUCKETS`` operations). Callers cap the answer with
    the request's ``max_tokens``. ``prior_mean`` (tokens, > 0; 256) and ``min_samples`` (>= 1; 8).
    """

    BUCKET_RATIO = 1.25
    NUM_BUCKETS = 64  # 1.25 ** 64 ~ 1.6e6 tokens: beyond any context

    __slots__ = ("prior_mean", "min_samples", "_count", "_sum", "_tail_mean", "_tail_count", "count")

    def __init__(self, prior_mean: float = 256.0, min_samples: int = 8) -> None:
        if not prior_mean > 0:
            raise ValueError(f"prior_mean must be > 0, got {prior_mean}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.prior_mean = float(prior_mean)
        self.min_samples = min_samples
        self._count = [0] * self.NUM_BUCKETS
        self._sum = [0.0] * self.NUM_BUCKETS
        self._tail_mean = [0.0] * self.NUM_BUCKETS
        self._tail_count = [0] * self.NUM_BUCKETS
        self.count = 0

    @classmethod
    def bucket(cls, num_tokens: float) -> int:
        if num_tokens < 1:
            return 0
        return min(int(math.log(num_tokens) / _LOG_RATIO), cls.NUM_BUCKETS - 1)

    def observe(self, num_output_tokens: int) -> None:
        """Feed one finished request's output length (values below 1 count as 1)."""
        n = max(int(num_output_tokens), 1)
        b = self.bucket(n)
        self._count[b] += 1
        self._sum[b] += n
        self.count += 1
        total, count = 0.0, 0
        for i in range(self.NUM_BUCKETS - 1, -1, -1):  # suffix sums, high buckets first
            total += self._sum[i]
            count += self._count[i]
            self._tail_count[i] = count
            self._tail_mean[i] = total / count if count else 0.0

    def expected_total(self, generated: int = 0) -> float:
        """Expected final output length given ``generated`` tokens so far (see the class docstring)."""
        b = self.bucket(generated)
        if self._tail_count[b] >= self.min_samples:
            estimate = self._tail_mean[b]
        else:
            estimate = max(self.prior_mean, 2.0 * generated)
        return max(estimate, generated + 1.0)


_LOG_RATIO = math.log(SurvivalLengthEstimator.BUCKET_RATIO)
