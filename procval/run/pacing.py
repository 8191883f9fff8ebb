"""One provider key's admission rules: pacing, a token bucket, an adaptive in-flight window.

Pure (no socket, no thread, no clock of its own: every method is given ``now``), so that
``tests/test_limits.py`` checks the rules directly; :mod:`procval.run.limiter` applies them.

::

    acquire(tokens) ── ready_at(tokens, now) ──▶ None: the window is full, wait for a release
                                             └─▶ t:   grant at t (>= now): the later of
                                                      the pacing slot     (requests_per_minute)
                                                      the bucket refill   (tokens_per_minute)
                                                      the end of a pause  (a 429's Retry-After)
    release(reserved, actual)                     in flight - 1; the bucket gets back
                                                  ``reserved - actual`` (the estimate's error)
    answered()                                    window + 1/window  (grows back by one per window)
    rate_limited(retry_after)                     pause; window halved (once per pause)

Requests are paced evenly (one every ``60 / requests_per_minute`` s, ``SAFETY`` slower, no
burst), on a schedule that a grant a little late does not push back (:meth:`KeyState.grant`),
so a provider whose own bucket holds a few requests never sees the limit passed. The token
bucket holds one second of tokens; a call whose estimate exceeds that waits for a full bucket
and takes it below zero, which later calls wait out.
"""

from __future__ import annotations

import math

from procval.ratelimit import RateLimit

__all__ = ["SAFETY", "KeyState"]

# Pace this much under the limit. Without it, the schedule's own precision would be the only
# margin: calls bunch a little between their grant and their request (a worker thread waking,
# the client building it), and a provider's clock is not ours.
SAFETY = 0.01

_MIN_PAUSE = 0.05  # seconds a 429 without a usable Retry-After pauses the key


class KeyState:
    """The admission state of one key (see the module docstring).

    Args:
        limit: the key's limits; None for a key with no configured limit (only the 429
            adaptation applies).
        now: the current time (``time.monotonic()``).
    """

    def __init__(self, limit: RateLimit | None, now: float) -> None:
        rpm = limit.requests_per_minute if limit else None
        tpm = limit.tokens_per_minute if limit else None
        self.interval = 60.0 / rpm * (1.0 + SAFETY) if rpm else 0.0
        self.next_start = now
        self.token_rate = tpm / 60.0 if tpm else 0.0
        self.capacity = max(1.0, self.token_rate)
        self.level = self.capacity
        self.refilled = now
        self.ceiling = float(limit.max_in_flight) if limit and limit.max_in_flight else math.inf
        self.window = self.ceiling
        self.in_flight = 0
        self.paused_until = 0.0
        self.cut_until = 0.0  # no second cut of the window before this time

    def _refill(self, now: float) -> None:
        if self.token_rate:
            elapsed = max(0.0, now - self.refilled)
            self.level = min(self.capacity, self.level + elapsed * self.token_rate)
        self.refilled = now

    def ready_at(self, tokens: float, now: float) -> float | None:
        """When a call reserving ``tokens`` may start (>= now); None while the window is full."""
        if math.isfinite(self.window) and self.in_flight >= max(1, math.floor(self.window)):
            return None
        start = max(now, self.next_start, self.paused_until)
        if self.token_rate:
            self._refill(now)
            need = min(tokens, self.capacity)
            if self.level < need:
                start = max(start, now + (need - self.level) / self.token_rate)
        return start

    def grant(self, tokens: float, now: float) -> None:
        """A call reserving ``tokens`` starts now.

        The next slot follows this one's (``next_start``), not ``now``, when the grant comes
        less than an interval late: a grant a millisecond late (the limiter's thread waking)
        then costs no time, where pacing from ``now`` lost that millisecond at every call
        (0.7 s over 600 calls at 50 per second, measured). A later grant (nobody was waiting)
        starts the pacing afresh from now: no burst after an idle spell.
        """
        self.in_flight += 1
        late = now - self.next_start
        self.next_start = (self.next_start if 0 <= late < self.interval else now) + self.interval
        if self.token_rate:
            self._refill(now)
            self.level -= tokens

    def release(self, reserved: float, actual: float | None, now: float) -> None:
        """A call ended; ``actual`` is the usage it reported (None: keep the estimate)."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.token_rate and actual is not None:
            self._refill(now)
            self.level = min(self.capacity, self.level + reserved - actual)

    def answered(self) -> None:
        """A call succeeded: the in-flight window grows back, by one per window of calls."""
        if math.isfinite(self.window) and self.window < self.ceiling:
            self.window = min(self.ceiling, self.window + 1.0 / self.window)

    def rate_limited(self, retry_after: float | None, now: float, in_flight: int) -> bool:
        """A call was answered 429: pause the key, halve the window; True if it was cut.

        Args:
            retry_after: the seconds the provider asked to wait (None: not said).
            now: the current time.
            in_flight: calls running when the 429 came (the window when it was unlimited).
        """
        pause = max(_MIN_PAUSE, retry_after or 0.0)
        self.paused_until = max(self.paused_until, now + pause)
        self.next_start = max(self.next_start, self.paused_until)
        if now < self.cut_until:  # one cut per pause: the 429s of one burst are one signal
            return False
        base = min(self.window, float(max(1, in_flight)))
        self.window = max(1.0, base / 2)
        self.cut_until = now + pause
        return True
