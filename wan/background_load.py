"""One load running on a daemon thread while the caller works (loading is I/O and casting; the caller
encodes text or denoises meanwhile).

The thread only builds and returns its value: it touches no shared state, so the caller takes the
value (or the load's error, raised once, in the caller's thread, as if it had loaded there) with
`result()`. Daemon threads: an interrupted process does not wait for a load nobody needs any more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundLoad(Generic[T]):
    """`load()` on a daemon thread, started at construction."""

    def __init__(self, name: str, load: Callable[[], T]):
        self.name = name
        self._load = load
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"load {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._load()
        except BaseException as err:
            self._error = err
        finally:
            self.finished = time.perf_counter()
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        """Wait for the load; its value, or its error raised here (once: a second call returns None)."""
        self._done.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error
        value, self._value = self._value, None
        return value  # type: ignore[return-value]
