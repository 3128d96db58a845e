"""The RecBole side of ``bench/parity.py``: runs inside RecBole's own virtualenv.

RecBole 1.2.1 needs numpy < 2 (it uses ``np.float_``) while this project's zarr 3
needs numpy 2, so this script imports nothing of the project: ``bench/parity.py``
starts it with the venv's Python and a job file, and reads back what it writes.

    python bench/recbole_runner.py JOB.json

The job names the atomic files (``NAME.inter`` + ``NAME.item``, written by
``bench.recbole_split``), the model (SASRec or GRU4Rec), the seed and the RecBole
settings that differ from its defaults; everything else is RecBole's default. The
script trains with RecBole's own trainer (early stopping on validation), evaluates on
test with RecBole's own evaluator (history kept in the ranking, RecBole's protocol),
and exports, in *our* item and user ids:

- ``items``: the best model's item embedding table, row = our item id, row 0 zero;
- per split (valid, test): ``SPLIT_users`` (our user index), ``SPLIT_targets``,
  ``SPLIT_histories`` (RecBole's ``item_id_list``, right-padded with 0) and
  ``SPLIT_vectors`` (the model's sequence output for that history), so the bench can
  check the split target by target and rescore the model with our ranking code;
- ``result.json``: RecBole's own test and best validation metrics, epochs, seconds.

Torch >= 2.6 loads with ``weights_only=True`` by default, which refuses RecBole's own
checkpoints (they pickle its config); this process alone gets the old default back.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.load = functools.partial(torch.load, weights_only=False)  # RecBole's checkpoints, this process only

from recbole.config import Config  # noqa: E402  (after the torch.load default above)
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402


def our_ids(dataset, field: str) -> np.ndarray:
    """Our integer id of each RecBole internal id of ``field`` (internal 0 = [PAD] -> 0)."""
    tokens = dataset.field2id_token[field]
    return np.array([0] + [int(t) for t in tokens[1:]], dtype=np.int64)


def export_split(model, loader, item_ids: np.ndarray, user_ids: np.ndarray, batch: int) -> dict:
    """Users, targets, histories (our ids) and the model's sequence outputs for one split."""
    feat = loader._dataset.inter_feat
    seq_field, len_field = model.ITEM_SEQ, model.ITEM_SEQ_LEN
    seqs, lengths = feat[seq_field], feat[len_field]
    vectors = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), batch):
            out = model.forward(seqs[start: start + batch].to(model.device),
                                lengths[start: start + batch].to(model.device))
            vectors.append(out.float().cpu().numpy())
    return {"users": user_ids[feat[model.USER_ID].numpy()],
            "targets": item_ids[feat[model.ITEM_ID].numpy()],
            "histories": item_ids[seqs.numpy()],
            "vectors": np.concatenate(vectors).astype(np.float32)}


def record_validations(trainer) -> list[float]:
    """The trainer's per-epoch validation scores (its early-stopping metric), as they come:
    RecBole's trainer keeps only the best, and the report wants the epoch count too."""
    scores: list[float] = []
    validate = trainer._valid_epoch

    def counted(*args, **kwargs):
        score, result = validate(*args, **kwargs)
        scores.append(float(score))
        return score, result

    trainer._valid_epoch = counted
    return scores


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole writes log/ and saved/ under the working directory
    torch.set_num_threads(job["threads"])
    config = Config(model=job["model"], dataset=job["dataset"], config_dict={
        "data_path": job["data_path"],
        "checkpoint_dir": str(work / "saved"),
        "seed": job["seed"],
        "use_gpu": job["device"] == "cuda",
        "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "normalize_all": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "train_neg_sample_args": None,  # CE over the whole catalogue, RecBole's default loss
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10],
        **job["overrides"],
    })
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    scores = record_validations(trainer)
    start = time.perf_counter()
    best_valid, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    seconds = time.perf_counter() - start
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)

    item_ids, user_ids = our_ids(dataset, "item_id"), our_ids(dataset, "user_id")
    table = model.item_embedding.weight.detach().float().cpu().numpy()
    items = np.zeros((job["n_items"] + 1, table.shape[1]), dtype=np.float32)
    items[item_ids[1:]] = table[1:]
    arrays = {"items": items}
    for split, loader in (("valid", valid_data), ("test", test_data)):
        for key, value in export_split(model, loader, item_ids, user_ids, config["eval_batch_size"]).items():
            arrays[f"{split}_{key}"] = value
    np.savez(work / "export.npz", **arrays)
    result = {"test": {k: float(v) for k, v in test_result.items()},
              "best_valid": {k: float(v) for k, v in best_valid_result.items()},
              "valid_metric": config["valid_metric"], "valid_scores": scores,
              "best_epoch": int(np.argmax(scores)) + 1, "epochs": len(scores), "train_seconds": seconds,
              "n_items_recbole": int(dataset.item_num - 1), "n_users_recbole": int(dataset.user_num - 1),
              "config": {k: config[k] for k in sorted(job["report_keys"]) if k in config}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
