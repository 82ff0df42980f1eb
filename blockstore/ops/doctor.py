"""`doctor`: the store's health beyond its data — who holds it, what is left over, how full it is.

`verify` answers "is every version intact?"; `doctor` answers the operational questions: LMDB reader
slots that killed processes left behind (cleared on open: they would stop LMDB from ever reusing
freed pages), writer and reader leases (live ones block or limit gc; stale ones are removed by the
next gc), what gc would free, and how much of the memory map is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from blockstore.ops.gc import GcReport, gc
from blockstore.repo import Repository


@dataclass(frozen=True)
class LeaseInfo:
    role: str
    pid: int
    host: str
    age_s: float
    stale: bool


@dataclass(frozen=True)
class DoctorReport:
    stale_readers_cleared: int
    reader_slots: int
    max_readers: int
    map_size: int
    map_used: int
    file_bytes: int
    leases: tuple[LeaseInfo, ...]
    reclaimable: GcReport
    """What `gc` (keeping the whole reflog) would delete now."""

    def to_json(self) -> dict[str, object]:
        return {
            "stale_readers_cleared": self.stale_readers_cleared,
            "reader_slots": self.reader_slots,
            "max_readers": self.max_readers,
            "map_size": self.map_size,
            "map_used": self.map_used,
            "file_bytes": self.file_bytes,
            "leases": [
                {"role": x.role, "pid": x.pid, "host": x.host, "age_s": x.age_s, "stale": x.stale}
                for x in self.leases
            ],
            "reclaimable": self.reclaimable.to_json(),
        }


def doctor(repo: Repository) -> DoctorReport:
    store = repo.store
    usage = store.usage()
    now = time.time_ns()
    leases = tuple(
        LeaseInfo(lease.role, lease.pid, lease.host, (now - lease.time_ns) / 1e9, lease.stale)
        for lease in store.leases()
    )
    return DoctorReport(
        stale_readers_cleared=store.stale_readers_cleared,
        reader_slots=usage["reader_slots"],
        max_readers=usage["max_readers"],
        map_size=usage["map_size"],
        map_used=usage["map_used"],
        file_bytes=usage["file_bytes"],
        leases=leases,
        reclaimable=gc(repo, dry_run=True),
    )
