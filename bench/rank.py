"""Full-pool ranking: the anchors' per-user argsort vs ``rank_targets`` vs the bare matmul.

On one set of random embeddings (default 20K users x 87K items x 512, the HM pool,
histories of ~12 items) this times

  (a) the papers' evaluation: torch matmul for a batch of users, then for every user in
      a Python loop, history masked to -inf, a full descending argsort and the rank read
      off a one-hot label (IDvsMoRec ``eval_model`` / ``metrics_topK``);
  (b) ``eval.ranking.rank_targets`` with ``--index`` (default: exact FAISS top-k' search
      + counting);
  (c) the users x items fp32 matmul alone: the floor of any exact fp32 scorer;
  (d) ``torch``: the fp32 torch matmul + top-k ranker (skipped when ``--index torch`` is (b));
  (e) ``torch-twopass``: bf16 first pass within a proven error bound, float64 rescoring of
      the candidates (``eval.torch_ranking``), beside (f) the bare bf16 matmul, its floor;

checks that (a) and (b) give identical ranks and metrics and that (d) and (e) give (b)'s
ranks on every user, ties included, and prints the speed-ups (targets on CPU: (a)/(b) >=
12x, (b)/(c) <= 1.25x, (e)/(c) <= 0.6x) and (e)'s candidates per user. The anchors' loop is slow, so by
default it runs on a user subsample and its time is extrapolated per user (said so in
the output); ``--anchor-users 0`` runs it on every user.

Targets are planted (user = target item + noise) so ranks spread over 1..50 and the
metrics compared are not all zero. (a) and (b) score with different BLAS libraries, so a
float32 near-tie could in principle order one pair differently; the check would say so.

The machine may be shared: the users are split into rounds and (c), (b), (a) are timed
alternately in each, and besides the total the output gives each method's fastest
round scaled to every user (timeit's min), the figure least disturbed by other load.

    python bench/rank.py                       # CPU, full size (a few minutes on 2 cores)
    python bench/rank.py --users 2000 --items 10000
    python bench/rank.py --device cuda --index torch
    python bench/rank.py --device cuda --index flat-gpu
"""

from __future__ import annotations

import json
import time

import click
import numpy as np
import torch

from eval.metrics import metrics_from_ranks
from eval.ranking import INDEXES, rank_targets
from eval.torch_ranking import TorchRanker, TwoPassRanker, ieee_matmuls

KS = (10, 20, 50)


def make_data(n_users: int, n_items: int, dim: int, history: int, seed: int):
    """Random item vectors, users planted near their target, ~``history`` past items each."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items + 1, dim), dtype=np.float32)
    items[0] = 0
    targets = rng.integers(1, n_items + 1, size=n_users)
    noise = rng.standard_normal((n_users, dim), dtype=np.float32)
    users = (0.17 * items[targets] + noise).astype(np.float32)
    lengths = rng.integers(max(1, history - 7), history + 8, size=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = rng.integers(1, n_items + 1, size=int(indptr[-1]))
    # histories never hold the target (as in the papers' data): shift clashes by one id
    clash = indices == np.repeat(targets, lengths)
    indices[clash] = indices[clash] % n_items + 1
    return users, items, targets, indptr, indices


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_matmul(users, items, device, batch_size, library="torch") -> float:
    """(c): scores for every user x item in user batches, nothing else (``torch-bf16``: (f)).

    The score buffer is allocated once and reused, so page faults on a fresh
    batch x N array are not charged to the floor.
    """
    n = min(batch_size, len(users))
    if library == "numpy":
        pool_t = np.ascontiguousarray(items[1:]).T
        out = np.empty((n, pool_t.shape[1]), dtype=np.float32)
        start = time.perf_counter()
        for lo in range(0, len(users), batch_size):
            batch = users[lo : lo + batch_size]
            np.matmul(batch, pool_t, out=out[: len(batch)])
        return time.perf_counter() - start
    dtype = torch.bfloat16 if library == "torch-bf16" else torch.float32
    item_t = torch.from_numpy(items[1:]).to(device).to(dtype).t()
    out = torch.empty((n, item_t.shape[1]), device=device, dtype=dtype)
    with ieee_matmuls():
        sync(device)
        start = time.perf_counter()
        for lo in range(0, len(users), batch_size):
            batch = torch.from_numpy(users[lo : lo + batch_size]).to(device).to(dtype)
            torch.matmul(batch, item_t, out=out[: len(batch)])
        sync(device)
        return time.perf_counter() - start


def anchors_ranks(users, items, targets, indptr, indices, device, batch_size=256):
    """(a): the papers' loop, kept faithful (one-hot label, -inf history, full argsort).

    ``indptr``/``indices`` are the history CSR of exactly these users.
    """
    n_items = len(items) - 1
    item_t = torch.from_numpy(items).to(device)
    item_rank = torch.arange(1, n_items + 1, dtype=torch.float32, device=device)
    ranks = np.empty(len(users), dtype=np.int64)
    for lo in range(0, len(users), batch_size):
        scores = torch.matmul(torch.from_numpy(users[lo : lo + batch_size]).to(device), item_t.t())
        for row, score in enumerate(scores):
            u = lo + row
            history = torch.from_numpy(indices[indptr[u] : indptr[u + 1]]).to(device)
            score[history] = -np.inf
            score = score[1:]
            label = torch.zeros(n_items, device=device)
            label[targets[u] - 1] = 1
            order = torch.argsort(score, descending=True)
            ranks[u] = int(torch.sum(torch.take(label, order) * item_rank).item())
    return ranks


def timed(fn, device, /, *args, **kwargs):
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--users", "n_users", default=20_000, show_default=True, help="Users ranked.")
@click.option("--items", "n_items", default=87_000, show_default=True, help="Items in the pool (N).")
@click.option("--dim", default=512, show_default=True, help="Embedding width.")
@click.option("--history", default=12, show_default=True, help="Mean history length (excluded items).")
@click.option("--anchor-users", default=2_000, show_default=True,
              help="Users the anchors' loop runs on; its time is extrapolated per user. 0 = all.")
@click.option("--rounds", default=8, show_default=True,
              help="Split the users into this many rounds and time (c), (b), (a) alternately in "
                   "each, so load from other processes hits all three alike.")
@click.option("--batch-size", default=4096, show_default=True, help="Users per search / matmul call.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Torch device for (a) and (c).")
@click.option("--index", type=click.Choice(INDEXES), default="flat", show_default=True,
              help="rank_targets index for (b) (the torch ones run on --device).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random embeddings.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(n_users, n_items, dim, history, anchor_users, rounds, batch_size, device, index, seed,
         as_json):
    """Time the anchors' per-user argsort, rank_targets, the torch rankers and the bare matmuls."""
    users, items, targets, indptr, indices = make_data(n_users, n_items, dim, history, seed)
    max_k = max(KS)
    sub = n_users if anchor_users <= 0 else min(anchor_users, n_users)
    libraries = ("torch", "numpy") if device == "cpu" else ("torch",)
    # the torch rankers, built once (as rank_targets builds its index once per call)
    rankers = {"twopass": TwoPassRanker(items, device)}
    if index != "torch":
        rankers["torch"] = TorchRanker(items, device)
    methods = ("anchors", "rank_targets", *rankers, *(f"matmul_{lib}" for lib in (*libraries, "torch-bf16")))
    ranker_ranks = {name: np.empty(n_users, dtype=np.int64) for name in rankers}

    def history_of(lo, hi):
        return indptr[lo : hi + 1] - indptr[lo], indices[indptr[lo] : indptr[hi]]

    ranks = np.empty(n_users, dtype=np.int64)
    anchor_parts, checked = [], []
    per_round = {m: [] for m in methods}  # (seconds, users) per round
    for chunk, chunk_sub in zip(np.array_split(np.arange(n_users), rounds),
                                np.array_split(np.arange(sub), rounds)):
        lo, hi = int(chunk[0]), int(chunk[-1]) + 1
        for lib in (*libraries, "torch-bf16"):
            spent = time_matmul(users[lo:hi], items, device, batch_size, lib)
            per_round[f"matmul_{lib}"].append((spent, hi - lo))
        ranks[lo:hi], spent = timed(
            rank_targets, device, users[lo:hi], items, targets[lo:hi], *history_of(lo, hi),
            exclude_history=True, max_k=max_k, index=index, batch_size=batch_size, progress=False,
            device=device)
        per_round["rank_targets"].append((spent, hi - lo))
        for name, ranker in rankers.items():
            ranker_ranks[name][lo:hi], spent = timed(ranker.ranks, device, users[lo:hi], targets[lo:hi],
                                                     *history_of(lo, hi), max_k)
            per_round[name].append((spent, hi - lo))
        a_hi = lo + len(chunk_sub)  # the anchors run on the round's first users
        part, spent = timed(anchors_ranks, device, users[lo:a_hi], items, targets[lo:a_hi],
                            *history_of(lo, a_hi), device)
        per_round["anchors"].append((spent, a_hi - lo))
        anchor_parts.append(part)
        checked.append(np.arange(lo, a_hi))
    anchor, checked = np.concatenate(anchor_parts), np.concatenate(checked)

    # total: all rounds' wall time scaled to every user; best: the fastest round's per-user
    # rate scaled to every user (timeit's min, robust to other processes on a shared machine)
    total = {m: sum(s for s, _ in r) * n_users / sum(n for _, n in r) for m, r in per_round.items()}
    best = {m: min(s / n for s, n in r) * n_users for m, r in per_round.items()}
    floor_lib = min(libraries, key=lambda lib: best[f"matmul_{lib}"])
    floor = f"matmul_{floor_lib}"

    same_ranks = np.array_equal(np.minimum(anchor, max_k + 1), ranks[checked])
    same_as_b = {name: bool(np.array_equal(r, ranks)) for name, r in ranker_ranks.items()}
    ours_metrics = metrics_from_ranks(ranks[checked], KS)
    anchor_metrics = metrics_from_ranks(anchor, KS)
    result = {
        "users": n_users, "items": n_items, "dim": dim, "mean_history": float(np.diff(indptr).mean()),
        "device": device, "index": index, "batch_size": batch_size, "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "seconds_total": total, "seconds_best_round": best, "matmul_library": floor_lib,
        "anchors_extrapolated_from_users": int(len(checked)) if len(checked) < n_users else None,
        "speedup_vs_anchors": best["anchors"] / best["rank_targets"],
        "ratio_to_matmul": best["rank_targets"] / best[floor],
        "speedup_vs_anchors_total": total["anchors"] / total["rank_targets"],
        "ratio_to_matmul_total": total["rank_targets"] / total[floor],
        "twopass_ratio_to_matmul": best["twopass"] / best[floor],
        "twopass_ratio_to_matmul_total": total["twopass"] / total[floor],
        "twopass_candidates_per_user": rankers["twopass"].candidates / n_users,
        "twopass_whole_rows_searched": rankers["twopass"].crowded,
        "identical_to_rank_targets_on_every_user": same_as_b,
        "identical_ranks": bool(same_ranks), "metrics_checked_on_users": int(len(checked)),
        "metrics": ours_metrics, "all_users_metrics": metrics_from_ranks(ranks, KS),
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        note = (f"the anchors' loop timed on {len(checked)} users, extrapolated per user; "
                if len(checked) < n_users else "")
        labels = {"anchors": "(a) anchors' matmul + per-user argsort",
                  "rank_targets": f"(b) rank_targets, --index {index}",
                  "torch": "(d) torch fp32 matmul + top-k",
                  "twopass": "(e) torch-twopass (bf16 + rescoring)",
                  **{f"matmul_{lib}": f"(c) bare users x items matmul, {lib}" for lib in libraries},
                  "matmul_torch-bf16": "(f) bare bf16 matmul, torch"}
        click.echo(f"{n_users} users x {n_items} items x {dim} dims, mean history "
                   f"{result['mean_history']:.1f}, device {device}, index {index}")
        click.echo(f"({note}{rounds} interleaved rounds; 'best' = fastest round's rate x all users)")
        click.echo(f"{'':42s} {'best s':>9s} {'total s':>9s}")
        for m in methods:
            click.echo(f"{labels[m]:42s} {best[m]:9.2f} {total[m]:9.2f}")
        click.echo(f"speed-up (a)/(b): {result['speedup_vs_anchors']:.1f}x best, "
                   f"{result['speedup_vs_anchors_total']:.1f}x total  [target >= 12x]")
        click.echo(f"cost (b)/(c):     {result['ratio_to_matmul']:.2f}x best, "
                   f"{result['ratio_to_matmul_total']:.2f}x total, of the faster matmul "
                   f"({floor_lib})  [target <= 1.25x]")
        click.echo(f"cost (e)/(c):     {result['twopass_ratio_to_matmul']:.2f}x best, "
                   f"{result['twopass_ratio_to_matmul_total']:.2f}x total  [target <= 0.6x]; "
                   f"{result['twopass_candidates_per_user']:.1f} candidates rescored per user")
        click.echo(f"identical ranks on the {len(checked)} checked users: {same_ranks}; "
                   f"metrics: {ours_metrics}")
        click.echo("same ranks as (b) on every user: "
                   + ", ".join(f"{labels[name][:3]} {same}" for name, same in same_as_b.items()))
    assert same_ranks and ours_metrics == anchor_metrics, (
        f"rank_targets and the anchors' method disagree: {ours_metrics} vs {anchor_metrics}"
    )
    assert all(same_as_b.values()), f"a torch ranker disagrees with rank_targets: {same_as_b}"


if __name__ == "__main__":
    main()
