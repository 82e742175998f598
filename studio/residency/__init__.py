"""Model residency: the one place that moves models between GPU, pinned CPU RAM and disk (see manager.py).

Layout (composition, one lock): `planner` (pure decisions on plain records), `mover` (moves tensors, returns facts,
takes no lock), `manager` (holds the only lock, publishes snapshots), `training` (preemptible training leases),
`state` (records, enums, snapshot views), `eviction`, `pinned`, `accel`, `probes`; the simulated card used by tests
is `simulated` (production code never imports it).
"""

from studio.residency.manager import Loader, ResidencyManager
from studio.residency.planner import ResidencyError
from studio.residency.state import Snapshot

__all__ = ["Loader", "ResidencyError", "ResidencyManager", "Snapshot"]
