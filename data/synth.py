"""Synthetic raw datasets with planted structure, written in the real raw layouts.

Why: none of the real datasets can be downloaded here, yet every stage (readers,
encoders, recommenders, ranking) must be exercised end to end on data where the
right answer is known. The generative model:

- every item belongs to one latent cluster (a *theme*: colour, shape, texture and a
  handful of English words); the cluster shapes BOTH the item's JPEG picture and its
  text, each with per-item noise, so an image encoder or a text encoder alone can
  tell clusters apart;
- users move between clusters by a sticky Markov chain (stay with probability
  ``stay``, else jump to one of two "neighbour" clusters or anywhere), and pick an item
  inside the current cluster by Zipf popularity.

So "the next item is popular and looks/reads like the last one" beats global
popularity, and content models can learn it from images alone or text alone.
``truth.json`` in the output folder maps each original item id to its cluster.

Example:
    >>> synthesize("hm", Path("raw/HM"), users=2000, items=500, seed=0)
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from featurestore.cliutil import UserError

IMAGE_SIZE = 96
MISSING_IMAGE_RATE = 0.03
START_DATE = dt.date(2019, 9, 1)


@dataclass(frozen=True)
class Theme:
    """What one latent cluster looks like and reads like."""

    name: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    texture: str
    product: str
    category: str
    words: tuple[str, ...]


THEMES: tuple[Theme, ...] = (
    Theme("ocean", "blue", (30, 90, 210), "circle", "waves", "swimsuit", "travel",
          ("sea", "wave", "beach", "sailing", "coral", "surf", "harbour", "tide")),
    Theme("forest", "green", (30, 140, 50), "triangle", "dots", "jacket", "outdoors",
          ("forest", "pine", "hiking", "moss", "trail", "camping", "leaf", "woodland")),
    Theme("fire", "red", (215, 30, 30), "star", "stripes", "hoodie", "food",
          ("fire", "flame", "chili", "spicy", "volcano", "heat", "ember", "blaze")),
    Theme("sun", "yellow", (240, 210, 30), "diamond", "checks", "dress", "lifestyle",
          ("lemon", "sunshine", "citrus", "honey", "sunflower", "golden", "bright", "summer")),
    Theme("royal", "purple", (120, 40, 160), "hexagon", "grid", "blouse", "entertainment",
          ("royal", "velvet", "crown", "lavender", "palace", "elegant", "grape", "orchid")),
    Theme("autumn", "orange", (235, 120, 20), "square", "diagonal", "sweater", "foodanddrink",
          ("pumpkin", "harvest", "maple", "autumn", "amber", "cinnamon", "copper", "rust")),
    Theme("blossom", "pink", (240, 120, 180), "ring", "dots", "skirt", "lifestyle",
          ("blossom", "rose", "romance", "petal", "candy", "flamingo", "cherry", "tulip")),
    Theme("night", "black", (20, 20, 25), "cross", "plain", "boots", "music",
          ("midnight", "shadow", "leather", "rock", "concert", "urban", "noir", "guitar")),
    Theme("snow", "white", (245, 245, 250), "circle", "noise", "coat", "weather",
          ("snow", "winter", "ski", "frost", "glacier", "polar", "ice", "alpine")),
    Theme("earth", "brown", (110, 70, 35), "square", "grid", "shoes", "autos",
          ("coffee", "chocolate", "wood", "desert", "canyon", "cocoa", "saddle", "clay")),
    Theme("steel", "grey", (130, 130, 135), "triangle", "stripes", "trousers", "technology",
          ("steel", "engine", "machine", "robot", "metal", "industrial", "silver", "gear")),
    Theme("tropical", "turquoise", (20, 180, 170), "star", "waves", "shorts", "travel",
          ("tropical", "palm", "lagoon", "jungle", "parrot", "mango", "island", "paradise")),
    Theme("sport", "lime", (150, 220, 40), "diamond", "checks", "socks", "sports",
          ("football", "tennis", "running", "stadium", "match", "league", "goal", "athlete")),
    Theme("finance", "navy", (20, 30, 95), "ring", "grid", "shirt", "finance",
          ("market", "stocks", "bank", "investor", "economy", "budget", "profit", "trade")),
    Theme("garden", "olive", (120, 130, 40), "hexagon", "dots", "bag", "health",
          ("garden", "herb", "olive", "basil", "vegetable", "farm", "organic", "meadow")),
    Theme("wine", "maroon", (120, 20, 45), "cross", "diagonal", "scarf", "foodanddrink",
          ("wine", "vineyard", "burgundy", "cellar", "berry", "ruby", "feast", "dinner")),
)

FILLER = ("new", "classic", "soft", "comfortable", "style", "collection", "everyday",
          "premium", "limited", "edition", "great", "look", "season", "favourite", "daily")


@dataclass
class World:
    """One draw of the generative model: items, their content, and user sequences.

    Items are indices 0..I-1; ``seq_items``/``seq_days`` are CSR over users by
    ``indptr`` in generation (= time) order.
    """

    seed: int
    cluster: np.ndarray
    words: list[tuple[str, ...]]
    colour: list[str]
    indptr: np.ndarray
    seq_items: np.ndarray
    seq_days: np.ndarray
    has_image: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.cluster)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def theme(self, item: int) -> Theme:
        return THEMES[self.cluster[item]]

    def user_of_event(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), np.diff(self.indptr))


def build_world(users: int, items: int, seed: int, clusters: int = 12,
                stay: float = 0.8, zipf: float = 0.8, mean_length: float = 11.0) -> World:
    """Draw items (cluster, words, image flag) and user sequences for one seed."""
    if not 2 <= clusters <= len(THEMES):
        raise UserError(f"--clusters must be between 2 and {len(THEMES)}, got {clusters}")
    if items < clusters * 2 or users < 1:
        raise UserError(f"need at least {clusters * 2} items and 1 user, got {items} items, {users} users")
    rng = np.random.default_rng(seed)
    cluster = rng.permutation(np.arange(items) % clusters)
    words, colour = _item_words(rng, cluster, clusters)
    has_image = rng.random(items) >= MISSING_IMAGE_RATE

    # Zipf popularity inside each cluster over a random order of its members; one
    # concatenated CDF where cluster c occupies the interval [c, c + 1].
    order = np.lexsort((rng.random(items), cluster))
    starts = np.searchsorted(cluster[order], np.arange(clusters))
    cdf = np.empty(items)
    for c in range(clusters):
        lo, hi = starts[c], starts[c + 1] if c + 1 < clusters else items
        weights = 1.0 / np.arange(1, hi - lo + 1) ** zipf
        cdf[lo:hi] = c + np.cumsum(weights) / weights.sum()
    cdf[starts[1:] - 1] = np.arange(1, clusters)  # guard float round-off at cluster ends
    cdf[-1] = clusters

    transition = _transition_matrix(rng, clusters, stay)
    lengths = np.clip(rng.geometric(1.0 / (mean_length - 2), size=users) + 2, 3, 60)
    start_cluster = rng.choice(clusters, size=users, p=rng.dirichlet(np.full(clusters, 3.0)))
    start_day = rng.integers(0, 600, size=users)
    steps = int(lengths.max())
    chosen = np.zeros((users, steps), dtype=np.int64)
    days = np.zeros((users, steps), dtype=np.int64)
    state, day = start_cluster, start_day
    cum_transition = np.cumsum(transition, axis=1)
    for t in range(steps):
        if t:
            jump = (rng.random(users)[:, None] > cum_transition[state]).sum(axis=1)
            state = np.minimum(jump, clusters - 1)
            day = day + rng.choice(np.array([0, 0, 1, 2, 3, 7]), size=users)
        pick = np.searchsorted(cdf, state + rng.random(users), side="right")
        chosen[:, t] = order[np.minimum(pick, items - 1)]
        days[:, t] = day
    mask = np.arange(steps)[None, :] < lengths[:, None]
    indptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return World(seed, cluster, words, colour, indptr, chosen[mask], days[mask], has_image)


def _transition_matrix(rng: np.random.Generator, clusters: int, stay: float) -> np.ndarray:
    """Sticky chain: stay, else mostly one of two neighbour clusters, else anywhere."""
    transition = np.full((clusters, clusters), 0.15 * (1 - stay) / clusters)
    for c in range(clusters):
        for n in rng.choice(np.delete(np.arange(clusters), c), size=2, replace=False):
            transition[c, n] += 0.85 * (1 - stay) / 2
    transition[np.arange(clusters), np.arange(clusters)] += stay
    return transition / transition.sum(axis=1, keepdims=True)


def _item_words(rng: np.random.Generator, cluster: np.ndarray, clusters: int,
                noise: float = 0.15) -> tuple[list[tuple[str, ...]], list[str]]:
    """Per item: four distinct theme words (each swapped for a random theme's word with
    probability ``noise``) plus two filler words, and a colour name (same noise)."""
    n, per_theme = len(cluster), len(THEMES[0].words)
    vocabulary = np.array([t.words for t in THEMES], dtype=object)
    own = np.argsort(rng.random((n, per_theme)), axis=1)[:, :4]
    theme = np.where(rng.random((n, 4)) < noise, rng.integers(clusters, size=(n, 4)), cluster[:, None])
    word = np.where(theme == cluster[:, None], own, rng.integers(per_theme, size=(n, 4)))
    filler = np.array(FILLER, dtype=object)[rng.integers(len(FILLER), size=(n, 2))]
    words = np.concatenate([vocabulary[theme, word], filler], axis=1)
    colour_theme = np.where(rng.random(n) < noise, rng.integers(clusters, size=n), cluster)
    return [tuple(row) for row in words.tolist()], [THEMES[c].colour for c in colour_theme]


# ---- pictures -------------------------------------------------------------------------

def render_image(theme: Theme, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A picture of one item: theme texture on a pale background, theme shape in the
    theme colour, with jittered colour, position, size, rotation and pixel noise."""
    rgb = np.clip(np.array(theme.rgb) + rng.integers(-25, 26, size=3), 0, 255)
    pale = 255 - (255 - rgb) * 0.25 if rgb.mean() < 200 else rgb * 0.45
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in pale))
    draw = ImageDraw.Draw(canvas)
    _draw_texture(draw, theme.texture, size, tuple(int(v) for v in (pale * 0.8)), rng)
    centre = size / 2 + rng.uniform(-size / 8, size / 8, size=2)
    radius = size * rng.uniform(0.25, 0.36)
    _draw_shape(draw, theme.shape, centre, radius, rng.uniform(-0.25, 0.25), tuple(int(v) for v in rgb))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, size: int, ink: tuple, rng: np.random.Generator) -> None:
    step = int(rng.integers(8, 13))
    phase = int(rng.integers(0, step))
    if texture == "stripes":
        for y in range(phase, size, step):
            draw.rectangle([0, y, size, y + step // 3], fill=ink)
    elif texture == "waves":
        for y0 in range(phase, size + step, step):
            points = [(x, y0 + 3 * math.sin(x / 5)) for x in range(0, size + 1, 3)]
            draw.line(points, fill=ink, width=2)
    elif texture == "dots":
        for y in range(phase, size, step):
            for x in range(phase, size, step):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=ink)
    elif texture == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    elif texture == "grid":
        for v in range(phase, size, step):
            draw.line([(v, 0), (v, size)], fill=ink, width=1)
            draw.line([(0, v), (size, v)], fill=ink, width=1)
    elif texture == "diagonal":
        for v in range(-size + phase, size, step):
            draw.line([(v, 0), (v + size, size)], fill=ink, width=2)
    elif texture == "noise":
        for x, y in rng.integers(0, size, size=(size * 3, 2)):
            draw.point((int(x), int(y)), fill=ink)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: np.ndarray, radius: float,
                angle: float, colour: tuple) -> None:
    cx, cy = centre

    def polygon(n: int, inner: float | None = None) -> list[tuple[float, float]]:
        points = []
        for k in range(n * (2 if inner else 1)):
            r = radius if not inner or k % 2 == 0 else radius * inner
            a = angle + k * math.pi / (n if inner else n / 2)
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return points

    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(radius / 3)))
    elif shape == "cross":
        w = radius / 3
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=colour)
    else:
        corners, inner, base_angle = _POLYGONS[shape]
        angle += base_angle
        draw.polygon(polygon(corners, inner), fill=colour)


# corners, inner radius (stars), orientation: a square stands on a side, a diamond on a corner
_POLYGONS = {"triangle": (3, None, -math.pi / 2), "square": (4, None, math.pi / 4),
             "diamond": (4, None, 0.0), "hexagon": (6, None, 0.0), "star": (5, 0.45, -math.pi / 2)}


def write_images(world: World, paths: dict[int, Path]) -> None:
    """Render item ``i`` to ``paths[i]`` (items without an image are left out of ``paths``)."""
    for item, path in paths.items():
        rng = np.random.default_rng([world.seed, 7, item])
        path.parent.mkdir(parents=True, exist_ok=True)
        render_image(world.theme(item), rng).save(path, format="JPEG", quality=90)


# ---- text -----------------------------------------------------------------------------

def title_of(world: World, item: int) -> str:
    w = world.words[item]
    return f"{w[4].capitalize()} {w[0]} {w[1]} {world.theme(item).product}"


def description_of(world: World, item: int) -> str:
    w = world.words[item]
    return (f"{w[5].capitalize()} {world.theme(item).product} in {world.colour[item]} "
            f"with {w[2]} and {w[3]} details, a {w[0]} favourite.")


# ---- writers, one per raw layout --------------------------------------------------------

Writer = Callable[[World, Path, bool, str], dict[str, str]]
_WRITERS: dict[str, Writer] = {}


def register_writer(name: str) -> Callable[[Writer], Writer]:
    def decorate(func: Writer) -> Writer:
        _WRITERS[name] = func
        return func

    return decorate


def list_synth_formats() -> list[str]:
    return sorted(_WRITERS)


def _hm_article_ids(world: World) -> list[str]:
    """10-digit zero-padded ids as in the Kaggle files (product code + 3-digit variant)."""
    rng = np.random.default_rng([world.seed, 11])
    codes = rng.choice(np.arange(108_000, 959_000), size=world.n_items, replace=False)
    return [f"{code * 1000 + 1 + i % 3:010d}" for i, code in enumerate(codes)]


def _event_frame(world: World) -> pd.DataFrame:
    """Events in file order: sorted by day, generation order kept within a day."""
    frame = pd.DataFrame({"user": world.user_of_event(), "item": world.seq_items, "day": world.seq_days})
    return frame.sort_values("day", kind="stable")


@register_writer("hm")
def _write_hm(world: World, out: Path, images: bool, name: str) -> dict[str, str]:
    ids = _hm_article_ids(world)
    themes = [world.theme(i) for i in range(world.n_items)]
    descriptions = [description_of(world, i) if i % 23 else "" for i in range(world.n_items)]
    pd.DataFrame({
        "article_id": ids,
        "product_code": [a[:7] for a in ids],
        "prod_name": [title_of(world, i) for i in range(world.n_items)],
        "product_type_name": [t.product.capitalize() for t in themes],
        "product_group_name": ["Garment" for _ in themes],
        "graphical_appearance_name": [t.texture.capitalize() for t in themes],
        "colour_group_name": [c.capitalize() for c in world.colour],
        "index_name": ["Ladieswear" if i % 2 else "Divided" for i in range(world.n_items)],
        "detail_desc": descriptions,
    }).to_csv(out / "articles.csv", index=False)
    events = _event_frame(world)
    customer = [f"{h:016x}" * 4 for h in np.random.default_rng([world.seed, 13]).integers(0, 2**63, size=world.n_users)]
    dates = pd.Series(pd.to_datetime(START_DATE) + pd.to_timedelta(np.arange(world.seq_days.max() + 1), unit="D"))
    pd.DataFrame({
        "t_dat": dates.dt.strftime("%Y-%m-%d").to_numpy()[events["day"].to_numpy()],
        "customer_id": np.asarray(customer, dtype=object)[events["user"].to_numpy()],
        "article_id": np.asarray(ids, dtype=object)[events["item"].to_numpy()],
        "price": np.round(0.01 + 0.05 * world.cluster[events["item"].to_numpy()] / len(THEMES), 6),
        "sales_channel_id": 1 + events["user"].to_numpy() % 2,
    }).to_csv(out / "transactions_train.csv", index=False)
    if images:
        write_images(world, {i: out / "images" / a[:3] / f"{a}.jpg"
                             for i, a in enumerate(ids) if world.has_image[i]})
    return dict(zip(ids, (str(c) for c in world.cluster)))


@register_writer("mind")
def _write_mind(world: World, out: Path, images: bool, name: str) -> dict[str, str]:
    """news.tsv + behaviors.tsv (no header). The first half of each user's sequence is the
    click history; the rest are clicks inside impressions (``N123-1``) with 4 skipped
    (``-0``) news each, one impression row per day."""
    ids = [f"N{10000 + i}" for i in range(world.n_items)]
    with open(out / "news.tsv", "w", encoding="utf-8") as fh:
        for i, nid in enumerate(ids):
            theme = world.theme(i)
            fh.write(f"{nid}\t{theme.category}\t{theme.name}\t{title_of(world, i)}\t"
                     f"{description_of(world, i)}\thttps://assets.msn.com/{nid}.html\t[]\t[]\n")
    rng = np.random.default_rng([world.seed, 17])
    impression = 0
    with open(out / "behaviors.tsv", "w", encoding="utf-8") as fh:
        for u in range(world.n_users):
            seq = world.seq_items[world.indptr[u]: world.indptr[u + 1]]
            days = world.seq_days[world.indptr[u]: world.indptr[u + 1]]
            cut = max(1, len(seq) // 2)
            history = " ".join(ids[i] for i in seq[:cut])
            for day in np.unique(days[cut:]):
                clicked = seq[cut:][days[cut:] == day]
                shown = [f"{ids[i]}-1" for i in clicked] + [f"{ids[i]}-0" for i in rng.integers(0, world.n_items, 4)]
                when = dt.datetime.combine(START_DATE, dt.time(9)) + dt.timedelta(days=int(day), seconds=int(u % 3600))
                impression += 1
                fh.write(f"{impression}\tU{u}\t{when.strftime('%m/%d/%Y %I:%M:%S %p')}\t{history}\t{' '.join(shown)}\n")
    return dict(zip(ids, (str(c) for c in world.cluster)))


@register_writer("ninerec")
def _write_ninerec(world: World, out: Path, images: bool, name: str) -> dict[str, str]:
    """``NAME_pair.csv`` (item,user,timestamp), ``NAME_item.csv`` (item,text,text_en),
    covers ``NAME_cover/<item>.jpg``."""
    ids = [str(1000 + i) for i in range(world.n_items)]
    pd.DataFrame({"item": ids, "text": [title_of(world, i) for i in range(world.n_items)],
                  "text_en": [description_of(world, i) for i in range(world.n_items)]}
                 ).to_csv(out / f"{name}_item.csv", index=False)
    _interaction_table(world, ids, "item", "user", "timestamp").to_csv(out / f"{name}_pair.csv", index=False)
    if images:
        write_images(world, {i: out / f"{name}_cover" / f"{a}.jpg" for i, a in enumerate(ids) if world.has_image[i]})
    return dict(zip(ids, (str(c) for c in world.cluster)))


@register_writer("generic")
def _write_generic(world: World, out: Path, images: bool, name: str) -> dict[str, str]:
    """``interactions.csv`` (user_id,item_id,timestamp), ``items.csv`` (item_id,text,image)."""
    ids = [f"item{i:05d}" for i in range(world.n_items)]
    image_paths = [f"images/{a}.jpg" if world.has_image[i] else "" for i, a in enumerate(ids)]
    pd.DataFrame({"item_id": ids,
                  "text": [f"{title_of(world, i)}. {description_of(world, i)}" for i in range(world.n_items)],
                  "image": image_paths}).to_csv(out / "items.csv", index=False)
    _interaction_table(world, ids, "item_id", "user_id", "timestamp")[["user_id", "item_id", "timestamp"]].to_csv(
        out / "interactions.csv", index=False)
    if images:
        write_images(world, {i: out / p for i, p in enumerate(image_paths) if p})
    return dict(zip(ids, (str(c) for c in world.cluster)))


@register_writer("seqtsv")
def _write_seqtsv(world: World, out: Path, images: bool, name: str) -> dict[str, str]:
    """``users.tsv`` (user \\t items in time order) and ``items.tsv`` (item \\t text [\\t image])."""
    ids = [f"i{i}" for i in range(world.n_items)]
    with open(out / "items.tsv", "w", encoding="utf-8") as fh:
        for i, a in enumerate(ids):
            image = f"\timages/{a}.jpg" if images and world.has_image[i] else ""
            fh.write(f"{a}\t{title_of(world, i)}{image}\n")
    with open(out / "users.tsv", "w", encoding="utf-8") as fh:
        for u in range(world.n_users):
            seq = world.seq_items[world.indptr[u]: world.indptr[u + 1]]
            fh.write(f"u{u}\t{' '.join(ids[i] for i in seq)}\n")
    if images:
        write_images(world, {i: out / "images" / f"{a}.jpg" for i, a in enumerate(ids) if world.has_image[i]})
    return dict(zip(ids, (str(c) for c in world.cluster)))


def _interaction_table(world: World, ids: list[str], item_col: str, user_col: str, time_col: str) -> pd.DataFrame:
    """Unix-second timestamps (one minute apart within a day) in day order."""
    events = _event_frame(world)
    base = int(dt.datetime.combine(START_DATE, dt.time(8)).replace(tzinfo=dt.timezone.utc).timestamp())
    position = np.arange(len(world.seq_items)) - np.repeat(world.indptr[:-1], np.diff(world.indptr))
    stamps = base + world.seq_days * 86_400 + position * 60
    return pd.DataFrame({
        item_col: np.asarray(ids, dtype=object)[events["item"].to_numpy()],
        user_col: [f"u{u}" for u in events["user"].to_numpy()],
        time_col: stamps[events.index.to_numpy()],
    })


def synthesize(fmt: str, out: Path, *, users: int = 2000, items: int = 500, seed: int = 0,
               clusters: int = 12, images: bool = True, name: str = "synth") -> dict:
    """Write a synthetic raw dataset in ``fmt``'s real layout to ``out``.

    Args:
        fmt: one of :func:`list_synth_formats` (``hm``, ``mind``, ``ninerec``, ``generic``, ``seqtsv``).
        out: folder to write (created); existing files of the same names are replaced.
        users, items, seed: size and seed; the same arguments give the same files.
        clusters: number of latent clusters (2..16).
        images: write JPEGs (skip for fast large benchmarks; the layout stays the same).
        name: file prefix for NineRec (``NAME_pair.csv``).

    Returns:
        a summary dict (format, folder, counts, clusters); ``truth.json`` holds the clusters.
    """
    if fmt not in _WRITERS:
        raise UserError(f"unknown synthetic format {fmt!r}; choose one of {', '.join(list_synth_formats())}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(users, items, seed, clusters)
    truth = _WRITERS[fmt](world, out, images, name)
    summary = {"format": fmt, "users": world.n_users, "items": world.n_items,
               "interactions": int(len(world.seq_items)), "clusters": clusters, "seed": seed,
               "images": int(world.has_image.sum()) if images else 0}
    (out / "truth.json").write_text(json.dumps({**summary, "item_cluster": truth}))
    return {**summary, "out": str(out)}
