"""When training stops: one policy object the loop only asks, as Lightning's ``EarlyStopping``.

It watches validation HR@10 (ties broken by NDCG@10) and decides, after each validated
epoch, whether the run goes on:

- **early stop** after ``patience`` epochs without a better validation, counted only once the
  best is clearly above the popularity baseline; before that, ``plateau_patience`` (sequential
  models first learn popularity and can sit at its level for tens of epochs, 001 Fig. 5);
- **collapse** when the loss becomes non-finite, or validation falls to near zero after being
  clearly above it (001 Fig. 5: too high a learning rate);
- and it says what to do when the best run learned no more than popularity.

Its state (best, its epoch, epochs since) is saved in the resumable checkpoint and restored
from it, so a resumed run decides exactly as an uninterrupted one. Under torchrun every
process gets process 0's decision (:meth:`EarlyStopping.agree`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eval.metrics import percent

MONITOR = ("HR@10", "NDCG@10")  # early stopping: best HR@10, ties broken by NDCG@10
COLLAPSE_FLOOR = 0.01  # a best HR@10 at least this high is "clearly above" zero ...
COLLAPSE_FRACTION = 0.1  # ... and falling below this share of it is a collapse
CLEARLY_ABOVE = 1.1  # a best validation HR@10 under 1.1x popularity's has learned no more than popularity

Decision = tuple[str, str]  # (status, message): "collapsed" / "early_stopped" / "pruned"


@dataclass
class EarlyStopping:
    """The stopping policy of one run.

    Args:
        patience: epochs without a better validation once clear of popularity.
        plateau_patience: the same while still at popularity's level.
        lr: the run's learning rate, for the advice a collapse gives.
        popular: the popularity baseline's validation metrics (None on processes other than 0).
    """

    patience: int
    plateau_patience: int
    lr: float
    popular: dict | None = None
    best: dict | None = None
    best_epoch: int | None = None
    since_best: int = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.since_best = state["best"], state["best_epoch"], state["since_best"]

    def non_finite(self, epoch: int, step: int, value: float) -> Decision:
        """The decision when a step's loss is not finite."""
        return ("collapsed", f"training collapsed at epoch {epoch}, step {step}: the loss became {value}. "
                             f"{self.kept()} Lower --lr (now {self.lr:g}; try {self.lr / 10:g}) or raise --weight-decay.")

    def update(self, epoch: int, metrics: dict) -> Decision | None:
        """Take epoch ``epoch``'s validation ``metrics``; the decision to stop, or None to go on."""
        key = MONITOR[0]
        best = self.best
        if best is not None and best[key] >= COLLAPSE_FLOOR and metrics[key] < COLLAPSE_FRACTION * best[key]:
            return ("collapsed", f"training collapsed at epoch {epoch}: validation {key} fell from "
                                 f"{percent(best[key])}% (epoch {self.best_epoch}) to {percent(metrics[key])}%. "
                                 f"{self.kept()} Lower --lr (now {self.lr:g}; try {self.lr / 10:g}).")
        if best is None or tuple(metrics[k] for k in MONITOR) > tuple(best[k] for k in MONITOR):
            self.best, self.best_epoch, self.since_best = metrics, epoch, 0
            return None
        self.since_best += 1
        patience = self.patience if self.left_plateau() else self.plateau_patience
        if self.since_best < patience:
            return None
        return ("early_stopped", f"early stop at epoch {epoch}: no better validation {key} for {patience} epochs"
                + ("." if patience == self.patience else " while still at popularity's level (--plateau-patience)."))

    def improved(self, epoch: int) -> bool:
        """Whether ``epoch`` is the best so far (its weights are the checkpoint to keep)."""
        return self.best_epoch == epoch

    def agree(self, procs: Any, decision: Decision | None) -> Decision | None:
        """Process 0's decision (and best) on every process of a torchrun launch."""
        self.best_epoch, self.best = procs.broadcast((self.best_epoch, self.best))
        return procs.broadcast(decision)

    def left_plateau(self) -> bool:
        """Whether the best validation HR@10 so far is clearly above the popularity baseline's.

        Sequential models first learn popularity and sit at its level, sometimes for tens of
        epochs, before they learn sequences (001 Fig. 5; BERT4Rec and SASRec at small lr), so
        early stopping counts ``patience`` only once this is true, ``plateau_patience`` before.
        """
        return self.best is not None and self.best[MONITOR[0]] >= CLEARLY_ABOVE * self.popular[MONITOR[0]]

    def warning(self) -> str | None:
        """What to tell the user when the run learned no more than item popularity (else None)."""
        if self.left_plateau():
            return None
        score = f"{percent(self.best[MONITOR[0]])}%" if self.best else "none"
        return (f"best validation {MONITOR[0]} {score} is not clearly above the popularity baseline's "
                f"{percent(self.popular[MONITOR[0]])}% (under {CLEARLY_ABOVE:g}x): this model has learned no more "
                f"than how popular items are, so its numbers say nothing about its item tower or backbone. It may "
                f"have stopped on the popularity plateau or be set up badly. Try more --epochs or "
                f"--plateau-patience, another --lr (now {self.lr:g}; try {self.lr * 3:g} and {self.lr / 3:g}), "
                f"--loss ce, or search with `recommend tune`.")

    def kept(self) -> str:
        if self.best_epoch is None:
            return "No epoch had finished, so there is no checkpoint."
        return f"Kept the best checkpoint (epoch {self.best_epoch})."
