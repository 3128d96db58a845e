"""The exact ceiling of a synthetic world: rank every target by its true probability.

The generator (:mod:`data.synth`) samples each next item from a known mixture. For a
prepared split, the oracle recomputes that mixture for every user at the step that
produced the split's target, from ``world.npz`` beside ``truth.json`` in the raw folder,
and ranks the target among the prepared items 1..N by its true probability with the
protocol every model gets (:func:`eval.ranking.rank_targets`): full pool, pessimistic
ties (the target ranks below every item of equal probability). The world never repeats
an item within a user, so every item the user has seen has probability 0 and the
oracle's ranks are the same with history excluded or kept.

Alignment with preparation: a prepared user is found by its original id, its target
by the target's original id, and the step by the target's position in the generated
sequence. Truncation, the user filter and subsampling only remove things, and the
world's sequences have no duplicates, so every prepared target is one generated event.

Fast path (why it scales to 500K users x 87K items): away from the few items a user's
mixture singles out (the last item's links, the items already seen), an item's
probability is ``popularity_i * a[user, region_i]``. So the number of such items at
least as probable as the target is, per region, a binary search in that region's
popularities sorted once: O(regions x log) per user instead of O(items), in user
batches of bounded memory. The few special items are then corrected one by one.
Ranks are cached in the prepared dataset's folder (``ROOT/datasets/NAME/oracle/``, keyed by
its fingerprints), never in the raw folder, which may be read-only; a cache that cannot be
written or read is recomputed. A damaged ``world.npz`` leaves the oracle rows out with a note
naming the file, as an absent one does.

The oracle without links (``links=False``) ranks by the same mixture with the item-level
links left out. Link targets are uniform random items, so to anyone who does not know
them the link term is a constant: this is the best ranking of a model that has not
learned the links (a content tower, or IDRec on items too rare to learn them). The
space between it and the oracle is what the links are worth. At 87K items most of the
oracle's hits come from the links: a content event spreads over a whole region.
"""

from __future__ import annotations

import sys
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from data.synth import (LINK_WEIGHTS, TRUTH_FILE, WORLD_FILE, Signals, content_query, region_weights,
                        update_memory)

ORACLE_DIR = "oracle"
BATCH_USERS = 4096
# what np.load raises on an empty, cut or foreign file, and WorldFile on missing or unexpected arrays
DAMAGED = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


@dataclass
class WorldFile:
    """The arrays of ``world.npz``: what every next-item distribution depends on."""

    latent: np.ndarray
    region: np.ndarray
    centres: np.ndarray
    popularity: np.ndarray
    links: np.ndarray
    taste: np.ndarray
    indptr: np.ndarray
    seq_items: np.ndarray
    item_ids: np.ndarray
    user_ids: np.ndarray
    signals: Signals

    @classmethod
    def load(cls, path: Path) -> "WorldFile":
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        content, id_, popularity, taste = (float(v) for v in arrays.pop("signals"))
        return cls(**arrays, signals=Signals(content, id_, popularity, taste))

    @property
    def region_popularity(self) -> np.ndarray:
        return np.bincount(self.region, weights=self.popularity, minlength=len(self.centres))

    def link_weight(self, last: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B, S) link probability of ``items[b, s]`` after ``last[b]``."""
        weights = np.asarray(LINK_WEIGHTS, dtype=np.float64) / sum(LINK_WEIGHTS)
        hits = self.links[last][:, None, :] == items[:, :, None]
        return (hits * weights).sum(axis=2)


def raw_folder(dataset) -> Path | None:
    """The raw folder a prepared dataset came from, if the generator wrote it."""
    source = dataset.manifest.get("source")
    if not source:
        return None
    raw = Path(source)
    return raw if (raw / TRUTH_FILE).exists() and (raw / WORLD_FILE).exists() else None


def is_synthetic(dataset) -> bool:
    return raw_folder(dataset) is not None


@dataclass
class Alignment:
    """Prepared split -> generated events: per prepared user, the raw user and the step of
    its target; per prepared item id (index 0 = padding), the raw item."""

    raw_user: np.ndarray
    step: np.ndarray
    pool_raw: np.ndarray  # (N + 1,), -1 at 0


class StaleWorld(ValueError):
    """The raw folder's world is not the one the prepared dataset was drawn from (the
    folder was generated again in place after preparation)."""


def align(dataset, world: WorldFile, split: str) -> Alignment:
    """Where each prepared target was generated (see the module docstring)."""
    user_index = {u: k for k, u in enumerate(world.user_ids.astype(str).tolist())}
    item_index = {it: k for k, it in enumerate(world.item_ids.astype(str).tolist())}
    try:
        raw_user = np.array([user_index[u] for u in dataset.user_ids], dtype=np.int64)
        pool_raw = np.array([-1] + [item_index[it.orig_id] for it in dataset.items], dtype=np.int64)
    except KeyError as err:
        raise StaleWorld(f"its id {err.args[0]!r} is not in the world file") from None
    target_raw = pool_raw[dataset.targets(split)]
    n_items = len(world.item_ids)
    lengths = np.diff(world.indptr)
    event_user = np.repeat(np.arange(len(lengths)), lengths)
    keys = event_user * n_items + world.seq_items.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    at = order[np.searchsorted(keys[order], raw_user * n_items + target_raw)]
    if not np.array_equal(keys[at], raw_user * n_items + target_raw):
        raise StaleWorld("a prepared target is no generated event of its user")
    return Alignment(raw_user, at - world.indptr[raw_user], pool_raw)


def _histories(world: WorldFile, raw_user: np.ndarray, step: np.ndarray) -> np.ndarray:
    """(B, max step) raw items seen before each target, -1 padded on the right."""
    width = int(step.max(initial=1))
    cols = np.arange(width)
    index = world.indptr[raw_user][:, None] + cols
    valid = cols[None, :] < step[:, None]
    return np.where(valid, world.seq_items[np.minimum(index, len(world.seq_items) - 1)], -1)


def next_item_state(world: WorldFile, raw_user: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(histories, last items, (B, K) region probabilities) at each (user, step), step >= 1."""
    seen = _histories(world, raw_user, step)
    memory = None
    for k in range(seen.shape[1]):
        latent = world.latent[np.maximum(seen[:, k], 0)].astype(np.float64)
        updated = update_memory(memory, latent)
        memory = updated if memory is None else np.where((seen[:, k] >= 0)[:, None], updated, memory)
    query = content_query(world.taste[raw_user].astype(np.float64), memory, world.signals)
    last = seen[np.arange(len(step)), step - 1]
    return seen, last, region_weights(query, world.centres, world.region_popularity)


def probabilities(world: WorldFile, seen: np.ndarray, last: np.ndarray, regions: np.ndarray,
                  items: np.ndarray) -> np.ndarray:
    """(B, S) true probability (up to the no-repeat normalisation) of raw ``items[b, s]``."""
    weights = world.signals.mixture()
    pop = world.popularity[items]
    content = np.take_along_axis(regions, world.region[items], axis=1) * pop / world.region_popularity[world.region[items]]
    p = weights[0] * content + weights[1] * world.link_weight(last, items) + weights[2] * pop
    repeated = (items[:, :, None] == seen[:, None, :]).any(axis=2)
    return np.where(repeated, 0.0, p)


class _SortedPool:
    """Pool items' log popularities sorted within regions on one axis (region r occupies
    ``[r * stride, r * stride + span]``), for counting by binary search."""

    def __init__(self, world: WorldFile, pool_raw: np.ndarray) -> None:
        raw = pool_raw[1:]
        log_pop = np.log(world.popularity)
        self.floor = float(log_pop.min())
        self.span = float(log_pop.max()) - self.floor
        self.stride = self.span + 4.0
        self.key = np.full(len(world.popularity), np.inf)
        self.key[raw] = world.region[raw] * self.stride + (log_pop[raw] - self.floor)
        self.sorted = np.sort(self.key[raw])
        counts = np.bincount(world.region[raw], minlength=len(world.centres))
        self.ends = np.cumsum(counts)

    def thresholds(self, log_threshold: np.ndarray) -> np.ndarray:
        """(B, K) keys: an item of region r counts when its key >= the threshold of r."""
        regions = np.arange(self.ends.shape[0]) * self.stride
        return regions + np.clip(log_threshold - self.floor, -1.0, self.span + 1.0)

    def count(self, thresholds: np.ndarray) -> np.ndarray:
        found = np.searchsorted(self.sorted, thresholds, side="left")
        return (self.ends[None, :] - found).sum(axis=1)


def fast_ranks(world: WorldFile, alignment: Alignment, batch_users: int = BATCH_USERS) -> np.ndarray:
    """Exact oracle ranks (uncapped) of every prepared user's target, in user batches."""
    pool = _SortedPool(world, alignment.pool_raw)
    in_pool = np.zeros(len(world.popularity), dtype=bool)
    in_pool[alignment.pool_raw[1:]] = True
    weights = world.signals.mixture()
    scale = weights[0] / world.region_popularity
    ranks = np.empty(len(alignment.raw_user), dtype=np.int64)
    for start in range(0, len(ranks), batch_users):
        rows = slice(start, start + batch_users)
        raw_user, step = alignment.raw_user[rows], alignment.step[rows]
        seen, last, regions = next_item_state(world, raw_user, step)
        target = world.seq_items[world.indptr[raw_user] + step].astype(np.int64)
        p_target = probabilities(world, seen, last, regions, target[:, None])[:, 0]
        # generic items: p = popularity * a[region]; count those with log p >= log p_target
        thresholds = pool.thresholds(np.log(p_target)[:, None] - np.log(regions * scale + weights[2]))
        count = pool.count(thresholds)
        # special items: the target, the last item's links, the items seen; each once
        special = np.concatenate([target[:, None], world.links[last].astype(np.int64), seen], axis=1)
        special = np.sort(special, axis=1)
        unique = np.ones(special.shape, dtype=bool)
        unique[:, 1:] = special[:, 1:] != special[:, :-1]
        valid = unique & (special >= 0) & in_pool[np.maximum(special, 0)]
        item = np.maximum(special, 0)
        generic = pool.key[item] >= np.take_along_axis(thresholds, world.region[item], axis=1)
        truly = probabilities(world, seen, last, regions, item) >= p_target[:, None]
        truly &= item != target[:, None]
        count += ((truly.astype(np.int64) - generic) * valid).sum(axis=1)
        ranks[rows] = count + 1
    return ranks


def _cache_path(dataset, split: str, links: bool) -> Path:
    manifest = dataset.manifest
    variant = "" if links else "-without-links"
    return dataset.path / ORACLE_DIR / f"{manifest['fingerprint']}-{manifest['interactions_fingerprint']}-{split}{variant}.npy"


def _read_cache(path: Path, n_users: int) -> np.ndarray | None:
    """The cached ranks, or None when absent or unreadable (then they are computed again)."""
    try:
        ranks = np.load(path)
    except DAMAGED:
        return None
    return ranks if ranks.shape == (n_users,) else None


def _write_cache(path: Path, ranks: np.ndarray) -> None:
    """Best effort: a workspace that cannot be written still gets its oracle rows, computed each time."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, ranks)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def without_links(world: WorldFile) -> WorldFile:
    """The same world with the links' weight at 0: the mixture a link-blind model can know."""
    return replace(world, signals=replace(world.signals, id=0.0))


def oracle_ranks(dataset, split: str, links: bool = True) -> np.ndarray | None:
    """The oracle's exact rank of each prepared user's ``split`` target (None when the
    dataset did not come from the generator); computed once, then read from the cache.
    ``links=False``: the oracle without links (see the module docstring)."""
    raw = raw_folder(dataset)
    if raw is None:
        return None
    path = _cache_path(dataset, split, links)
    cached = _read_cache(path, dataset.n_users)
    if cached is not None:
        return cached
    try:
        world = WorldFile.load(raw / WORLD_FILE)
    except DAMAGED as err:
        _say_once(f"note: no oracle row for dataset {dataset.name}: {raw / WORLD_FILE} is damaged "
                  f"({type(err).__name__}: {err}); generate {raw} again with the options truth.json records "
                  f"(`featurestore dataset synth --out {raw} --seed ... --users ... --items ... --overwrite`) "
                  "to rank against its oracle")
        return None
    world = world if links else without_links(world)
    try:
        alignment = align(dataset, world, split)
    except StaleWorld as err:
        _say_once(f"note: no oracle row for dataset {dataset.name}: {raw} was generated again after the "
                  f"dataset was prepared from it ({err}); prepare the dataset again from that folder "
                  f"(`featurestore dataset prepare --source {raw} ...`) to rank against its oracle")
        return None
    ranks = fast_ranks(world, alignment)
    _write_cache(path, ranks)
    return ranks


WITHOUT_LINKS = "oracle_without_links"  # its key among the reference rows
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A note on stderr, once per process: eval and study ask for the oracle per subset."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)


def oracle_metrics(dataset, split: str = "test", ks: Iterable[int] = (10, 20, 50), exclude_history: bool = True,
                   subset: str = "all", links: bool = True) -> dict | None:
    """HR@K / NDCG@K of the oracle (``links=False``: without links) on the same users as a
    model's result, or None."""
    from eval.evaluate import subset_users  # lazily: eval imports torch, dataset commands need not
    from eval.metrics import metrics_from_ranks

    ranks = oracle_ranks(dataset, split, links)
    if ranks is None:
        return None
    ks = tuple(sorted({int(k) for k in ks}))
    rows = subset_users(dataset, split, subset)
    return {**metrics_from_ranks(ranks[rows], ks), "users": int(len(rows)), "split": split, "subset": subset,
            "exclude_history": bool(exclude_history), "ks": list(ks),
            "model": "oracle" if links else "oracle without links"}


def reference_rows(dataset, split: str = "test", ks: Iterable[int] = (10,), exclude_history: bool = True,
                   subset: str = "all") -> dict[str, dict]:
    """The popularity row and, for a generated dataset, the oracle and oracle-without-links
    rows on the same users and protocol: the floor, the exact ceiling every model's result
    sits under, and the ceiling of a model that has not learned the item-level links."""
    from eval.evaluate import popularity_metrics

    rows = {"popularity": popularity_metrics(dataset, split, ks, exclude_history, subset)}
    oracle = oracle_metrics(dataset, split, ks, exclude_history, subset)
    if oracle is not None:
        rows["oracle"] = oracle
        rows[WITHOUT_LINKS] = oracle_metrics(dataset, split, ks, exclude_history, subset, links=False)
    return rows


def percent_of_oracle(metrics: dict, oracle: dict | None) -> dict[str, float]:
    """Each HR/NDCG value of ``metrics`` as a percentage of the oracle's same metric."""
    if not oracle:
        return {}
    return {name: 100.0 * value / oracle[name] for name, value in metrics.items()
            if name.startswith(("HR@", "NDCG@")) and value is not None and oracle.get(name)}

