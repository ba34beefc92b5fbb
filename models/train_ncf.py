"""Train a recommender of the model family (NeuMF by default) on an ETL output directory.

    python models/train_ncf.py --data ETL_DIR --output RUN_DIR
    python models/train_ncf.py --data ETL_DIR --output RUN_DIR --model multvae
    python models/train_ncf.py --data ETL_DIR --output RUN_DIR --model multvae --protocol vae-cf
    torchrun --nproc_per_node 2 models/train_ncf.py --data ETL_DIR --output RUN_DIR
    python models/train_ncf.py --data ETL_DIR --output RUN_DIR --mode test

Writes RUN_DIR/checkpoints/{best,last}.pt, model.ts, config.json, log.jsonl and
training.png (docs/pipeline.md), and prints the final sampled HR@K / NDCG@K and the
full-ranking Recall@K / NDCG@K.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path


from merlin_ncf.models.contract import positive_int
from merlin_ncf.models.errors import TrainingError
from merlin_ncf.models.defaults import NEGATIVE_SAMPLING, OPTIMIZERS, SELECT
from merlin_ncf.models.registry import MODELS, model_class
from merlin_ncf.errors import EXIT_USER_ERROR, DefaultsHelpFormatter, UserError, one_line, run_cli  # noqa: E402

PROG = "train_ncf.py"
PROTOCOLS = ("leave-one-out", "vae-cf")
DEFAULT_MODEL = "neumf"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative finite number")
    return value


def unit_interval(text: str) -> float:
    """[0, 1): Adam's betas (1 would never forget; NaN or negative is no average)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def chosen_model(argv: list[str] | None) -> str:
    """--model, read before the full parser exists: the model's own options join it."""
    pre = Parser(prog=PROG, add_help=False, allow_abbrev=False)  # else --mode would read as --model
    pre.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL)
    return pre.parse_known_args(argv)[0].model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from merlin_ncf.models.defaults import SIZED_MODEL_OPTIONS

    name = chosen_model(argv)
    cls = model_class(name)
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               formatter_class=DefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--data", required=True, type=Path, help="ETL output directory (holds feature_spec.yaml)")
    io.add_argument("--output", type=Path, help="run directory to write (required unless --mode test --checkpoint)")
    io.add_argument("--mode", choices=("train", "test"), default="train",
                    help="train, or only evaluate a checkpoint on the test lists")
    io.add_argument("--checkpoint", type=Path,
                    help="checkpoint for --mode test (default: OUTPUT/checkpoints/best.pt)")
    io.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from checkpoints/last.pt")
    io.add_argument("--force", action="store_true", help="start over in an OUTPUT that already holds a run")

    auto = "auto: from the training set's size and the model, see models/defaults.py"
    p.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL,
                   help="which model to train; its options are listed under its name (see --model NAME --help)")
    options = p.add_argument_group(f"model {name} (auto values are printed at start)")
    cls.add_arguments(options)
    # Size-dependent defaults (models/defaults.py) replace the class defaults of these options.
    p.set_defaults(**{dest: None for dest in model_options(cls) if dest in SIZED_MODEL_OPTIONS.get(name, ())})

    train = p.add_argument_group("training (auto values are printed at start)")
    train.add_argument("--epochs", type=positive_int, help=f"maximum epochs ({auto})")
    train.add_argument("--batch-size", type=positive_int,
                       help="samples per optimizer step, summed over processes: positives + their negatives "
                            f"(pointwise, pairwise models) or users (user-row models) ({auto})")
    train.add_argument("--negatives", type=positive_int, default=4,
                       help="negatives sampled per positive (pointwise models; pairwise ones take 1)")
    train.add_argument("--negative-sampling", choices=NEGATIVE_SAMPLING,
                       help=f"uniform items, or redraw the user's own training items as RecBole does ({auto})")
    train.add_argument("--lr", type=positive_float, help=f"Adam learning rate ({auto})")
    train.add_argument("--beta1", type=unit_interval, help=f"Adam beta1 ({auto})")
    train.add_argument("--beta2", type=unit_interval, help=f"Adam beta2 ({auto})")
    train.add_argument("--eps", type=positive_float, default=1e-8, help="Adam epsilon")
    train.add_argument("--weight-decay", type=non_negative_float,
                       help=f"AdamW's decoupled weight decay, 0: plain Adam ({auto})")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="constant, or cosine: the learning rate decays to 0 over --epochs (by optimizer step)")
    train.add_argument("--ema", type=unit_interval, default=0.0,
                       help="decay per optimizer step of an exponential moving average of the weights, which "
                            "is then what is evaluated, kept in best.pt and exported (0: none)")
    train.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="adam: dense Adam on every parameter; sparse-adam: sparse embedding gradients, "
                            "their rows updated by a row-wise (lazy) Adam, dense Adam for the rest "
                            f"(NeuMF, GMF, MLP; no weight decay on the tables) ({auto}; --resume: the run's)")
    train.add_argument("--grad-accumulation", type=positive_int, default=1,
                       help="micro-batches per optimizer step (batch size is split between them)")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU")
    train.add_argument("--seed", type=int, default=0, help="seeds data order, negatives, dropout and init")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    train.add_argument("--threads", type=non_negative_int, default=0,
                       help="torch CPU threads per process (0: cores / processes on this node)")
    train.add_argument("--parts-per-chunk", type=positive_int,
                       help="parquet partitions the Loader concatenates and shuffles together "
                            "(auto: every train file up to 2^25 rows, 1 for GMF and MLP; --resume: the run's)")
    train.add_argument("--max-steps", type=non_negative_int, default=0,
                       help="batches per epoch at most (0: whole epoch), for smoke runs")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluation = p.add_argument_group("evaluation and early stopping")
    evaluation.add_argument("--topk", type=positive_int, default=10, help="K of HR@K, NDCG@K and full Recall@K")
    evaluation.add_argument("--threshold", type=float, default=1.0, help="stop once HR@K reaches this")
    evaluation.add_argument("--patience", type=non_negative_int,
                            help=f"stop after this many epochs without a better --select score, 0: never ({auto})")
    evaluation.add_argument("--min-epochs", type=non_negative_int,
                            help=f"--patience cannot stop a run before this epoch ({auto})")
    evaluation.add_argument("--select", choices=SELECT,
                            help=f"validation metric that picks the kept (best) epoch and drives --patience ({auto})")
    evaluation.add_argument("--eval-batch-size", type=positive_int,
                            help=f"candidates scored per forward pass ({auto})")
    evaluation.add_argument("--protocol", choices=PROTOCOLS, default=PROTOCOLS[0],
                            help="vae-cf also holds users out of training and scores them the way the Mult-VAE "
                                 "paper does: fold-in 80%% of each one's items, Recall@20/50 and NDCG@100 on the "
                                 "other 20%% (models/vae_cf.py; models that score rows: multvae)")
    evaluation.add_argument("--heldout-users", type=positive_int,
                            help="users held out by --protocol vae-cf (auto: 10%% of the users)")
    args = p.parse_args(argv)
    if cls.input_type == "pairwise":
        args.negatives = 1
    check_combinations(args, p, cls)
    return args


def model_options(cls) -> dict:
    """The model's own options and their class defaults (a parser of its options alone)."""
    alone = argparse.ArgumentParser(add_help=False)
    cls.add_arguments(alone)
    return vars(alone.parse_args([]))


def check_combinations(args: argparse.Namespace, p: Parser, cls) -> None:
    """Option combinations that cannot work, refused before anything is read or written."""
    from merlin_ncf.models.trainer import samples_per_row

    if args.protocol == "vae-cf" and not hasattr(cls, "score_rows"):
        p.error(f"--protocol vae-cf folds in rows of held-out users: --model {args.model} cannot score a row "
                "(multvae can)")
    if args.heldout_users is not None and args.protocol != "vae-cf":
        p.error("--heldout-users is for --protocol vae-cf")
    initialising = [f"--{name.replace('_', '-')}" for name in cls.init_options if getattr(args, name, None) is not None]
    if args.mode == "test":
        if args.protocol == "vae-cf":
            p.error("--protocol vae-cf is evaluated at the end of training, not by --mode test")
        if args.resume or args.force:
            p.error("--resume/--force train; --mode test only evaluates a checkpoint")
        if initialising:
            p.error(f"{initialising[0]} initialises a new training run; --mode test only evaluates a checkpoint")
        if args.checkpoint is None and args.output is None:
            p.error("--mode test needs --checkpoint or an --output run directory")
        return
    if args.output is None:
        p.error("--output is required to train")
    if args.checkpoint is not None:
        p.error("--checkpoint is for --mode test; to continue training use --resume")
    if args.resume and args.force:
        p.error("--resume continues the run in --output and --force replaces it: pick one")
    if args.resume and initialising:
        p.error(f"{initialising[0]} initialises a new training run (not with --resume)")
    if args.optimizer == "sparse-adam" and not cls.sparse_embeddings:
        p.error(f"--optimizer sparse-adam: --model {args.model} reads its embedding tables whole (or has none); "
                "use --optimizer adam")
    # Auto (None) options are checked at their class default; their auto values are valid.
    filled = argparse.Namespace(**{**model_options(cls), **{k: v for k, v in vars(args).items() if v is not None}})
    try:
        cls.check_arguments(filled)
    except ValueError as exc:
        p.error(str(exc))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_row = samples_per_row(cls.input_type, args.negatives)
    if args.batch_size is not None and args.batch_size // (world * args.grad_accumulation * per_row) < 1:
        row = "user" if cls.input_type == "user_rows" else "positive"
        p.error(f"--batch-size {args.batch_size} leaves no {row} per micro-batch "
                f"({world} processes x {args.grad_accumulation} accumulation x {per_row} samples)")


def choose_device(name: str):
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda: no CUDA GPU is visible to torch")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def choose_defaults(args, data, world: int = 1, verbose: bool = False) -> None:
    """Fill the auto options from the model's own training defaults, then from the training
    set's size (users for user-row models), and print them if `verbose`."""
    from merlin_ncf.models.defaults import resolve
    from merlin_ncf.models.trainer import samples_per_row

    cls = model_class(args.model)
    picked = {}
    for name, value in cls.training_defaults(args).items():
        if getattr(args, name, 0) is None:
            setattr(args, name, value)
            picked[name] = value
    picked.update(resolve(args, data.train_rows, data.num_users, cls.input_type,
                          table_rows=data.num_users + data.num_items, sparse_embeddings=cls.sparse_embeddings,
                          train_files=len(data.train_files)))
    if args.eval_batch_size is None:
        args.eval_batch_size = 2**20
    if args.batch_size // (world * args.grad_accumulation * samples_per_row(cls.input_type, args.negatives)) < 1:
        raise TrainingError(f"--batch-size {args.batch_size} leaves no positive or user per micro-batch")
    if picked and verbose:
        shown = "  ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                          for k, v in picked.items())
        print(f"auto for {args.model} and {data.train_rows:,} training positives, {data.num_users:,} users: {shown}",
              flush=True)


def train_options(args: argparse.Namespace):
    from merlin_ncf.models.trainer import TrainOptions

    names = {f.name for f in fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainOptions(**values, progress=not args.no_progress)


def build_model(args, data, split=None):
    """The --model class from its options and the data's facts (all training pairs, not one
    rank's shard, for models that hold them; without the held-out users of `split`)."""
    from merlin_ncf.models.contract import DataFacts
    from merlin_ncf.models.data import train_pairs

    cls = model_class(args.model)
    interactions = None
    if cls.needs_interactions:
        users, items = train_pairs(data) if split is None else (split.train_users, split.train_items)
        interactions = (users.numpy(), items.numpy())
    facts = DataFacts(data.num_users, data.num_items, data.first_item, interactions)
    try:
        return cls.from_args(args, facts)
    except ValueError as exc:
        raise TrainingError(f"--model {args.model}: {one_line(exc)}") from None


def heldout_split(args, data, verbose: bool):
    """--protocol vae-cf's held-out users and their fold-in / target items (models/vae_cf.py)."""
    from merlin_ncf.models import vae_cf
    from merlin_ncf.models.data import train_pairs

    users, items = train_pairs(data)
    if args.heldout_users is None:
        args.heldout_users = vae_cf.auto_heldout(users)
    try:
        split = vae_cf.split_heldout(users, items, data.num_users, data.num_items, args.heldout_users)
    except ValueError as exc:
        raise TrainingError(one_line(exc)) from None
    if verbose:
        print(f"vae-cf protocol: {args.heldout_users} users held out of training (seed {vae_cf.SPLIT_SEED}), "
              f"{int(split.fold_in.indptr[-1]):,} fold-in and {int(split.targets.indptr[-1]):,} target items",
              flush=True)
    return split


def without_users(lists, users):
    from merlin_ncf.models.data import Candidates
    import torch

    keep = ~torch.isin(lists.users, users)
    return Candidates(lists.users[keep], lists.items[keep])


def vae_cf_metrics(trainer, data, split) -> dict:
    """The held-out users' fold-in metrics of the trained model and of popularity."""
    import torch

    from merlin_ncf.models import vae_cf

    model, device = trainer.model.eval(), trainer.device

    def score_rows(rows):
        with torch.no_grad():
            return model.score_rows(rows.to(device)).float().cpu()

    found = vae_cf.evaluate(score_rows, split, data.first_item)
    return {**found, "popularity": vae_cf.evaluate(vae_cf.popularity_rows(split, data.num_items), split,
                                                   data.first_item)}


def check_fits(config: dict, data, path) -> None:
    if (config.get("nb_users"), config.get("nb_items")) != (data.num_users, data.num_items):
        raise TrainingError(
            f"checkpoint {path} is for {config.get('nb_users')} users x {config.get('nb_items')} items, "
            f"the data has {data.num_users} x {data.num_items}"
        )


# Runs from before the marker file: their checkpoint and log identify them.
LEGACY_RUN = ("checkpoints/last.pt", "log.jsonl")
RUN = "run"  # the marker's kind (workflows/atomic.py)


def check_output(args) -> dict | None:
    """Refuse an output that overlaps the data, is not a run of ours, or holds a run that
    neither --resume nor --force names; return the checkpoint to resume, if any. Writes nothing."""
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.atomic import MARKER, check_replaceable, written_by_us

    out = args.output
    check_replaceable(out, RUN, inputs=[args.data], overwrite=True)  # overlap, or not a directory
    contents = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if args.resume:
        return ckpt.load(out / "checkpoints" / "last.pt")
    if not contents or contents <= {MARKER, "checkpoints"} and not any((out / "checkpoints").glob("*")):
        return None  # nothing, or a run that stopped before its first checkpoint
    if not written_by_us(out, RUN, LEGACY_RUN):
        raise TrainingError(f"{out} is not empty and is not a training run: choose another --output "
                            "(--force only replaces a run directory)")
    if not args.force:
        raise TrainingError(f"{out} holds a run: pass --resume to continue it or --force to replace it")
    return None


def create_run_dir(out: Path) -> bool:
    """Make `out` a fresh, marked run directory, an old run there first moved to a hidden
    sibling and deleted, so a run directory never mixes two runs' files (even if killed).
    Returns whether `out` was created (False: it was an empty directory already)."""
    import shutil
    import tempfile

    from merlin_ncf.atomic import mark

    created = True
    try:
        if out.is_dir() and any(out.iterdir()):
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
            shutil.rmtree(aside, ignore_errors=True)
        elif out.is_dir():
            created = False
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        mark(out, RUN)
    except OSError as exc:
        raise TrainingError(f"cannot write run directory {out}: {exc.strerror or exc}") from None
    return created


def discard_unstarted_run(out: Path, created: bool) -> None:
    """After a failure before the first checkpoint, leave no run directory that would block
    a rerun: remove what create_run_dir made."""
    import shutil

    from merlin_ncf.atomic import MARKER

    if (out / "checkpoints" / "last.pt").exists():
        return  # a run with epochs worth resuming
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / MARKER).unlink(missing_ok=True)


def test_metrics(trainer, data, test_lists, sampled: tuple[float, float] | None = None) -> dict:
    """The final test metrics: sampled HR@K / NDCG@K on the test lists (`sampled` when the
    caller has them) and full-ranking Recall@K / NDCG@K over all items but what the user did
    before the test positive (training items, validation positive) and the reserved ids
    (models/ranking.py)."""
    from merlin_ncf.models.data import train_matrix
    from merlin_ncf.models.ranking import SeenItems, history_matrix

    k = trainer.options.topk
    hr, ndcg = sampled if sampled is not None else trainer.evaluate(test_lists)[:2]
    train = train_matrix(data)
    try:  # --mode test reads the validation lists here only
        seen = SeenItems.from_csr(history_matrix(data.spec, "test", train))
    except ValueError as exc:
        raise TrainingError(f"validation lists (excluded from the test's full ranking): {one_line(exc)}") from None
    recall, full_ndcg = trainer.evaluate_full(test_lists, seen)
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg, f"full_recall@{k}": recall, f"full_ndcg@{k}": full_ndcg}


def describe(metrics: dict, k: int) -> str:
    return (f"HR@{k} = {metrics[f'hr@{k}']:.4f}  NDCG@{k} = {metrics[f'ndcg@{k}']:.4f}  "
            f"full Recall@{k} = {metrics[f'full_recall@{k}']:.4f}  full NDCG@{k} = {metrics[f'full_ndcg@{k}']:.4f}")


def run_test(args, data, device, state: dict, path: Path) -> int:
    from merlin_ncf.models.registry import model_from
    from merlin_ncf.models.data import load_candidates
    from merlin_ncf.models.trainer import Trainer

    model = model_from(state, path)
    check_fits(model.config, data, path)
    trainer = Trainer(model, data, train_options(args), device)
    metrics = test_metrics(trainer, data, load_candidates(data, "test"))
    print(f"test {describe(metrics, args.topk)}  [{path}]")
    return 0


def run_train(args, data, device, context, resume: dict | None) -> int:
    import torch

    from merlin_ncf.models.data import load_candidates
    from merlin_ncf.models.registry import model_name

    split = heldout_split(args, data, context.is_main) if args.protocol == "vae-cf" else None
    torch.manual_seed(args.seed)  # initialisation
    model = build_model(args, data, split)
    if resume is not None:
        check_fits(resume["model"]["config"], data, args.output / "checkpoints" / "last.pt")
        if resume["model"].get("name") != model_name(model):
            raise TrainingError(f"checkpoints/last.pt is a {resume['model'].get('name')} run, not --model {args.model}: "
                                "resume it with its own --model, or --force a new run")
        if resume["model"]["config"] != model.config:
            raise TrainingError("checkpoints/last.pt was trained with other model options: "
                                f"{resume['model']['config']}")
    eval_split = data.eval_mapping
    eval_lists = load_candidates(data, eval_split)
    test_lists = eval_lists if eval_split == "test" else load_candidates(data, "test")
    if split is not None:  # the held-out users' lists would score a model that never saw them
        eval_lists, test_lists = without_users(eval_lists, split.heldout), without_users(test_lists, split.heldout)
    fingerprint = data.spec.fingerprint() if context.is_main else None
    context.barrier()  # every rank has read its data
    if resume is not None or not context.is_main:
        return train_in(args, data, device, context, resume, model, eval_lists, test_lists, fingerprint, split)
    created = create_run_dir(args.output)
    try:
        return train_in(args, data, device, context, resume, model, eval_lists, test_lists, fingerprint, split)
    except BaseException:
        discard_unstarted_run(args.output, created)
        raise


def train_in(args, data, device, context, resume, model, eval_lists, test_lists, fingerprint, split=None) -> int:
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from
    from merlin_ncf.models.export import save_json, save_torchscript
    from merlin_ncf.models.registry import model_name
    from merlin_ncf.models.plots import plot_history
    from merlin_ncf.models.trainer import Trainer, write_jsonl

    context.barrier()  # rank 0 has made the run directory
    options = train_options(args)
    eval_split = data.eval_mapping
    trainer = Trainer(model, data, options, device, context, run_dir=args.output)
    if resume is not None:
        trainer.resume_from(resume)
    if context.is_main:
        from merlin_ncf.models.trainer import describe_optimizers

        print(f"optimizer {options.optimizer}: {describe_optimizers(trainer.optimizers)}", flush=True)

    def on_epoch(record) -> None:
        if context.is_main:
            write_jsonl(trainer.state.history, args.output / "log.jsonl")
            print(f"epoch {record.epoch}: loss {record.loss:.4f}  {record.split} HR@{record.k} {record.hr:.4f}  "
                  f"NDCG@{record.k} {record.ndcg:.4f}  train {record.train_samples_per_s:,.0f} samples/s  "
                  f"eval {record.eval_samples_per_s:,.0f} samples/s  {record.epoch_time_s:.1f} s", flush=True)

    state = trainer.fit(eval_lists, eval_split, on_epoch)
    if state.best_epoch < 1:
        raise TrainingError(f"no epoch reached a finite {eval_split} HR@{options.topk}: nothing to keep")
    context.barrier()  # best.pt is on disk
    best_path = args.output / "checkpoints" / "best.pt"
    trainer.keep_only(model_from(ckpt.load(best_path), best_path).state_dict())
    sampled = None
    if eval_split == "test":
        best = state.history[state.best_epoch - 1]
        sampled = best["hr"], best["ndcg"]
    metrics = test_metrics(trainer, data, test_lists, sampled)
    if context.is_main and split is not None:
        metrics["vae_cf"] = vae_cf_metrics(trainer, data, split)
    if context.is_main:
        save_torchscript(trainer.model, args.output / "model.ts")
        write_jsonl(state.history, args.output / "log.jsonl")
        plot_history(state.history, args.output / "training.png")
        save_json({
            "model": {"name": model_name(trainer.model), "config": trainer.model.config},
            "output": trainer.model.output,
            "options": {**asdict(options), "device": str(device), "processes": context.world},
            "data": str(args.data.resolve()),
            "data_fingerprint": fingerprint,
            "columns": {"user": data.user_column, "item": data.item_column},
            "metrics": {**metrics, "split": "test", "best_epoch": state.best_epoch, "epochs": state.epoch},
        }, args.output / "config.json")
        print(f"final test {describe(metrics, options.topk)}  "
              f"(best epoch {state.best_epoch} of {state.epoch})  -> {args.output}")
        if split is not None:
            from merlin_ncf.models import vae_cf

            found = metrics["vae_cf"]
            print(f"vae-cf protocol, {found['users']} held-out users: {vae_cf.describe(found)}  "
                  f"(popularity: {vae_cf.describe(found['popularity'])})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = None
    finished = False
    code = 1
    try:
        import torch

        from merlin_ncf.models.data import open_etl
        from merlin_ncf.models.ddp import from_environment

        device = choose_device(args.device)
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_procs))
        resume = check_output(args) if args.mode == "train" else None
        for name, before in (("optimizer", "adam"), ("parts_per_chunk", 1), ("min_epochs", 0)):
            if resume is not None and getattr(args, name) is None:  # the run's own, whatever today's default
                setattr(args, name, resume.get("options", {}).get(name, before))
        data = open_etl(args.data)
        if args.mode == "test":
            from merlin_ncf.models import checkpoint as ckpt

            path = args.checkpoint or args.output / "checkpoints" / "best.pt"
            state = ckpt.load(path)
            args.model = state.get("model", {}).get("name", args.model)  # its training defaults apply
            choose_defaults(args, data)
            return run_test(args, data, device, state, path)
        context = from_environment(device)
        choose_defaults(args, data, context.world, verbose=context.is_main)
        code = run_train(args, data, device, context, resume)
        finished = True
        return code
    except UserError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        code = EXIT_USER_ERROR
        return code
    finally:
        if context is not None:
            context.close(finished)
            if context.distributed:
                from merlin_ncf.models.ddp import end_rank

                end_rank(code)


if __name__ == "__main__":
    run_cli(main)
