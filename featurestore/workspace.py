"""Where everything lives: one root folder holding datasets, the store and runs.

Every command takes ``--root``; the default is ``$FEATURESTORE_ROOT``, else
``./workspace``. Keeping the layout in one module means no other module builds
paths by hand, and one place checks what users name: every dataset, store
variant, adapted encoder, run and study name goes through :func:`check_name`
before it becomes a folder, and the folder must resolve (symbolic links
followed) inside the root. So ``--name ../../evil`` or ``--name "a b/c"`` is
refused with one line before anything is read or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featurestore.errors import UserError

ROOT_ENV = "FEATURESTORE_ROOT"


@dataclass(frozen=True)
class NameRule:
    """What one kind of name may hold: ASCII letters and digits first, then ``. _ + -``
    and ``extra``, at most ``max_len`` characters.

    Store groups are addressed ``DATASET/MODALITY/ENCODER@VARIANT``, so dataset,
    variant and adapted names (which become variants) may not hold ``@``; run and
    study names may (a study's run names carry their encoder's variant).
    """

    what: str
    max_len: int
    extra: str = ""

    @property
    def allowed(self) -> str:
        return "._+-" + self.extra

    def problem(self, name: str) -> str | None:
        """Why ``name`` is refused, or None when it is fine."""
        if not name:
            return "it is empty"
        if len(name) > self.max_len:
            return f"it is {len(name)} characters long, more than {self.max_len}"
        for char in name:
            if not char.isascii():
                return f"{char!r} (U+{ord(char):04X}) is not an ASCII character, though it may look like one"
            if char in "/\\":
                return f"{char!r} is a path separator"
            if not (char.isalnum() or char in self.allowed):
                return f"{char!r} is not allowed"
        if not name[0].isalnum():
            return f"it starts with {name[0]!r}"
        return None


NAME_RULES: dict[str, NameRule] = {
    "dataset": NameRule("dataset", 64),
    "variant": NameRule("store variant", 64),
    "adapted": NameRule("adapted-encoder", 64),
    "group part": NameRule("store group part", 64),
    "run": NameRule("run", 200, "@"),
    "study": NameRule("study", 200, "@"),
}


def name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` is not a valid ``kind`` name (a key of :data:`NAME_RULES`), or None."""
    return NAME_RULES[kind].problem(name)


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid ``kind`` name, else a one-line :class:`UserError` saying why.

    Example:
        >>> check_name("dataset", "HM")
        'HM'
        >>> check_name("dataset", "../evil")
        Traceback (most recent call last):
        UserError: bad dataset name '../evil': it starts with '.'; use ...
    """
    rule = NAME_RULES[kind]
    problem = rule.problem(name)
    if problem is not None:
        raise UserError(f"bad {rule.what} name {name!r}: {problem}; use 1-{rule.max_len} ASCII letters, "
                        f"digits and {' '.join(rule.allowed)}, starting with a letter or digit")
    return name


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
        return self.inside(self.root / "store.zarr")

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adapted(self) -> Path:
        return self.root / "adapted"

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    def inside(self, path: Path) -> Path:
        """``path``, refused when it resolves (symbolic links followed) outside the root."""
        root, real = self.root.resolve(), Path(path).resolve()
        if real != root and root not in real.parents:
            raise UserError(f"{path} resolves to {real}, outside the workspace root {root}; remove the "
                            "symbolic link that leads out, or choose that folder as --root")
        return path

    def dataset_dir(self, name: str) -> Path:
        return self.inside(self.datasets / check_name("dataset", name))

    def run_dir(self, name: str) -> Path:
        return self.inside(self.runs / check_name("run", name))

    def adapted_dir(self, name: str) -> Path:
        return self.inside(self.adapted / check_name("adapted", name))

    def study_dir(self, name: str) -> Path:
        return self.inside(self.studies / check_name("study", name))
