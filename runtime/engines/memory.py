"""Host memory of this process during a load, from Linux's /proc/self/status.

`VmHWM` is the process's peak resident set; writing 5 to /proc/self/clear_refs resets it to the
current size, so the peak of one step (a weight load) can be told apart from what came before. The
resident set also counts pages of files the process maps, which the kernel may drop at any time: an
LMDB store is read through its memory map, so its pages show up there. The anonymous part alone
(`RssAnon`, memory the process allocated) has no peak counter; a sampling thread watches it.
Elsewhere (no /proc) the figures are None.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_SECONDS = 0.005


def status_bytes(field: str) -> int | None:
    """One size field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    with suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    return None


class HostMemory:
    """Watches resident memory from its creation until `stop()`: the peak of the whole resident set
    (VmHWM, exact, when the kernel lets it be reset) and of its anonymous part (sampled)."""

    def __init__(self) -> None:
        self.rss_start = status_bytes("VmRSS")
        self.anon_start = status_bytes("RssAnon")
        self.peak_reset = False
        with suppress(OSError):
            _CLEAR_REFS.write_text("5")
            self.peak_reset = True
        self._anon_peak = self.anon_start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="blockstore-memory", daemon=True)
        if self.anon_start is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            anon = status_bytes("RssAnon")
            if anon is not None and (self._anon_peak is None or anon > self._anon_peak):
                self._anon_peak = anon

    def stop(self) -> dict[str, int | None]:
        """Peaks above the start, in bytes: `rss` (None when the peak could not be reset, as it
        would then include everything before the start) and `anon`."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        peak = status_bytes("VmHWM")
        rss = None
        if peak is not None and self.rss_start is not None and self.peak_reset:
            rss = max(0, peak - self.rss_start)
        anon = None
        if self._anon_peak is not None and self.anon_start is not None:
            anon = max(0, self._anon_peak - self.anon_start)
        return {"rss": rss, "anon": anon}
