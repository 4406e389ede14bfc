"""Per-key and per-model RPM/TPM limits hold over every window of their length, not per clock minute."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from helpers import gateway
from keel import errors
from keel.gateway import limits
from keel.gateway.limits import Limiter

WINDOW = 2.0  # a "minute" of 2 s keeps the tests short; the limiter's code is the same at 60 s


def busiest_window(times: list[float], length: float) -> int:
    """The most admissions in any half-open window [t, t + length) (the windows starting at an admission
    are the ones that matter)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + length) for i, t in enumerate(times)), default=0)


@pytest.fixture
def short_window(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Limiters with a WINDOW-second window; returns the list every admission's time is appended to."""
    monkeypatch.setattr(limits, "WINDOW_S", WINDOW)
    admitted: list[float] = []
    acquire = Limiter.acquire

    async def recording(self: Limiter, tokens: int) -> None:
        await acquire(self, tokens)
        # the time the limiter itself counted the call at: a clock read here could be late on a busy machine
        admitted.append(self.rpm._entries[-1][0] if self.rpm is not None else time.monotonic())

    monkeypatch.setattr(Limiter, "acquire", recording)
    return admitted


async def test_a_key_rpm_holds_over_any_window_under_many_callers(tmp_path: Path, short_window: list[float]) -> None:
    """The issue's case: RPM 30 under 100 callers admitted 42-50 in the first minute (fixed windows)."""
    gw = gateway(tmp_path, '[models.t]\nprovider = "test"\nmodel = "t"\nscript = ["ok"]\n[keys.team]\nrpm = 30\n')
    until = time.monotonic() + 2.5 * WINDOW
    refused = 0

    async def caller() -> None:
        nonlocal refused
        while time.monotonic() < until:
            try:
                await gw.chat("hi", model="t", key="team")
            except errors.RateLimited as exc:
                refused += 1
                assert exc.retry_after is not None and 0 < exc.retry_after <= WINDOW
                await asyncio.sleep(random.uniform(0.02, 0.1))

    await asyncio.gather(*(caller() for _ in range(100)))
    await gw.aclose()
    assert refused > 100 and len(short_window) >= 2 * 30  # the limit was hit, and it refilled
    assert busiest_window(short_window, WINDOW * 0.999) <= 30


async def test_a_token_limit_holds_over_any_window(short_window: list[float]) -> None:
    limiter = Limiter("key team", tpm=100)
    charged: list[tuple[float, int]] = []
    until = time.monotonic() + 2.5 * WINDOW

    async def caller() -> None:
        while time.monotonic() < until:
            tokens = random.randint(5, 30)
            try:
                await limiter.acquire(tokens)
            except errors.RateLimited:
                await asyncio.sleep(random.uniform(0.01, 0.05))
                continue
            charged.append((time.monotonic(), tokens))
            await asyncio.sleep(0)

    await asyncio.gather(*(caller() for _ in range(20)))
    assert sum(t for _, t in charged) >= 200  # about 100 a window, refilled as it slides
    for start, _ in charged:
        assert sum(t for when, t in charged if start <= when < start + WINDOW * 0.999) <= 100


async def test_the_window_slides_with_the_clock() -> None:
    clock = [1000.0]
    limiter = Limiter("key team", rpm=3, tpm=100, clock=lambda: clock[0])
    for clock[0] in (1000.0, 1010.0, 1020.0):  # each call at its own time
        await limiter.acquire(10)
    clock[0] = 1059.9
    with pytest.raises(errors.RateLimited, match="request limit of 3/minute") as caught:
        await limiter.acquire(10)
    assert caught.value.retry_after == pytest.approx(0.1)  # when the call of 1000.0 leaves the window
    clock[0] = 1060.0
    await limiter.acquire(10)  # 1000.0 is 60 s old: out
    with pytest.raises(errors.RateLimited) as caught:
        await limiter.acquire(10)
    assert caught.value.retry_after == pytest.approx(10.0)
    await limiter.add_tokens(80)  # learnt after the call: counted even past the limit
    clock[0] = 1075.0
    with pytest.raises(errors.RateLimited, match="token limit") as caught:
        await limiter.acquire(10)  # 2 requests in the window now, but 110 tokens
    assert caught.value.retry_after == pytest.approx(5.0)  # 1020.0's 10 tokens leave at 1080.0
