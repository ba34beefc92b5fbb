"""RecBole 1.2.1's NeuMF (or ConvNCF) trained on our train positives and scored on OUR lists and split.

RecBole lives in its own environment (it pins packages that clash with Merlin's): run
`make bench-recbole DATA=<etl dir>`, which builds .venv-recbole/ and calls this script, or
let benchmarks/quality.py call it for its RecBole row.

    .venv-recbole/bin/python benchmarks/recbole_baseline.py --data ETL_DIR [--json OUT]
    .venv-recbole/bin/python benchmarks/recbole_baseline.py --data ETL_DIR --model ConvNCF --epochs 1 \
        --no-validation --no-full      # benchmarks/convncf.py's RecBole side

RecBole trains on exactly our train positives (its pre-split "benchmark files"), with its
own uniform negatives (4 per positive) and its NeuMF defaults (embeddings 64, MLP [128, 64],
dropout 0.1, Adam lr 0.001, batch 2048). After each epoch its model scores our validation
lists and the best epoch by sampled HR@K is kept (the full ranking, costlier than an epoch
here, is computed for the kept model only) (patience 10 epochs, as RecBole's
stopping_step); with no validation lists it trains --epochs epochs. The kept model then
scores our test lists (the ETL's 100 negatives, not RecBole's) and the full ranking with
models/ranking.py, the functions every row of benchmarks/quality.py uses, so the figures
are exactly comparable. Our encoded ids are RecBole's tokens; every real item is declared
in an .item file so items never seen in train still get a (random) embedding, like ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# RecBole's checkpoints hold numpy objects that torch>=2.6 refuses to unpickle by default.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from device import add_device_argument, require_device  # noqa: E402 - benchmarks/device.py
from merlin_ncf.atomic import atomic_file  # noqa: E402
from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError  # noqa: E402

# RecBole's own defaults for each model (its properties/model/*.yaml), negatives per positive
# and how many (user, item) pairs one forward pass scores (ConvNCF builds a 64 x 64 map each).
MODELS = {
    "NeuMF": dict(negatives=4, per_pass=2**18, describe="NeuMF (emb 64, MLP [128,64], dropout 0.1, 4 negatives)",
                  config={"mf_embedding_size": 64, "mlp_embedding_size": 64, "mlp_hidden_size": [128, 64],
                          "dropout_prob": 0.1}),
    "ConvNCF": dict(negatives=1, per_pass=2**12,
                    describe="ConvNCF (emb 64, channels 32 x 4, kernels = strides 4,4,2,2, dropout 0.2, "
                             "reg 0.1/0.1, BPR, 1 negative)",
                    config={"embedding_size": 64, "cnn_channels": [1, 32, 32, 32, 32], "cnn_kernels": [4, 4, 2, 2],
                            "cnn_strides": [4, 4, 2, 2], "dropout_prob": 0.2, "reg_weights": [0.1, 0.1],
                            "train_method": "no_pretrain"}),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory (with feature_spec.yaml)")
    parser.add_argument("--model", choices=sorted(MODELS), default="NeuMF", help="RecBole model (default NeuMF)")
    parser.add_argument("--epochs", type=int, default=100, help="maximum training epochs (default 100)")
    parser.add_argument("--no-validation", dest="validation", action="store_false",
                        help="train exactly --epochs epochs, scoring no validation lists")
    parser.add_argument("--no-full", dest="full", action="store_false",
                        help="sampled test metrics only (RecBole's ConvNCF would take hours over the catalogue)")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without a better validation HR@K (default 10)")
    parser.add_argument("--batch-size", type=int, default=2048, help="RecBole train_batch_size (default 2048)")
    parser.add_argument("--lr", type=float, default=0.001, help="RecBole learning_rate (default 0.001)")
    parser.add_argument("--k", type=int, default=10, help="K of the metrics (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--seed", type=int, default=2020, help="RecBole's seed (default 2020, its own)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    add_device_argument(parser, help="where RecBole trains and scores: cpu, or cuda (needs a CUDA GPU; default cpu)")
    return parser.parse_args(argv)


def write_atomic_files(spec: FeatureSpec, out_dir: Path) -> None:
    """RecBole's pre-split benchmark files ours.{train,valid,test}.inter (positives only:
    RecBole evaluates nothing of its own here) and ours.item with every real item."""
    from merlin_ncf.models.ranking import read_pairs

    (out_dir / "ours").mkdir(parents=True)
    columns = {"user_id:token": None, "item_id:token": None}
    for split, mapping in (("train", "train"), ("valid", "validation"), ("test", "test")):
        if not spec.has_mapping(mapping):
            mapping = "train"  # RecBole wants three files; this one is never evaluated
        users, items = read_pairs(spec.files(mapping), spec.user_feature, spec.item_feature, spec.label_feature)
        frame = pd.DataFrame(dict(zip(columns, (users, items))))
        frame.to_csv(out_dir / "ours" / f"ours.{split}.inter", sep="\t", index=False)
    pd.DataFrame({"item_id:token": np.arange(spec.first_item_index, spec.num_items)}).to_csv(
        out_dir / "ours" / "ours.item", sep="\t", index=False)


class Scorer:
    """Our encoded ids -> RecBole's internal ids, and its NeuMF's logits in our item order."""

    def __init__(self, model, dataset, spec: FeatureSpec, candidates_per_pass: int = 2**18):
        import torch

        self.model, self.per_pass = model, candidates_per_pass
        self.user_of = self._lookup(dataset, dataset.uid_field, spec.num_users)
        self.item_of = self._lookup(dataset, dataset.iid_field, spec.num_items)
        self.all_items = torch.arange(spec.num_items)

    @staticmethod
    def _lookup(dataset, field: str, size: int):
        import torch

        lookup = torch.full((size,), -1, dtype=torch.long)  # -1: unknown to RecBole
        for token, internal in dataset.field2token_id[field].items():
            if token != "[PAD]":
                lookup[int(token)] = internal
        return lookup

    def _forward(self, users, items):
        import torch

        rec_users, rec_items = self.user_of[users], self.item_of[items]
        if bool((rec_users < 0).any()):
            raise ValueError(f"users unknown to RecBole: {users[rec_users < 0][:5].tolist()}")
        known = rec_items >= 0  # only reserved ids (< first_index) are unknown: masked by the ranking
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(rec_users.unsqueeze(1).expand_as(rec_items).reshape(-1).to(device),
                                rec_items.clamp(min=0).reshape(-1).to(device)).view(rec_items.shape).cpu()
        return torch.where(known, logits, torch.full_like(logits, float("-inf")))

    def score(self, users, items):
        self.model.eval()
        rows = max(1, self.per_pass // items.shape[1])
        import torch

        return torch.cat([self._forward(users[lo:lo + rows], items[lo:lo + rows]) for lo in range(0, len(users), rows)])

    def score_all(self, users):
        return self.score(users, self.all_items.expand(len(users), -1))


def main(argv=None) -> int:
    args = parse_args(argv)
    require_device(args.device)
    try:
        spec = FeatureSpec.load(args.data)
    except FeatureSpecError as exc:
        print(f"recbole_baseline.py: error: {exc}", file=sys.stderr)
        return 2

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model import general_recommender
    from recbole.trainer import Trainer

    from merlin_ncf.models.ranking import SeenItems, evaluate, history_matrix, read_lists, train_matrix

    torch.set_num_threads(args.threads)
    test_lists = read_lists(spec, "test")
    valid_lists = read_lists(spec, "validation") if spec.has_mapping("validation") and args.validation else None
    reference = MODELS[args.model]
    train = train_matrix(spec)
    seen = {split: SeenItems.from_csr(history_matrix(spec, split, train)) for split in ("validation", "test")}
    home = os.getcwd()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # RecBole writes log/ and log_tensorboard/ into the working directory
        try:
            write_atomic_files(spec, Path(tmp))
            config = Config(model=args.model, dataset="ours", config_dict={
                "data_path": tmp,
                "benchmark_filename": ["train", "valid", "test"],
                "load_col": {"inter": ["user_id", "item_id"], "item": ["item_id"]},
                **reference["config"], "learning_rate": args.lr, "train_batch_size": args.batch_size,
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": reference["negatives"]},
                "eval_args": {"mode": "uni100", "order": "RO", "group_by": "user"},
                # RecBole picks cuda whenever torch sees a GPU and gpu_id is set: "" keeps cpu on the CPU.
                "use_gpu": args.device == "cuda", "gpu_id": "0" if args.device == "cuda" else "",
                "show_progress": False,
                "checkpoint_dir": str(Path(tmp) / "saved"), "seed": args.seed, "reproducibility": True,
            })
            dataset = create_dataset(config)
            train_data, _, _ = data_preparation(config, dataset)
            model = getattr(general_recommender, args.model)(config, train_data.dataset)
            trainer = Trainer(config, model)
            scorer = Scorer(model, dataset, spec, reference["per_pass"])
            samples_per_epoch = len(train_data.dataset) * (1 + reference["negatives"])
            epochs, best, best_state, stale = [], -1.0, None, 0
            for epoch in range(args.epochs):
                epoch_start = time.perf_counter()
                loss = trainer._train_epoch(train_data, epoch, show_progress=False)
                seconds = time.perf_counter() - epoch_start
                record = {"epoch": epoch + 1, "loss": float(loss), "seconds": seconds,
                          "samples_per_s": samples_per_epoch / seconds}
                if valid_lists is not None:
                    record["validation"] = evaluate(scorer.score, scorer.score_all, *valid_lists, seen["validation"],
                                                    spec.first_item_index, args.k, full=False)
                    hr = record["validation"][f"hr@{args.k}"]
                    if hr > best:
                        best, best_state, stale = hr, copy.deepcopy(model.state_dict()), 0
                    else:
                        stale += 1
                epochs.append(record)
                print(json.dumps(record), flush=True)
                if valid_lists is not None and stale >= args.patience:
                    break
            fit_seconds = time.perf_counter() - start
            best_epoch = len(epochs)
            if best_state is not None:
                model.load_state_dict(best_state)
                best_epoch = max(epochs, key=lambda r: r["validation"][f"hr@{args.k}"])["epoch"]
            test = evaluate(scorer.score, scorer.score_all, *test_lists, seen["test"], spec.first_item_index, args.k,
                            full=args.full)
        finally:
            os.chdir(home)

    steady = epochs[1:] or epochs
    summary = {
        "reference": f"RecBole {reference['describe']}",
        "batch_size": args.batch_size, "lr": args.lr, "epochs": len(epochs), "best_epoch": best_epoch,
        "fit_s": fit_seconds, "train_samples_per_s": sum(e["samples_per_s"] for e in steady) / len(steady),
        "epoch_seconds": [e["seconds"] for e in epochs], "threads": args.threads,
        "test": test,
    }
    print(json.dumps(summary))
    if args.json is not None:
        with atomic_file(args.json) as out:
            out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
