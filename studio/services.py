"""What a backend may use: the settings and the core services, nothing else (no tabs, no other backends).

The composition (studio/context.py) builds one `Services` and hands it to every backend's `create`; a backend that
needs another capability gets it passed in explicitly there, typed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studio.catalog import Catalog
    from studio.jobs import JobRunner
    from studio.residency import ResidencyManager
    from studio.runs import RunStore
    from studio.settings import Settings


@dataclass
class Services:
    settings: Settings
    residency: ResidencyManager
    catalog: Catalog
    jobs: JobRunner
    runs: RunStore

    def core(self) -> Services:
        """A plain Services with the same objects (what a backend receives, even from a richer context)."""
        return Services(**{f.name: getattr(self, f.name) for f in fields(Services)})
