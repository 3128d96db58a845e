"""Library names: ``timm:MODEL[.TAG]``, ``hf:ORG/NAME[@REVISION]``, ``st:ORG/NAME[@REVISION]``.

Any model of a library is an encoder by its library name, beside the registry's paper
names. A store group names its encoder in one path part that may hold neither ``:``,
``/`` nor ``@`` (``DATASET/MODALITY/ENCODER[@VARIANT]``), so every library name has a
*store key* spelled with ``+`` (``hf:BAAI/bge-small-en-v1.5`` -> ``hf+BAAI+bge-small-en-v1.5``),
which is what ``featurestore ls`` shows and what ``recommend --encoder`` reads; both
spellings name the same encoder. The key leaves the revision out (a group records the
revision it was made with in its provenance, and refuses rows of another), and adds the
tower of a two-tower model (``hf+openai+clip-vit-base-patch32+text``).

This module is plain string work: no torch, no network.
"""

from __future__ import annotations

from dataclasses import dataclass

from featurestore.errors import UserError

SCHEMES = ("timm", "hf", "st")
TOWERS = ("text", "image")
KEY_SEP = "+"


@dataclass(frozen=True)
class LibraryName:
    """One parsed library name.

    ``scheme``: ``timm``, ``hf`` or ``st``; ``model``: the timm model (``convnext_tiny.fb_in1k``,
    or ``hf-hub:ORG/NAME``) or the hub repository ``ORG/NAME``; ``revision``: a branch, tag or
    commit (``hf`` / ``st``); ``tower``: ``text`` / ``image`` for a two-tower model, else None.
    """

    scheme: str
    model: str
    revision: str | None = None
    tower: str | None = None

    @property
    def key(self) -> str:
        """The store key: this name in one store-group part."""
        parts = [self.scheme, *self.model.replace(":", "/").split("/")]
        return KEY_SEP.join(parts + ([self.tower] if self.tower else []))

    @property
    def spelled(self) -> str:
        """The name as a user types it (``hf:ORG/NAME@REVISION``)."""
        return f"{self.scheme}:{self.model}" + (f"@{self.revision}" if self.revision else "")

    @property
    def repo(self) -> str | None:
        """The hub repository of ``hf`` / ``st`` names and of ``timm:hf-hub:`` ids, with its revision."""
        if self.scheme == "timm":
            return self.model.removeprefix("hf-hub:") if self.model.startswith("hf-hub:") else None
        return self.model + (f"@{self.revision}" if self.revision else "")

    @property
    def modality(self) -> str:
        """What the name reads, from the name alone: timm models images, a two-tower model its tower,
        every other ``hf:`` / ``st:`` model text (an ``hf:`` image model is refused for its timm name)."""
        if self.scheme == "timm":
            return "image"
        return self.tower or "text"

    def with_tower(self, tower: str | None) -> "LibraryName":
        return LibraryName(self.scheme, self.model, self.revision, tower)


def store_spelling(encoder: str) -> str:
    """``ENC[@VARIANT]`` with a library name under its store key, the spelling a store group, run or study
    name can hold (``hf:ORG/NAME@top2`` -> ``hf+ORG+NAME@top2``); a registry name is returned as it is.

    Example:
        >>> store_spelling("timm:convnext_atto@top2")
        'timm+convnext_atto@top2'
    """
    name, at, variant = encoder.partition("@")
    parsed = parse_library_name(name)
    return (parsed.key if parsed else name) + at + variant


def _repo(scheme: str, repo: str, spelled: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--encoder {spelled}: name the hub repository as {scheme}:ORG/NAME[@REVISION], "
                        "e.g. hf:BAAI/bge-small-en-v1.5")


def parse_library_name(name: str) -> LibraryName | None:
    """A library name or store key parsed, or None for a registry name (``swin-b``).

    Example:
        >>> parse_library_name("hf:Qwen/Qwen3-Embedding-0.6B@main").key
        'hf+Qwen+Qwen3-Embedding-0.6B'
    """
    scheme, colon, rest = name.partition(":")
    if colon and scheme in SCHEMES:
        return _parse_spelled(scheme, rest, name)
    scheme, plus, rest = name.partition(KEY_SEP)
    if plus and scheme in SCHEMES:
        return _parse_key(scheme, rest.split(KEY_SEP), name)
    return None


def _parse_spelled(scheme: str, rest: str, name: str) -> LibraryName:
    if not rest:
        raise UserError(f"--encoder {name}: name a model after {scheme}:, e.g. timm:convnext_tiny.fb_in1k, "
                        "hf:BAAI/bge-small-en-v1.5, st:sentence-transformers/all-MiniLM-L6-v2")
    if scheme == "timm":
        if rest.startswith("hf-hub:"):
            _repo(scheme, rest.removeprefix("hf-hub:"), name)
        elif "/" in rest or "@" in rest:
            raise UserError(f"--encoder {name}: a timm name is MODEL[.TAG] (timm.list_models), or "
                            "timm:hf-hub:ORG/NAME for a timm model on the hub")
        return LibraryName(scheme, rest)
    repo, _, revision = rest.partition("@")
    _repo(scheme, repo, name)
    return LibraryName(scheme, repo, revision or None)


def _parse_key(scheme: str, parts: list[str], name: str) -> LibraryName:
    if scheme == "timm":
        if parts[:1] == ["hf-hub"] and len(parts) == 3:
            return LibraryName(scheme, f"hf-hub:{parts[1]}/{parts[2]}")
        if len(parts) == 1:
            return LibraryName(scheme, parts[0])
    elif len(parts) == 2 or (len(parts) == 3 and parts[2] in TOWERS):
        return LibraryName(scheme, f"{parts[0]}/{parts[1]}", tower=parts[2] if len(parts) == 3 else None)
    raise UserError(f"--encoder {name}: not a store key of a library name (timm+MODEL, hf+ORG+NAME[+text|image], "
                    "st+ORG+NAME); spell it timm:MODEL, hf:ORG/NAME or st:ORG/NAME")
