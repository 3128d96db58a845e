"""Synthetic raw datasets from a generative world whose optimum is known exactly.

Why: none of the real datasets can be downloaded here, yet every stage (readers,
encoders, recommenders, ranking) must be exercised end to end on data where the
right answer is known, and the world must pose the papers' question: content that
pretrained encoders can read at a fine grain, plus an item-level signal only an ID
table can learn. The generative model (:func:`build_world`):

- every item has a continuous latent vector ``z`` (:data:`LATENT_DIM` numbers) near
  the centre of one of K *regions*. Its picture is rendered from ``z`` (hue, shape,
  size, pattern, position, number of objects) and so is its text (words whose anchors
  in latent space lie near ``z``, a colour word from the hue, a material word, a
  product type from the shape), so image and text encoders recover neighbourhoods;
- every item has :data:`LINKS` idiosyncratic follow-up items (complements,
  collections), drawn independently of content: only an ID table can learn them;
- popularity is log-normal, partly a linear function of ``z`` (popular regions) and
  partly item noise;
- every user has a long-term taste vector; the content query at each step mixes it
  with an exponentially weighted mean of the latents of the items seen so far.

The next item is drawn from the mixture ``content * P_content + id * P_links(last item)
+ popularity * P_popularity`` restricted to items the user has not seen
(:class:`Signals`). :mod:`data.oracle` recomputes that distribution for any prepared
split from ``world.npz`` (written beside ``truth.json``), which gives the oracle row.

Example:
    >>> synthesize("hm", Path("raw/HM"), users=2000, items=500, seed=0)
"""

from __future__ import annotations

import colorsys
import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy.special import ndtr

from featurestore.errors import UserError
from featurestore.registry import Registry

IMAGE_SIZE = 96
MISSING_IMAGE_RATE = 0.03
START_DATE = dt.date(2019, 9, 1)
WORLD_FILE = "world.npz"
TRUTH_FILE = "truth.json"

LATENT_DIM = 8
ITEM_SPREAD = 0.45  # std of an item's latent around its region centre (centres are N(0, I))
CONTENT_WIDTH = 0.6  # kernel width of the content component over region centres
LINKS = 2
LINK_WEIGHTS = (0.75, 0.25)
POPULARITY_SPREAD = 1.0  # std of log popularity
POPULARITY_FROM_CONTENT = 0.6  # share of log-popularity variance explained by the latent
MEMORY_DECAY = 0.5  # weight of the past in the short-term state
MAX_LENGTH = 60
LANGUAGE_SEED = 20261201  # word anchors, colours and materials are the same in every world
USER_CHUNK = 8192


@dataclass(frozen=True)
class Signals:
    """Mixture weights of the next-item distribution (normalised to sum to 1) and the
    share of the long-term taste in the content query (the rest is the recent items)."""

    content: float = 0.55
    id: float = 0.35
    popularity: float = 0.10
    taste: float = 0.5

    def __post_init__(self) -> None:
        weights = (self.content, self.id, self.popularity)
        if min(weights) < 0 or self.content + self.popularity <= 0:
            raise UserError("--content-signal, --id-signal and --popularity must be >= 0, and --content-signal "
                            "or --popularity above 0 (links alone run out: a user's last item may have no "
                            "unseen follow-up)")
        if not 0 <= self.taste <= 1:
            raise UserError(f"--taste must lie in [0, 1], got {self.taste}")

    def mixture(self, first_step: bool = False) -> np.ndarray:
        """(content, id, popularity) weights; the first item has no last item to link from."""
        weights = np.array([self.content, 0.0 if first_step else self.id, self.popularity])
        if weights.sum() == 0:
            weights = np.array([self.content + 1e-12, 0.0, self.popularity + 1e-12])
        return weights / weights.sum()


@dataclass
class World:
    """One draw of the generative model: items, their content, users and their sequences.

    Items are indices 0..I-1, users 0..U-1; ``seq_items``/``seq_days`` are CSR over users
    by ``indptr`` in generation (= time) order, without repeats within a user.
    """

    seed: int
    latent: np.ndarray  # (I, LATENT_DIM) float32
    region: np.ndarray  # (I,) region of each item
    centres: np.ndarray  # (K, LATENT_DIM)
    popularity: np.ndarray  # (I,) float64, sums to 1
    links: np.ndarray  # (I, LINKS) follow-up items
    taste: np.ndarray  # (U, LATENT_DIM) float32
    signals: Signals
    indptr: np.ndarray
    seq_items: np.ndarray
    seq_days: np.ndarray
    has_image: np.ndarray
    text: dict = field(default_factory=dict)  # per-item word lists, see _item_text

    @property
    def n_items(self) -> int:
        return len(self.region)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def user_of_event(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), np.diff(self.indptr))


# ---- the next-item distribution, shared with data.oracle --------------------------------

def content_query(taste: np.ndarray, memory: np.ndarray | None, signals: Signals) -> np.ndarray:
    """The content component's query: long-term taste mixed with the short-term memory
    (rescaled so its spread matches the latents'); taste alone before the first item."""
    if memory is None:
        return taste
    a = signals.taste
    return (a * taste + (1 - a) * memory) / math.sqrt(a * a + (1 - a) * (1 - a))


def update_memory(memory: np.ndarray | None, latent: np.ndarray) -> np.ndarray:
    """Short-term state after seeing an item with ``latent``."""
    return latent.copy() if memory is None else MEMORY_DECAY * memory + (1 - MEMORY_DECAY) * latent


def region_weights(query: np.ndarray, centres: np.ndarray, region_popularity: np.ndarray,
                   dtype: type = np.float64) -> np.ndarray:
    """(B, K) probability of each region under the content component: a Gaussian kernel
    around the query times the region's total popularity. The generator samples in
    float32 (speed); the oracle scores in float64."""
    query = np.asarray(query, dtype=dtype)
    centres = np.asarray(centres, dtype=dtype)
    logits = query @ (centres.T / dtype(CONTENT_WIDTH ** 2))
    logits += (np.log(region_popularity) - 0.5 * (centres * centres).sum(axis=1) / CONTENT_WIDTH ** 2).astype(dtype)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def build_world(users: int, items: int, seed: int, clusters: int | None = None,
                signals: Signals = Signals(), mean_length: float = 11.0,
                popularity_spread: float = POPULARITY_SPREAD) -> World:
    """Draw items (latent, region, links, popularity, text), users and their sequences.

    ``mean_length``: mean sequence length before the cap (geometric, at least 3, at most
    :data:`MAX_LENGTH` and half the catalogue); ``popularity_spread``: the std of log popularity
    (larger = a heavier head)."""
    clusters = default_regions(items) if clusters is None else clusters
    if clusters < 2:
        raise UserError(f"--clusters must be at least 2, got {clusters}")
    if items < clusters * 2 or users < 1 or items < 2 * LINKS + 4:
        raise UserError(f"need at least {max(clusters * 2, 2 * LINKS + 4)} items and 1 user, "
                        f"got {items} items, {users} users")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, LATENT_DIM))
    region = rng.permutation(np.arange(items) % clusters)
    latent = (centres[region] + ITEM_SPREAD * rng.standard_normal((items, LATENT_DIM))).astype(np.float32)
    direction = rng.standard_normal(LATENT_DIM)
    direction /= np.linalg.norm(direction) * math.sqrt(1 + ITEM_SPREAD ** 2)
    log_pop = popularity_spread * (math.sqrt(POPULARITY_FROM_CONTENT) * (latent @ direction)
                                   + math.sqrt(1 - POPULARITY_FROM_CONTENT) * rng.standard_normal(items))
    popularity = np.exp(log_pop - log_pop.max())
    popularity /= popularity.sum()
    links = _draw_links(rng, items)
    has_image = rng.random(items) >= MISSING_IMAGE_RATE
    taste = rng.standard_normal((users, LATENT_DIM)).astype(np.float32)
    lengths = np.clip(rng.geometric(1.0 / (mean_length - 2), size=users) + 2, 3, min(MAX_LENGTH, items // 2))
    start_day = rng.integers(0, 600, size=users)
    world = World(seed, latent, region, centres, popularity, links, taste, signals,
                  np.zeros(users + 1, dtype=np.int64), np.zeros(0, dtype=np.int32),
                  np.zeros(0, dtype=np.int32), has_image)
    chosen = _simulate(world, rng, lengths)
    days = np.zeros(chosen.shape, dtype=np.int32)
    days[:, 0] = start_day
    if chosen.shape[1] > 1:
        gaps = rng.choice(np.array([0, 0, 1, 2, 3, 7], dtype=np.int32), size=(users, chosen.shape[1] - 1))
        days[:, 1:] = start_day[:, None] + np.cumsum(gaps, axis=1)
    mask = np.arange(chosen.shape[1])[None, :] < lengths[:, None]
    np.cumsum(lengths, out=world.indptr[1:])
    world.seq_items, world.seq_days = chosen[mask], days[mask]
    world.text = _item_text(latent, np.random.default_rng([seed, 5]))
    return world


def default_regions(items: int) -> int:
    """About 8 items per region on small catalogues, at most 128 regions (680 items each at
    87K): sampling costs events x regions, and 128 keeps 650K users within the old budget."""
    return int(np.clip(items // 8, 4, 128))


def _draw_links(rng: np.random.Generator, items: int) -> np.ndarray:
    """LINKS distinct follow-ups per item, none the item itself, uniform over the catalogue."""
    links = np.empty((items, LINKS), dtype=np.int32)
    for k in range(LINKS):
        links[:, k] = rng.integers(0, items, size=items)
    while True:
        bad = (links == np.arange(items)[:, None]).any(axis=1)
        for a in range(LINKS):
            for b in range(a):
                bad |= links[:, a] == links[:, b]
        if not bad.any():
            return links
        links[bad] = rng.integers(0, items, size=(int(bad.sum()), LINKS))


def _simulate(world: World, rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """(U, max length) item chosen at each step, by the mixture without repeats (rejection)."""
    users, steps = len(lengths), int(lengths.max())
    chosen = np.full((users, steps), -1, dtype=np.int32)
    memory = np.zeros((users, LATENT_DIM), dtype=np.float32)
    region_pop = np.bincount(world.region, weights=world.popularity, minlength=len(world.centres))
    # items sorted by region; one concatenated CDF where region r occupies [r, r + 1]
    order = np.argsort(world.region, kind="stable")
    starts = np.searchsorted(world.region[order], np.arange(len(world.centres)))
    within = np.cumsum(world.popularity[order] / region_pop[world.region[order]])
    before = np.r_[0.0, within][starts]
    cdf = world.region[order] + within - before[world.region[order]]
    cdf[np.r_[starts[1:], len(order)] - 1] = np.arange(1, len(starts) + 1)  # exact region ends
    pop_cdf = np.cumsum(world.popularity)
    pop_cdf[-1] = 1.0
    link_cdf = np.cumsum(LINK_WEIGHTS) / sum(LINK_WEIGHTS)
    for t in range(steps):
        mix_cdf = np.cumsum(world.signals.mixture(first_step=t == 0))
        for chunk_start in range(0, users, USER_CHUNK):
            rows = np.arange(chunk_start, min(users, chunk_start + USER_CHUNK))
            rows = rows[lengths[rows] > t]
            if not len(rows):
                continue
            pending = np.arange(len(rows))
            picks = np.empty(len(rows), dtype=np.int32)
            while len(pending):
                component = np.searchsorted(mix_cdf, rng.random(len(pending)) * mix_cdf[-1], side="right")
                component = np.minimum(component, 2)
                pick = np.empty(len(pending), dtype=np.int64)
                content = component == 0
                if content.any():  # region weights only for the rows that draw from content
                    who = rows[pending[content]]
                    query = content_query(world.taste[who], memory[who] if t else None, world.signals)
                    region_cdf = np.cumsum(region_weights(query, world.centres, region_pop, np.float32), axis=1)
                    u = rng.random(len(who), dtype=np.float32)
                    reg = np.minimum((region_cdf < u[:, None] * region_cdf[:, -1:]).sum(axis=1), len(starts) - 1)
                    slot = np.searchsorted(cdf, reg + rng.random(len(reg)), side="right")
                    pick[content] = order[np.minimum(slot, len(order) - 1)]
                linked = component == 1
                if linked.any():
                    which = np.searchsorted(link_cdf, rng.random(int(linked.sum())), side="right")
                    last = chosen[rows[pending[linked]], t - 1]
                    pick[linked] = world.links[last, np.minimum(which, LINKS - 1)]
                popular = component == 2
                if popular.any():
                    pick[popular] = np.minimum(np.searchsorted(pop_cdf, rng.random(int(popular.sum())), side="right"),
                                               len(pop_cdf) - 1)
                seen = (chosen[rows[pending], :t] == pick[:, None]).any(axis=1) if t else np.zeros(len(pick), bool)
                picks[pending[~seen]] = pick[~seen]
                pending = pending[seen]
            chosen[rows, t] = picks
            memory[rows] = update_memory(memory[rows] if t else None, world.latent[picks])
    return chosen


# ---- content: attributes, text and pictures rendered from the latent ---------------------

SHAPES = ("circle", "ring", "cross", "triangle", "square", "diamond", "hexagon", "star")
PATTERNS = ("plain", "stripes", "dots", "checks", "grid", "diagonal", "waves")
COLOURS = ("red", "orange", "yellow", "lime", "green", "emerald", "turquoise", "sky blue",
           "blue", "violet", "purple", "pink")
MATERIALS = ("cotton", "linen", "wool", "silk", "denim", "leather", "velvet", "jersey",
             "cashmere", "satin", "corduroy", "fleece")
PRODUCTS = ("swimsuit", "hat", "jacket", "coat", "hoodie", "sweater", "dress", "skirt", "blouse",
            "shirt", "boots", "shoes", "trousers", "shorts", "scarf", "bag")
CATEGORIES = ("travel", "outdoors", "lifestyle", "sports", "music", "food", "health", "autos")
REGION_WORDS = tuple("""
sea wave beach sailing coral surf harbour tide forest pine hiking moss trail camping leaf woodland
fire flame chili spicy volcano heat ember blaze lemon sunshine citrus honey sunflower golden bright
summer royal crown lavender palace elegant grape orchid pumpkin harvest maple autumn amber cinnamon
copper rust blossom rose romance petal candy flamingo cherry tulip midnight shadow rock concert urban
noir guitar snow winter ski frost glacier polar ice alpine coffee chocolate wood desert canyon cocoa
saddle clay steel engine machine robot metal industrial silver gear tropical palm lagoon jungle parrot
mango island paradise football tennis running stadium match league goal athlete market stocks bank
investor economy budget profit trade garden herb olive basil vegetable farm organic meadow wine
vineyard burgundy cellar berry ruby feast dinner river lake mountain valley cliff meadowlark storm
thunder rain cloud breeze mist fog rainbow comet planet galaxy star moon orbit rocket astronaut
dragon castle knight legend myth fairy wizard quest pirate treasure anchor compass voyage map
lantern candle fireplace cabin cottage village city street bridge tower skyline subway taxi bicycle
scooter motorcycle tractor train station airport jet balloon kite picnic bakery bread butter cheese
pasta pizza sushi noodle curry taco burger salad soup pepper garlic ginger vanilla mint caramel
cookie cake donut waffle pancake yogurt cereal apple pear peach plum lime banana coconut pineapple
melon kiwi fig date walnut almond peanut hazelnut pistachio tea espresso latte smoothie lemonade
soda jazz blues opera ballet piano violin drum trumpet choir festival disco vinyl radio cinema
theatre comedy drama poetry novel library museum gallery painting sketch sculpture pottery
photograph camera studio workshop science laboratory atom crystal magnet circuit signal pixel
laptop keyboard tablet satellite antenna battery turbine solar nuclear electric hybrid diesel
safari zebra tiger lion panda koala penguin dolphin whale shark octopus turtle falcon owl eagle
sparrow butterfly bee spider fox wolf bear deer rabbit squirrel horse pony lamb puppy kitten
yoga pilates marathon cycling climbing rowing boxing karate surfing skating hockey baseball golf
cricket rugby volleyball swimming diving fishing hunting archery chess puzzle riddle lottery
casino jackpot wedding birthday holiday carnival parade harvestmoon lullaby cradle nursery school
college campus diploma graduation office meeting contract lawyer doctor nurse hospital clinic
vaccine vitamin protein fitness wellness spa massage sauna
""".split())
FILLER = ("new", "classic", "soft", "comfortable", "style", "collection", "everyday",
          "premium", "limited", "edition", "great", "look", "season", "favourite", "daily")
WORDS_PER_ITEM = 4
WORD_NOISE = 1.0  # Gumbel noise on word choice: neighbours share most words, not all


def _language() -> dict[str, np.ndarray]:
    """Where each word lives in latent space, and the material axis: one fixed language for
    every world, so a text encoder trained on one seed reads another the same way."""
    rng = np.random.default_rng(LANGUAGE_SEED)
    scale = math.sqrt(1 + ITEM_SPREAD ** 2)
    material = rng.standard_normal(LATENT_DIM)
    return {"anchors": rng.standard_normal((len(REGION_WORDS), LATENT_DIM)) * scale,
            "material": material / (np.linalg.norm(material) * scale)}


def uniform_coordinates(latent: np.ndarray) -> np.ndarray:
    """Each latent coordinate mapped to (0, 1) by the normal CDF of its marginal."""
    return ndtr(np.asarray(latent, dtype=np.float64) / math.sqrt(1 + ITEM_SPREAD ** 2))


def _bin(u: np.ndarray, n: int) -> np.ndarray:
    return np.minimum((u * n).astype(np.int64), n - 1)


def _item_text(latent: np.ndarray, rng: np.random.Generator) -> dict:
    """Per item: WORDS_PER_ITEM region words (nearest anchors, Gumbel-perturbed), two
    filler words, a colour from the hue, a material, a product type from shape and size,
    a pattern name and a news category."""
    language = _language()
    u = uniform_coordinates(latent)
    words = np.empty((len(latent), WORDS_PER_ITEM), dtype=np.int64)
    anchors = language["anchors"]
    for start in range(0, len(latent), 8192):
        z = np.asarray(latent[start:start + 8192], dtype=np.float64)
        score = 2 * z @ anchors.T - (anchors * anchors).sum(axis=1)  # -|z - a|^2 up to a row constant
        score += WORD_NOISE * rng.gumbel(size=score.shape)
        words[start:start + len(z)] = np.argpartition(-score, WORDS_PER_ITEM, axis=1)[:, :WORDS_PER_ITEM]
    shape = _bin(u[:, 2], len(SHAPES))
    hue = _hue(latent)
    material = _bin(ndtr(np.asarray(latent, dtype=np.float64) @ language["material"]), len(MATERIALS))
    product = shape * 2 + (u[:, 3] > 0.5)
    return {"words": np.asarray(REGION_WORDS, dtype=object)[words],
            "filler": np.asarray(FILLER, dtype=object)[rng.integers(len(FILLER), size=(len(latent), 2))],
            "colour": np.asarray(COLOURS, dtype=object)[_bin(hue, len(COLOURS))],
            "material": np.asarray(MATERIALS, dtype=object)[material],
            "product": np.asarray(PRODUCTS, dtype=object)[product],
            "pattern": np.asarray(PATTERNS, dtype=object)[_bin(u[:, 4], len(PATTERNS))],
            "category": np.asarray(CATEGORIES, dtype=object)[product // 2]}


def _hue(latent: np.ndarray) -> np.ndarray:
    latent = np.asarray(latent, dtype=np.float64)
    return (np.arctan2(latent[:, 1], latent[:, 0]) / (2 * math.pi)) % 1.0


def render_image(latent: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A picture of one item from its latent: hue, shape, size, pattern and its density,
    position and number of objects each follow latent coordinates; small jitter and
    pixel noise come from ``rng``."""
    latent = np.asarray(latent, dtype=np.float64)[None]
    u = uniform_coordinates(latent)[0]
    hue = float(_hue(latent)[0])
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * u[5], 0.55 + 0.4 * u[6])) * 255
    pale = 255 - (255 - np.array(colorsys.hsv_to_rgb((hue + 0.08) % 1, 0.25, 0.95)) * 255) * 0.9
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in pale))
    draw = ImageDraw.Draw(canvas)
    pattern_bin = u[4] * len(PATTERNS)
    _draw_texture(draw, PATTERNS[min(int(pattern_bin), len(PATTERNS) - 1)], size,
                  tuple(int(v) for v in pale * 0.8), 7 + int(6 * (pattern_bin % 1)), rng)
    count = 1 + min(2, int(u[7] * 3))
    radius = size * (0.12 + 0.16 * u[3]) / math.sqrt(count)
    centre = size * (0.3 + 0.4 * np.array([u[5], u[6]]))
    shape = SHAPES[min(int(u[2] * len(SHAPES)), len(SHAPES) - 1)]
    for k in range(count):
        angle = 2 * math.pi * k / count + u[0] * math.pi
        offset = 0 if count == 1 else 1.3 * radius
        where = centre + offset * np.array([math.cos(angle), math.sin(angle)]) + rng.uniform(-2, 2, size=2)
        _draw_shape(draw, shape, where, radius, rng.uniform(-0.15, 0.15), tuple(int(v) for v in rgb))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, size: int, ink: tuple, step: int,
                  rng: np.random.Generator) -> None:
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
        render_image(world.latent[item], rng).save(path, format="JPEG", quality=90)


def title_of(world: World, item: int) -> str:
    t = world.text
    w = t["words"][item]
    return f"{w[0].capitalize()} {w[1]} {t['colour'][item]} {t['material'][item]} {t['product'][item]}"


def description_of(world: World, item: int) -> str:
    t = world.text
    w, f = t["words"][item], t["filler"][item]
    return (f"{f[0].capitalize()} {f[1]} {t['product'][item]} in {t['colour'][item]} {t['material'][item]} "
            f"with {t['pattern'][item]} print, {w[2]} and {w[3]} details, a {w[0]} favourite.")


# ---- writers, one per raw layout --------------------------------------------------------

Writer = Callable[[World, Path, bool, str], tuple[list[str], list[str]]]
WRITERS: Registry[Writer] = Registry("synthetic format", unknown="{suggestion}choose one of {names}", sort=True)
register_writer = WRITERS.register


def list_synth_formats() -> list[str]:
    return WRITERS.names()


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
def _write_hm(world: World, out: Path, images: bool, name: str) -> tuple[list[str], list[str]]:
    ids = _hm_article_ids(world)
    text = world.text
    descriptions = [description_of(world, i) if i % 23 else "" for i in range(world.n_items)]
    pd.DataFrame({
        "article_id": ids,
        "product_code": [a[:7] for a in ids],
        "prod_name": [title_of(world, i) for i in range(world.n_items)],
        "product_type_name": [p.capitalize() for p in text["product"]],
        "product_group_name": ["Garment"] * world.n_items,
        "graphical_appearance_name": [p.capitalize() for p in text["pattern"]],
        "colour_group_name": [c.capitalize() for c in text["colour"]],
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
        "price": np.round(0.01 + 0.05 * world.popularity.argsort().argsort()[events["item"].to_numpy()] / world.n_items, 6),
        "sales_channel_id": 1 + events["user"].to_numpy() % 2,
    }).to_csv(out / "transactions_train.csv", index=False)
    if images:
        write_images(world, {i: out / "images" / a[:3] / f"{a}.jpg"
                             for i, a in enumerate(ids) if world.has_image[i]})
    return ids, customer


@register_writer("mind")
def _write_mind(world: World, out: Path, images: bool, name: str) -> tuple[list[str], list[str]]:
    """news.tsv + behaviors.tsv (no header). The first half of each user's sequence is the
    click history; the rest are clicks inside impressions (``N123-1``) with 4 skipped
    (``-0``) news each, one impression row per day."""
    ids = [f"N{10000 + i}" for i in range(world.n_items)]
    with open(out / "news.tsv", "w", encoding="utf-8") as fh:
        for i, nid in enumerate(ids):
            fh.write(f"{nid}\t{world.text['category'][i]}\t{world.text['material'][i]}\t{title_of(world, i)}\t"
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
    return ids, [f"U{u}" for u in range(world.n_users)]


@register_writer("ninerec")
def _write_ninerec(world: World, out: Path, images: bool, name: str) -> tuple[list[str], list[str]]:
    """``NAME_pair.csv`` (item,user,timestamp), ``NAME_item.csv`` (item,text,text_en),
    covers ``NAME_cover/<item>.jpg``."""
    ids = [str(1000 + i) for i in range(world.n_items)]
    pd.DataFrame({"item": ids, "text": [title_of(world, i) for i in range(world.n_items)],
                  "text_en": [description_of(world, i) for i in range(world.n_items)]}
                 ).to_csv(out / f"{name}_item.csv", index=False)
    _interaction_table(world, ids, "item", "user", "timestamp").to_csv(out / f"{name}_pair.csv", index=False)
    if images:
        write_images(world, {i: out / f"{name}_cover" / f"{a}.jpg" for i, a in enumerate(ids) if world.has_image[i]})
    return ids, [f"u{u}" for u in range(world.n_users)]


@register_writer("generic")
def _write_generic(world: World, out: Path, images: bool, name: str) -> tuple[list[str], list[str]]:
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
    return ids, [f"u{u}" for u in range(world.n_users)]


@register_writer("seqtsv")
def _write_seqtsv(world: World, out: Path, images: bool, name: str) -> tuple[list[str], list[str]]:
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
    return ids, [f"u{u}" for u in range(world.n_users)]


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
               clusters: int | None = None, images: bool = True, name: str = "synth",
               signals: Signals = Signals(), mean_length: float = 11.0,
               popularity_spread: float = POPULARITY_SPREAD) -> dict:
    """Write a synthetic raw dataset in ``fmt``'s real layout to ``out``.

    Args:
        fmt: one of :func:`list_synth_formats` (``hm``, ``mind``, ``ninerec``, ``generic``, ``seqtsv``).
        out: folder to write (created); existing files of the same names are replaced.
        users, items, seed: size and seed; the same arguments give the same files.
        clusters: latent regions (default :func:`default_regions`: about 8 items each, at most 128).
        images: write JPEGs (skip for fast large benchmarks; the layout stays the same).
        name: file prefix for NineRec (``NAME_pair.csv``).
        signals: mixture weights of the next-item distribution.
        mean_length, popularity_spread: sequence length and popularity skew (:func:`build_world`).

    Returns:
        a summary dict (format, folder, counts, regions, signals); ``truth.json`` holds each
        item's region, ``world.npz`` what :mod:`data.oracle` needs to recompute every
        next-item distribution.
    """
    writer = WRITERS.get(fmt)
    world = build_world(users, items, seed, clusters, signals, mean_length, popularity_spread)  # bad sizes refused before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    item_ids, user_ids = writer(world, out, images, name)
    summary = {"format": fmt, "users": world.n_users, "items": world.n_items,
               "interactions": int(len(world.seq_items)), "clusters": len(world.centres), "seed": seed,
               "images": int(world.has_image.sum()) if images else 0, "signals": asdict(signals)}
    save_world(world, out / WORLD_FILE, item_ids, user_ids)
    (out / TRUTH_FILE).write_text(json.dumps({**summary, "world": WORLD_FILE,
                                              "item_cluster": dict(zip(item_ids, map(str, world.region.tolist())))}))
    return {**summary, "out": str(out)}


def save_world(world: World, path: Path, item_ids: list[str], user_ids: list[str]) -> None:
    """Everything the next-item distribution depends on, with the raw ids of items and users."""
    np.savez(path, latent=world.latent, region=world.region, centres=world.centres,
             popularity=world.popularity, links=world.links, taste=world.taste, indptr=world.indptr,
             seq_items=world.seq_items, item_ids=np.asarray(item_ids, dtype=bytes),
             user_ids=np.asarray(user_ids, dtype=bytes),
             signals=np.array([world.signals.content, world.signals.id, world.signals.popularity,
                               world.signals.taste]))
