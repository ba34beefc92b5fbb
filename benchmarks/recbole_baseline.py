"""RecBole's NeuMF on the same ETL output, as the reference for benchmarks/train.py.

RecBole lives in its own environment (it pins packages that clash with Merlin's): run
`make bench-recbole DATA=<etl dir>`, which builds .venv-recbole/ and calls this script.
It trains on exactly our train positives and evaluates on our test positives, RecBole
sampling its own 100 negatives per user (mode uni100), so HR@10 is comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# RecBole's checkpoints hold numpy objects that torch>=2.6 refuses to unpickle by default.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory (with feature_spec.yaml)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=int, default=2048, help="RecBole train_batch_size (default 2048)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    return parser.parse_args(argv)


def _positives(spec: dict, base: Path, mapping: str) -> pd.DataFrame:
    user, item = spec["channel_spec"]["user_ch"][0], spec["channel_spec"]["item_ch"][0]
    label = spec["channel_spec"]["label_ch"][0]
    files = [base / f for chunk in spec["source_spec"][mapping] for f in chunk["files"]]
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if label in frame:
        frame = frame[frame[label] > 0]
    return frame[[user, item]].rename(columns={user: "user_id:token", item: "item_id:token"})


def write_atomic_files(etl_dir: Path, out_dir: Path) -> None:
    """RecBole's pre-split 'benchmark files': <name>.train/.valid/.test.inter."""
    spec = yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())
    valid_mapping = "validation" if "validation" in spec["source_spec"] else "test"
    (out_dir / "ours").mkdir(parents=True)
    for split, mapping in (("train", "train"), ("valid", valid_mapping), ("test", "test")):
        _positives(spec, etl_dir, mapping).to_csv(out_dir / "ours" / f"ours.{split}.inter", sep="\t", index=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "feature_spec.yaml").is_file():
        print(f"error: {args.data} is not an ETL output directory (no feature_spec.yaml)", file=sys.stderr)
        return 2

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.general_recommender import NeuMF
    from recbole.trainer import Trainer

    torch.set_num_threads(args.threads)
    etl_dir = args.data.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # RecBole writes log/ and log_tensorboard/ into the working directory
        write_atomic_files(etl_dir, Path(tmp))
        config = Config(
            model="NeuMF",
            dataset="ours",
            config_dict={
                "data_path": tmp,
                "benchmark_filename": ["train", "valid", "test"],
                "load_col": {"inter": ["user_id", "item_id"]},
                # The reference configuration named in the training issue.
                "mf_embedding_size": 64,
                "mlp_embedding_size": 64,
                "mlp_hidden_size": [128, 64],
                "dropout_prob": 0.1,
                "train_batch_size": args.batch_size,
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": 4},
                "eval_args": {"mode": "uni100", "order": "RO", "group_by": "user"},
                "metrics": ["Hit", "NDCG"],
                "topk": [10],
                "device": "cpu",
                "use_gpu": False,
                "show_progress": False,
                "checkpoint_dir": str(Path(tmp) / "saved"),
                "seed": 2020,
            },
        )
        dataset = create_dataset(config)
        train_data, _valid_data, test_data = data_preparation(config, dataset)
        model = NeuMF(config, train_data.dataset)
        trainer = Trainer(config, model)

        samples_per_epoch = len(train_data.dataset) * (1 + 4)
        epochs = []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            loss = trainer._train_epoch(train_data, epoch, show_progress=False)
            seconds = time.perf_counter() - start
            epochs.append({"epoch": epoch, "loss": float(loss), "seconds": seconds,
                           "samples_per_s": samples_per_epoch / seconds})
            print(json.dumps(epochs[-1]), flush=True)
        result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    steady = epochs[1:] or epochs
    summary = {
        "reference": "RecBole NeuMF (emb 64, MLP [128,64], 4 negatives)",
        "batch_size": args.batch_size,
        "train_samples_per_s": sum(e["samples_per_s"] for e in steady) / len(steady),
        "hr@10": float(result["hit@10"]),
        "ndcg@10": float(result["ndcg@10"]),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
