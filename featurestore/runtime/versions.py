"""The package versions behind a job's numbers, recorded the same way by every job.

Read from the installed packages' metadata, so recording them imports none of the
libraries; a package that is not installed is recorded as None rather than failing
a job that does not need it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from featurestore import __version__

PACKAGES = ("torch", "timm", "transformers", "zarr", "numpy", "pillow")


def versions() -> dict[str, str | None]:
    """``{"morec_store": ..., "torch": ..., ...}`` for this package and :data:`PACKAGES`."""
    found: dict[str, str | None] = {"morec_store": __version__}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
