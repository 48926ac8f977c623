"""Limits on live work, so that no request can hold the server up for the other sessions.

- A prompt is cut to ``MAX_PROMPT_CHARS`` characters before it is tokenized (the lab then keeps
  256 tokens, the other pages the model's context).
- The fine-tuning sandbox takes at most ``MAX_SANDBOX_STEPS`` optimiser steps.
- At most ``LIVE_SLOTS`` live model runs go at once (``TINYSCOPE_LIVE_SLOTS``, default 2: one per
  core of a small server); the others wait in arrival order and their page says "waiting". A
  request that has waited ``MAX_WAIT_S`` seconds, or finds ``MAX_QUEUE`` others waiting, gets a
  one-line "busy" message instead.

``Gate`` is plain threading (the load test and the tests use it directly); ``live_slot`` is its
Streamlit face.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

MAX_PROMPT_CHARS = 4000
MAX_SANDBOX_STEPS = 50
LIVE_SLOTS = max(1, int(os.environ.get("TINYSCOPE_LIVE_SLOTS", "2")))
MAX_QUEUE = 32
MAX_WAIT_S = 60.0
POLL_S = 0.5  # how often a waiting request refreshes its "waiting" line


class Busy(RuntimeError):
    """No slot came free in time (or too many requests wait); the message is one line."""


class Gate:
    """At most ``slots`` holders at once; the others wait first come, first served."""

    def __init__(self, slots: int, max_queue: int = MAX_QUEUE, max_wait_s: float = MAX_WAIT_S):
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.slots, self.max_queue, self.max_wait_s = int(slots), int(max_queue), float(max_wait_s)
        self._cv = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextmanager
    def hold(self, on_wait: Callable[[int, int], None] | None = None) -> Iterator[float]:
        """Wait for a slot and hold it for the block; yields the seconds waited. ``on_wait(ahead,
        running)`` is called (without the gate's lock) every ``POLL_S`` while waiting, so a caller
        can show it and, in Streamlit, be interrupted by a rerun."""
        ticket = object()
        t0 = time.monotonic()
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise Busy(f"The server is busy ({len(self._queue)} requests waiting); try again in a minute.")
            self._queue.append(ticket)
        got = False
        try:
            while True:
                with self._cv:
                    if self._running < self.slots and self._queue[0] is ticket:
                        self._queue.popleft()
                        self._running += 1
                        got = True
                        self._cv.notify_all()  # the next in line may fit too
                        break
                    ahead, running = self._queue.index(ticket), self._running
                    waited = time.monotonic() - t0
                    if waited >= self.max_wait_s:
                        raise Busy(
                            f"The server is busy: no free slot after {waited:.0f} s ({ahead} requests ahead); try again."
                        )
                    if on_wait is None:
                        self._cv.wait(min(POLL_S, self.max_wait_s - waited))
                        continue
                on_wait(ahead, running)
                with self._cv:
                    if not (self._running < self.slots and self._queue[0] is ticket):
                        self._cv.wait(min(POLL_S, max(0.0, self.max_wait_s - (time.monotonic() - t0))))
        finally:
            if not got:
                with self._cv:
                    if ticket in self._queue:
                        self._queue.remove(ticket)
                    self._cv.notify_all()
        try:
            yield time.monotonic() - t0
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()


GATE = Gate(LIVE_SLOTS)  # one per server process: every session's live runs pass through it


def describe() -> str:
    """The limits, in one line for a page."""
    return (
        f"Limits: prompts up to {MAX_PROMPT_CHARS:,} characters; at most {LIVE_SLOTS} live runs at a time "
        "on this server, others wait their turn."
    )


def clip_prompt(text: str) -> tuple[str, str | None]:
    """``text`` cut to ``MAX_PROMPT_CHARS``, and a notice when it was cut."""
    if len(text) <= MAX_PROMPT_CHARS:
        return text, None
    return text[:MAX_PROMPT_CHARS], (
        f"The prompt is {len(text):,} characters long; only the first {MAX_PROMPT_CHARS:,} are used."
    )


@contextmanager
def live_slot(gate: Gate | None = None) -> Iterator[None]:
    """Hold one of the server's live slots (of ``GATE`` unless given) for the block; while queued
    the page shows a "waiting" line, and when the server stays busy it shows why and stops the page."""
    import streamlit as st

    gate = gate or GATE
    box = st.empty()

    def show(ahead: int, running: int) -> None:
        box.info(f"Waiting for the model: {running} live runs going, {ahead} ahead of you.")

    try:
        with gate.hold(on_wait=show):
            box.empty()
            yield
    except Busy as e:
        box.empty()
        st.warning(str(e))
        st.stop()
