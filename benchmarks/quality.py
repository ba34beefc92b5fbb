"""Recommendation quality of every model on one ETL output, on the same lists: one table.

    python benchmarks/quality.py --data ETL_DIR
    python benchmarks/quality.py --data ETL_DIR --output DIR        # + quality.md, .json, .png

Rows: popularity, EASE, ItemKNN (models/baselines.py), then every trained model of the family
(NeuMF, GMF, MLP, Mult-VAE, ConvNCF) as `models/train_ncf.py --data ETL_DIR --output RUN
--model NAME` with its default flags (subprocesses; their best.pt is scored here), and RecBole 1.2.1's NeuMF when
.venv-recbole/bin/python exists (benchmarks/recbole_baseline.py, trained on our train
positives and scored here on our lists). Every row is scored with the same functions on the
same arrays: sampled HR@K / NDCG@K over each user's test list (1 positive + the ETL's
negatives) and full-ranking Recall@K / NDCG@K over all items minus the user's train items
and validation positive (models/ranking.py history_matrix). EASE's l2 is chosen on the
validation lists (full NDCG@K) when the ETL wrote them. Fit seconds are each command's wall time (RecBole: data set + training, not its
scoring on our lists); train samples/s counts positives + negatives (pointwise models),
(user, positive, negative) triples (ConvNCF) or users (Mult-VAE), as the trainer logs them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from device import add_device_argument, require_device  # noqa: E402 - benchmarks/device.py
from merlin_ncf.errors import EXIT_USER_ERROR, OneLineArgumentParser, UserError, one_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROG = "quality.py"
# What the test's full ranking excludes (models/ranking.py history_matrix), recorded in quality.json so
# that --include never mixes rows scored under the earlier rule (training items only).
FULL_RANKING = "train+validation"
TRAINED = {"neumf": "NeuMF", "gmf": "GMF", "mlp": "MLP", "multvae": "Mult-VAE", "convncf": "ConvNCF"}
ALL_MODELS = ("popularity", "ease", "itemknn", *TRAINED, "recbole")
EASE_GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="ETL output directory (feature_spec.yaml)")
    p.add_argument("--models", nargs="*", choices=ALL_MODELS, default=list(ALL_MODELS),
                   help="rows (baselines first, then the trained models, then RecBole)")
    p.add_argument("--include", type=Path, nargs="+", default=[],
                   help="add the rows of earlier quality.json files on the same data (e.g. a slow RecBole row "
                        "run separately), after this run's")
    p.add_argument("--k", type=int, default=10, help="K of every metric (default 10)")
    p.add_argument("--output", type=Path, help="directory to write quality.md, quality.json and quality.png into")
    p.add_argument("--ease-l2", type=float, nargs="+", default=list(EASE_GRID),
                   help="EASE l2 values; the best on validation full NDCG@K is kept (default %(default)s)")
    p.add_argument("--knn-neighbours", type=int, default=100, help="ItemKNN neighbours per item (default 100)")
    p.add_argument("--knn-shrink", type=float, default=10.0, help="ItemKNN similarity shrinkage (default 10)")
    p.add_argument("--train-args", default="",
                   help="extra train_ncf.py flags for every trained model's row, e.g. '--epochs 1' (default: none)")
    p.add_argument("--recbole-python", type=Path, default=REPO / ".venv-recbole" / "bin" / "python",
                   help="RecBole's interpreter (the row is skipped when it is absent)")
    p.add_argument("--recbole-args", default="", help="extra recbole_baseline.py flags, e.g. '--epochs 1'")
    p.add_argument("--workdir", type=Path, help="keep training runs here (default: a temporary directory)")
    add_device_argument(p, help="where train_ncf.py and RecBole train: cpu, or cuda (needs a CUDA GPU; default cpu); "
                                "the rows are scored here on the CPU")
    args = p.parse_args(argv)
    require_device(args.device)
    if args.k < 1:
        p.error("--k must be positive")
    if any(not l2 > 0 for l2 in args.ease_l2):
        p.error("--ease-l2 values must be positive")
    return args


class Bench:
    """What every row is scored against: the ETL's train matrix and its test/validation lists."""

    def __init__(self, data: Path, k: int):
        from merlin_ncf.models.ranking import SeenItems, history_matrix, read_lists, train_matrix
        from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError

        try:
            self.spec = FeatureSpec.load(data)
            self.matrix = train_matrix(self.spec)
            self.test = read_lists(self.spec, "test")
            self.validation = read_lists(self.spec, "validation") if self.spec.has_mapping("validation") else None
            # full ranking excludes what the user did before the positive: test's includes validation
            self.seen = {split: SeenItems.from_csr(history_matrix(self.spec, split, self.matrix))
                         for split in ("validation", "test")}
        except (FeatureSpecError, ValueError, OSError) as exc:
            raise UserError(f"{data}: {one_line(exc)}") from None
        self.k = k

    def evaluate(self, score, score_all, split: str = "test") -> dict:
        from merlin_ncf.models.ranking import evaluate

        users, items = self.validation if split == "validation" else self.test
        return evaluate(score, score_all, users, items, self.seen[split], self.spec.first_item_index, self.k)


def baseline_rows(bench: Bench, args) -> list[dict]:
    from merlin_ncf.models.baselines import EASE, ItemKNN, Popularity

    rows = []
    for name in [m for m in args.models if m in ("popularity", "ease", "itemknn")]:
        start = time.perf_counter()
        note = ""
        if name == "popularity":
            model = Popularity().fit(bench.matrix)
        elif name == "itemknn":
            model = ItemKNN(args.knn_neighbours, args.knn_shrink).fit(bench.matrix)
            note = f"k={args.knn_neighbours}, shrink={args.knn_shrink:g}"
        elif bench.validation is None or len(args.ease_l2) == 1:
            model = EASE(args.ease_l2[0] if len(args.ease_l2) == 1 else 500.0).fit(bench.matrix)
            note = f"l2={model.l2:g} (not tuned)"
        else:
            tried = {}
            for l2 in args.ease_l2:
                candidate = EASE(l2).fit(bench.matrix)
                tried[l2] = bench.evaluate(candidate.score, candidate.score_all, "validation")[f"full_ndcg@{bench.k}"]
            best = max(tried, key=tried.get)
            model = EASE(best).fit(bench.matrix)
            note = f"l2={best:g} by validation full NDCG@{bench.k}"
        seconds = time.perf_counter() - start
        rows.append({"model": model.name, **bench.evaluate(model.score, model.score_all),
                     "fit_s": seconds, "train_samples_per_s": None, "note": note})
        print(f"[{PROG}] {model.name}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def model_row(bench: Bench, args, name: str, workdir: Path) -> dict:
    """train_ncf.py --model NAME with its defaults (plus --train-args) in a subprocess; its
    best.pt scored here with the model's own score() and score_all()."""
    import torch

    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from

    run = workdir / f"run-{name}"
    command = [sys.executable, str(REPO / "models" / "train_ncf.py"), "--data", str(args.data), "--output", str(run),
               "--no-progress", "--model", name, "--device", args.device, *shlex.split(args.train_args)]
    print(f"[{PROG}] {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise UserError(f"train_ncf.py --model {name} exited {result.returncode}: "
                        f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
    model = model_from(ckpt.load(run / "checkpoints" / "best.pt"))
    model.eval()
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steady = history[1:] or history  # the first epoch pays for warm-up
    config = json.loads((run / "config.json").read_text())

    def score(users, items):
        with torch.no_grad():
            return model.score(users, items).float()

    def score_all(users):
        with torch.no_grad():
            return model.score_all(users).float()

    row = {"model": TRAINED[name], **bench.evaluate(score, score_all),
           "fit_s": seconds, "train_samples_per_s": sum(r["train_samples_per_s"] for r in steady) / len(steady),
           "note": f"best epoch {config['metrics']['best_epoch']} of {config['metrics']['epochs']}, "
                   f"batch {config['options']['batch_size']}, lr {config['options']['lr']:g}"}
    print(f"[{PROG}] {row['model']}: done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return row


def recbole_row(args, workdir: Path) -> dict | None:
    """benchmarks/recbole_baseline.py in RecBole's venv; it scores our lists with models/ranking.py."""
    if not args.recbole_python.exists():
        print(f"[{PROG}] RecBole row skipped: {args.recbole_python} not found (make bench-recbole builds it)",
              file=sys.stderr)
        return None
    out = workdir / "recbole.json"
    command = [str(args.recbole_python), str(REPO / "benchmarks" / "recbole_baseline.py"), "--data", str(args.data),
               "--k", str(args.k), "--json", str(out), "--device", args.device, *shlex.split(args.recbole_args)]
    print(f"[{PROG}] {' '.join(command)}", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"recbole_baseline.py exited {result.returncode}: "
                        f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
    summary = json.loads(out.read_text())
    return {"model": "RecBole NeuMF", **summary["test"], "fit_s": summary["fit_s"],
            "train_samples_per_s": summary["train_samples_per_s"],
            "note": f"{summary['epochs']} epochs (best {summary['best_epoch']}), batch {summary['batch_size']}"}


COLUMNS = (("model", "model"), ("hr@{k}", "sampled HR@{k}"), ("ndcg@{k}", "sampled NDCG@{k}"),
           ("full_recall@{k}", "full Recall@{k}"), ("full_ndcg@{k}", "full NDCG@{k}"),
           ("fit_s", "fit s"), ("train_samples_per_s", "train samples/s"), ("note", "notes"))


def cell(key: str, value) -> str:
    if value is None:
        return "–"
    if key == "fit_s":
        return f"{value:,.1f}"
    if key == "train_samples_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(rows: list[dict], k: int) -> str:
    keys = [key.format(k=k) for key, _ in COLUMNS]
    lines = ["| " + " | ".join(title.format(k=k) for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    lines += ["| " + " | ".join(cell(key, row.get(key)) for key in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict], k: int) -> str:
    keys = [key.format(k=k) for key, _ in COLUMNS]
    table = [[title.format(k=k) for _, title in COLUMNS]] + [[cell(key, row.get(key)) for key in keys] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, len(keys) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in table) + "\n"


def plot(rows: list[dict], k: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from merlin_ncf.atomic import atomic_file

    metrics = [(f"hr@{k}", f"sampled HR@{k}"), (f"ndcg@{k}", f"sampled NDCG@{k}"),
               (f"full_recall@{k}", f"full Recall@{k}"), (f"full_ndcg@{k}", f"full NDCG@{k}")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        left.bar([m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))],
                 [row[key] for key, _ in metrics], width, label=row["model"])
    left.set_xticks(range(len(metrics)), [label for _, label in metrics])
    left.set_ylabel("test (higher is better)")
    left.legend(fontsize=8)
    left.set_title(title)
    right.barh([row["model"] for row in rows][::-1], [row["fit_s"] for row in rows][::-1], color="gray")
    right.set_xscale("log")
    right.set_xlabel("fit seconds (log)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], bench: Bench, args) -> None:
    from merlin_ncf.atomic import atomic_file

    args.output.mkdir(parents=True, exist_ok=True)
    spec = bench.spec
    info = {"data": str(args.data.resolve()), "dataset": spec.metadata.get("dataset"), "k": args.k,
            "users": int(len(bench.test[0])), "items": spec.num_items - spec.first_item_index,
            "train_interactions": int(bench.matrix.nnz), "candidates_per_list": spec.test_samples_per_series,
            "fingerprint": spec.fingerprint(), "full_ranking": FULL_RANKING}
    with atomic_file(args.output / "quality.json") as tmp:
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    with atomic_file(args.output / "quality.md") as tmp:
        tmp.write_text(markdown(rows, args.k))
    plot(rows, args.k, f"{info['dataset'] or args.data.name}: {info['users']:,} test users, "
                       f"{info['items']:,} items", args.output / "quality.png")


def included_rows(args, bench: Bench) -> list[dict]:
    rows = []
    for path in args.include:
        try:
            earlier = json.loads(path.read_text())
            info, found = earlier["info"], earlier["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--include {path}: not a quality.json ({one_line(exc)})") from None
        same = (info["fingerprint"] == bench.spec.fingerprint() if "fingerprint" in info else
                (info.get("users"), info.get("train_interactions")) == (len(bench.test[0]), bench.matrix.nnz))
        if not same or info.get("k") != args.k:
            raise UserError(f"--include {path}: its rows are for other data or another K")
        if info.get("full_ranking") != FULL_RANKING:
            raise UserError(f"--include {path}: its full-ranking columns kept the validation positive in the test "
                            "ranking (files from before 2026-11-24 evening): run those rows again")
        rows += found
    return rows


def run(args) -> int:
    bench = Bench(args.data, args.k)
    users, items = len(bench.test[0]), bench.spec.num_items - bench.spec.first_item_index
    print(f"[{PROG}] {args.data}: {users:,} test lists of {bench.test[1].shape[1]}, {items:,} items, "
          f"{bench.matrix.nnz:,} train interactions", file=sys.stderr, flush=True)
    rows = baseline_rows(bench, args)
    for row in rows:
        print(f"[{PROG}] row {json.dumps(row)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:  # mkdtemp: private, unpredictable
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in [m for m in args.models if m in TRAINED]:
            rows.append(model_row(bench, args, name, workdir))
            print(f"[{PROG}] row {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if "recbole" in args.models:
            row = recbole_row(args, workdir)
            if row is not None:
                rows.append(row)
    rows += included_rows(args, bench)
    print(text_table(rows, args.k), end="")
    if args.output is not None:
        write_outputs(rows, bench, args)
        print(f"[{PROG}] wrote {args.output}/quality.md, quality.json, quality.png", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
