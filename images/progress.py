"""Per-pull progress, kept by the image service and read by observers in other threads.

The image service is the one that knows what a pull is doing, so it keeps the numbers
(reference, per-layer bytes done of total, state) and the daemon serves them read-only
(``/debug/pulls`` on the metrics server); ``moorage images pull`` draws its bar from
there.  Updates come from the event loop (one per downloaded chunk), reads from the HTTP
server's threads: one lock guards both, and readers get plain dicts (copies).

A finished pull stays visible for ``keep_finished`` seconds so that a client polling
slower than a quick pull still sees how it ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Pull states
RESOLVING = "resolving"  # asking the registry what the reference is
PULLING = "pulling"      # layers known; downloading and unpacking
DONE = "done"
FAILED = "failed"

# Layer states
WAITING = "waiting"          # not started (queued for a download slot, or waiting on another pull)
DOWNLOADING = "downloading"
DOWNLOADED = "downloaded"
PRESENT = "present"          # already in the content store: nothing to download

MAX_FINISHED = 64


@dataclass
class LayerProgress:
    digest: str
    size: int
    done: int = 0
    state: str = WAITING

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "done": self.done, "state": self.state}


@dataclass
class PullProgress:
    """One pull.  Mutate it only through its methods (they take the tracker's lock)."""

    id: int
    ref: str
    started_at: float  # wall clock, seconds
    _lock: threading.Lock = field(repr=False, compare=False)
    state: str = RESOLVING
    layers: list[LayerProgress] = field(default_factory=list)
    finished_at: float = 0.0
    error: str = ""
    _finished_mono: float = field(default=0.0, repr=False, compare=False)

    def set_layers(self, layers: list[tuple[str, int]]) -> None:
        """The manifest is known: these (digest, size) are what the pull needs."""
        with self._lock:
            self.layers = [LayerProgress(d, max(0, int(s))) for d, s in layers]
            self.state = PULLING

    def _layer(self, digest: str) -> LayerProgress | None:
        for layer in self.layers:
            if layer.digest == digest:
                return layer
        return None

    def layer_bytes(self, digest: str, done: int) -> None:
        """``done`` bytes of ``digest`` have arrived (a running total, not an increment)."""
        with self._lock:
            layer = self._layer(digest)
            if layer is not None:
                # a retried transfer may resend bytes: never past the size, never backwards
                layer.done = max(layer.done, min(done, layer.size))
                layer.state = DOWNLOADING

    def layer_finished(self, digest: str, *, present: bool = False) -> None:
        """``digest`` is in the content store (``present``: it was before this pull)."""
        with self._lock:
            layer = self._layer(digest)
            if layer is not None:
                layer.done = layer.size
                layer.state = PRESENT if present else DOWNLOADED

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            layers = [layer.to_json() for layer in self.layers]
            return {"id": self.id, "ref": self.ref, "state": self.state, "error": self.error,
                    "started_at": self.started_at, "finished_at": self.finished_at,
                    "done_bytes": sum(layer["done"] for layer in layers),
                    "total_bytes": sum(layer["size"] for layer in layers), "layers": layers}


class PullTracker:
    """The pulls in flight and those that finished in the last ``keep_finished`` seconds."""

    def __init__(self, keep_finished: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_finished = keep_finished
        self._clock = clock
        self._lock = threading.Lock()
        self._pulls: list[PullProgress] = []
        self._next_id = 1

    def begin(self, ref: str) -> PullProgress:
        with self._lock:
            self._prune()
            p = PullProgress(id=self._next_id, ref=ref, started_at=time.time(), _lock=self._lock)
            self._next_id += 1
            self._pulls.append(p)
            return p

    def finish(self, p: PullProgress, error: str = "") -> None:
        with self._lock:
            p.state = FAILED if error else DONE
            p.error = error
            p.finished_at = time.time()
            p._finished_mono = self._clock()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every pull shown, oldest first, as JSON-ready dicts."""
        with self._lock:
            self._prune()
            pulls = list(self._pulls)
        return [p.to_json() for p in pulls]

    def _prune(self) -> None:
        now = self._clock()
        keep = [p for p in self._pulls
                if p.state not in (DONE, FAILED) or now - p._finished_mono < self.keep_finished]
        finished = [p for p in keep if p.state in (DONE, FAILED)]
        drop = {id(p) for p in finished[:max(0, len(finished) - MAX_FINISHED)]}
        self._pulls = [p for p in keep if id(p) not in drop]
