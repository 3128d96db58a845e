"""Where everything lives: one root folder holding datasets, the store and runs.

Every command takes ``--root``; the default is ``$FEATURESTORE_ROOT``, else
``./workspace``. Keeping the layout in one module means no other module builds
paths by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "FEATURESTORE_ROOT"


def default_root() -> Path:
    """The root used when ``--root`` is not given."""
    return Path(os.environ.get(ROOT_ENV) or "workspace")


@dataclass(frozen=True)
class Workspace:
    """The folder layout under a root.

    Example:
        >>> Workspace(Path("/tmp/ws")).dataset_dir("HM")
        PosixPath('/tmp/ws/datasets/HM')
    """

    root: Path

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def store(self) -> Path:
        return self.root / "store.zarr"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adapted(self) -> Path:
        return self.root / "adapted"

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    def dataset_dir(self, name: str) -> Path:
        return self.datasets / name

    def run_dir(self, name: str) -> Path:
        return self.runs / name
