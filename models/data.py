"""The ETL directory as training sees it: columns found through the train parquet's merlin
schema tags, positives streamed by merlin.dataloader, candidate lists for evaluation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merlin_ncf.models.errors import TrainingError
from merlin_ncf.errors import UserError, one_line
from merlin_ncf.feature_spec import TEST, TRAIN, VALIDATION, FeatureSpec, FeatureSpecError
from merlin_ncf.workflows.transcode import etl_directory
from merlin_ncf.models.seeds import rank_seed, shared_seed

# merlin.io warns on every CPU Dataset; CPU is a supported mode of this project.
warnings.filterwarnings("ignore", message=".*CPU mode.*experimental feature.*")
warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings did not load.*")


def _merlin():
    """merlin's imports cost seconds; commands that fail on their options skip them."""
    import merlin.io
    from merlin.dataloader.torch import Loader
    from merlin.schema import Tags

    return merlin.io, Loader, Tags


@dataclass
class EtlData:
    spec: FeatureSpec
    user_column: str
    item_column: str
    label_column: str
    train_files: list[Path]
    schema: object  # merlin.schema.Schema of the train parquet, restricted to user and item
    train_rows: int = 0  # positives in train/, from the parquet footers
    # Read once per process (sampler, models that hold the pairs, the full ranking's mask),
    # and one merlin Dataset per file order (the Loader's epochs), not one per epoch.
    _pairs: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _datasets: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_users(self) -> int:
        return self.spec.num_users

    @property
    def num_items(self) -> int:
        return self.spec.num_items

    @property
    def first_item(self) -> int:
        return self.spec.first_item_index

    @property
    def eval_mapping(self) -> str:
        """Per-epoch evaluation uses validation lists when the ETL wrote them."""
        return VALIDATION if self.spec.has_mapping(VALIDATION) else TEST


def open_etl(path: str | Path) -> EtlData:
    """Validate an ETL directory: spec, train schema tags, and cardinalities."""
    try:
        path = etl_directory(path)  # a foreign Dataset Feature Specification: its transcoded copy
        spec = FeatureSpec.load(path)
        train_files = spec.files(TRAIN)
        spec.files(TEST)
    except (FeatureSpecError, UserError) as exc:
        raise TrainingError(str(exc)) from None
    if not train_files:
        raise TrainingError(f"{path}: source_spec.train lists no files")
    train_rows = count_rows(train_files)
    merlin_io, _, Tags = _merlin()
    dataset = merlin_io.Dataset([str(f) for f in train_files], engine="parquet")
    schema = dataset.schema

    def tagged(tag, what: str) -> str:
        names = schema.select_by_tag(tag).column_names
        if len(names) != 1:
            raise TrainingError(
                f"train schema must tag exactly one column {what} (found {names or 'none'}): "
                "is train/ written by workflows/etl.py (schema.pbtxt)?"
            )
        return names[0]

    user_column, item_column = tagged(Tags.USER_ID, "USER_ID"), tagged(Tags.ITEM_ID, "ITEM_ID")
    for column, feature in ((user_column, spec.user_feature), (item_column, spec.item_feature)):
        if column != feature:
            raise TrainingError(f"train schema tags {column!r} but feature_spec's channel names {feature!r}")
        domain = schema[column].int_domain
        if domain is not None and domain.max is not None and int(domain.max) + 1 != spec.cardinality(feature):
            raise TrainingError(
                f"cardinality mismatch for {column}: feature_spec says {spec.cardinality(feature)}, "
                f"train schema's domain max is {int(domain.max)}"
            )
    targets = schema.select_by_tag(Tags.TARGET).column_names
    label_column = targets[0] if targets else spec.label_feature
    return EtlData(
        spec=spec, user_column=user_column, item_column=item_column, label_column=label_column,
        train_files=train_files, schema=schema.select_by_name([user_column, item_column]),
        train_rows=train_rows,
    )


def count_rows(files: list[Path]) -> int:
    """Rows of parquet files from their footers; a truncated or non-parquet file is refused
    here, before a run directory exists, rather than mid-epoch inside the Loader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for path in files:
        try:
            rows += pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise TrainingError(f"{path} is not a readable parquet file (truncated?): {one_line(exc)}") from None
    if rows == 0:
        raise TrainingError(f"the train parquet files ({files[0].parent}) hold no rows")
    return rows


def train_pairs(data: EtlData) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training (user, item) pair, in file order, read once per process with pyarrow
    (the Loader shuffles and shards; these callers need all pairs once, in any order). A
    label column, where train/ has one, keeps label > 0 only, as models.ranking.train_matrix
    does: the ETL and its transcoding write positives only, so nothing is dropped there."""
    from merlin_ncf.models.ranking import read_pairs

    if data._pairs is None:
        users, items = read_pairs(data.train_files, data.user_column, data.item_column, data.label_column)
        data._pairs = torch.from_numpy(users), torch.from_numpy(items)
    return data._pairs


def train_matrix(data: EtlData):
    """train_pairs as the binary users x items CSR matrix of models.ranking.train_matrix."""
    from merlin_ncf.models.ranking import interaction_matrix

    users, items = train_pairs(data)
    return interaction_matrix(users.numpy(), items.numpy(), data.num_users, data.num_items)


def train_loader(data: EtlData, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 parts_per_chunk: int = 1, device: torch.device = torch.device("cpu")):
    """A merlin Loader over this rank's shard of the train parquet for one epoch.

    Files are permuted with (seed, epoch) so each epoch's shards and chunk order differ, and
    the Loader shuffles rows within chunks. Call `seed_shuffle(seed, epoch, rank)` just
    before iterating: the Loader's shuffle draws from numpy's global RNG in its thread.
    """
    merlin_io, Loader, _ = _merlin()
    order = np.random.RandomState(shared_seed(seed, epoch, bits=32)).permutation(len(data.train_files))
    files = tuple(str(data.train_files[i]) for i in order)
    on_cpu = device.type == "cpu"
    dataset = data._datasets.get((files, on_cpu))
    if dataset is None:
        dataset = data._datasets[files, on_cpu] = merlin_io.Dataset(list(files), engine="parquet",
                                                                   schema=data.schema, cpu=on_cpu)
    if dataset.npartitions < world:
        raise TrainingError(
            f"train/ has {dataset.npartitions} partitions, fewer than the {world} processes: "
            "write more train files (ETL) or use fewer processes"
        )
    return Loader(dataset, batch_size=batch_size, shuffle=True, global_size=world, global_rank=rank,
                  parts_per_chunk=parts_per_chunk, device="cpu" if on_cpu else device.index or 0)


def seed_shuffle(seed: int, epoch: int, rank: int) -> None:
    np.random.seed(rank_seed(seed, epoch, rank, bits=32))


def batch_columns(data: EtlData, batch) -> tuple[torch.Tensor, torch.Tensor]:
    features, _ = batch
    return features[data.user_column].reshape(-1).long(), features[data.item_column].reshape(-1).long()


@dataclass
class Candidates:
    """Evaluation lists: users [U] and items [U, 1 + K], the positive in column 0."""

    users: torch.Tensor
    items: torch.Tensor

    def shard(self, rank: int, world: int) -> "Candidates":
        bounds = np.linspace(0, len(self.users), world + 1).astype(int)
        return Candidates(self.users[bounds[rank]:bounds[rank + 1]], self.items[bounds[rank]:bounds[rank + 1]])


def load_candidates(data: EtlData, mapping: str) -> Candidates:
    """Read validation or test lists with a merlin Loader and check their shape."""
    merlin_io, Loader, _ = _merlin()
    per_list = data.spec.test_samples_per_series
    dataset = merlin_io.Dataset([str(f) for f in data.spec.files(mapping)], engine="parquet", cpu=True)
    missing = {data.user_column, data.item_column} - set(dataset.schema.column_names)
    if missing:
        raise TrainingError(f"{mapping} parquet lacks column(s) {sorted(missing)}")
    dataset.schema = dataset.schema.select_by_name([data.user_column, data.item_column])
    users, items = [], []
    for batch in Loader(dataset, batch_size=per_list * 4096, shuffle=False, device="cpu"):
        user, item = batch_columns(data, batch)
        users.append(user)
        items.append(item)
    user, item = torch.cat(users), torch.cat(items)
    if len(user) == 0 or len(user) % per_list:
        raise TrainingError(f"{mapping} has {len(user)} rows, not a multiple of test_samples_per_series={per_list}")
    user, item = user.view(-1, per_list), item.view(-1, per_list)
    if not bool((user == user[:, :1]).all()):
        raise TrainingError(f"{mapping} rows are not contiguous lists of {per_list} per user")
    check_ids(data, user, item, mapping)
    return Candidates(user[:, 0].contiguous(), item.contiguous())


def check_ids(data: EtlData, users: torch.Tensor, items: torch.Tensor, where: str) -> None:
    """Ids beyond the spec's cardinality would index past the embedding tables."""
    for ids, limit, name in ((users, data.num_users, data.user_column), (items, data.num_items, data.item_column)):
        if len(ids) and (int(ids.max()) >= limit or int(ids.min()) < 0):
            raise TrainingError(
                f"{where} has {name} {int(ids.max())}, outside feature_spec's cardinality {limit}: "
                "spec and data disagree"
            )
