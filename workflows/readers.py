"""Readers for the MovieLens releases' own files and for any CSV/parquet interaction log.

Every reader returns a Dask DataFrame (pandas or cuDF partitions) with columns user_id,
item_id (int64, or strings in a generic log whose ids are not all integers), an int64
timestamp and, where the log has one, a float rating; plus the item table (raw_item_id,
title, genres) where the release ships one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # pandas' default NA words, kept off id columns ("NA" is an id)

from merlin_ncf.workflows.cluster import Backend
from merlin_ncf.errors import EtlError, one_line

USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"
# A CSV id column is read as int64 when every value is written as a canonical int64 (no sign
# but '-', no leading zero, at most 18 digits); otherwise as strings, so "007" and "7" stay apart.
CANONICAL_INT = r"-?(?:0|[1-9][0-9]{0,17})"


@dataclass(frozen=True)
class Layout:
    """Where a MovieLens release keeps its ratings and movies, and how they are written."""

    ratings: str
    sep: str
    header: bool
    movies: str | None
    rating_step: float  # whole stars (ml-100k, ml-1m) or half stars


_DAT = dict(ratings="ratings.dat", sep="::", header=False, movies="movies.dat")
_CSV = dict(ratings="ratings.csv", sep=",", header=True, movies="movies.csv", rating_step=0.5)
LAYOUTS: dict[str, Layout] = {
    "ml-100k": Layout(ratings="u.data", sep="\t", header=False, movies="u.item", rating_step=1.0),
    "ml-1m": Layout(**_DAT, rating_step=1.0),
    "ml-10m": Layout(**_DAT, rating_step=0.5),
    "ml-20m": Layout(**_CSV),
    "ml-25m": Layout(**_CSV),
    "ml-latest": Layout(**_CSV),
    "ml-latest-small": Layout(**_CSV),
}
GENERIC_FORMATS = ("csv", "parquet")
FORMATS = ("auto", *LAYOUTS, *GENERIC_FORMATS)

# MovieLens' own header of ratings.csv (ml-20m and later).
ML_CSV_COLUMNS = {"userId": USER, "movieId": ITEM, "rating": RATING, "timestamp": TIME}
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@dataclass(frozen=True)
class ColumnNames:
    """Column names of a generic log (--user-col etc.); rating is optional."""

    user: str = USER
    item: str = ITEM
    time: str = TIME
    rating: str | None = RATING


@dataclass
class RawLog:
    interactions: object  # dask DataFrame: user_id, item_id, timestamp[, rating]
    items: pd.DataFrame | None  # raw_item_id, title, genres
    fmt: str
    ratings_path: Path


def detect_format(path: Path) -> str:
    """Guess the release from the files present; a MovieLens release's own folder name (e.g.
    ml-latest-small, whose files look like ml-20m's) names it."""
    detected = _detect_layout(path)
    if detected not in LAYOUTS:
        return detected
    from merlin_ncf.workflows.datasets import RELEASES

    folder = (path if path.is_dir() else path.parent).absolute().name
    named = next((r.name for r in RELEASES.values() if r.folder == folder), None)
    return named if named and LAYOUTS[named].ratings == LAYOUTS[detected].ratings else detected


def _detect_layout(path: Path) -> str:
    """The format from the files present (ml-1m and ml-10m share a layout, as do ml-20m and later)."""
    candidates = [path / name for name in ("u.data", "ratings.dat", "ratings.csv")] if path.is_dir() else [path]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        name = candidate.name
        if name == "u.data":
            return "ml-100k"
        if name.endswith(".dat"):
            return "ml-1m"
        if name == "ratings.csv" and _csv_header(candidate)[:2] == ["userId", "movieId"]:
            return "ml-20m"
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith((".csv", ".tsv", ".txt")):
            return "csv"
    if path.is_dir():
        if sorted(path.glob("*.parquet")):
            return "parquet"
        if len(list(path.glob("*.csv"))) == 1:
            return "csv"
        raise EtlError(f"{path} holds no u.data, ratings.dat, ratings.csv or *.parquet: pass --format")
    raise EtlError(f"cannot tell the format of {path}: pass --format ({', '.join(FORMATS[1:])})")


def read_log(path: str | os.PathLike, fmt: str, backend: Backend, columns: ColumnNames = ColumnNames(),
             partition_size: str | int = "32MB") -> RawLog:
    path = Path(path)
    if not path.exists():
        raise EtlError(f"input {path} does not exist")
    if fmt not in FORMATS:
        raise EtlError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in LAYOUTS:
        return _read_movielens(path, fmt, backend, partition_size)
    if fmt == "csv":
        return _read_generic_csv(path, backend, columns, partition_size)
    return _read_generic_parquet(path, backend, columns, partition_size)


# --- MovieLens releases ---------------------------------------------------------------

def _release_file(path: Path, name: str) -> Path:
    if path.is_file():
        return path
    found = path / name
    if not found.is_file():
        raise EtlError(f"{found} not found: is {path} an unpacked MovieLens release of this format?")
    return found


def _read_movielens(path: Path, fmt: str, backend: Backend, partition_size) -> RawLog:
    layout = LAYOUTS[fmt]
    ratings = _release_file(path, layout.ratings)
    dtypes = {USER: "int64", ITEM: "int64", RATING: "float64", TIME: "int64"}
    if layout.header:
        header = _csv_header(ratings)
        if [c for c in ML_CSV_COLUMNS if c not in header]:
            raise EtlError(f"{ratings} header is {','.join(header)}; expected userId,movieId,rating,timestamp")
        # No usecols anywhere: with it pandas silently drops the extra fields of a malformed line.
        # pyarrow's parser (on pandas partitions) takes a third of the C parser's CPU time.
        engine = {} if backend.gpu else {"engine": "pyarrow"}
        ddf = backend.dd.read_csv(str(ratings), sep=",", header=0,
                                  dtype={k: dtypes.get(v, "float64") for k, v in ML_CSV_COLUMNS.items()},
                                  blocksize=partition_size, **engine)
        ddf = ddf.rename(columns=ML_CSV_COLUMNS)
    elif layout.sep == "::":
        # Split on ':' and keep every other field: the fast C parser takes only one-char separators.
        names = [USER, "_1", ITEM, "_2", RATING, "_3", TIME]
        ddf = backend.dd.read_csv(str(ratings), sep=":", header=None, names=names,
                                  dtype={**dtypes, "_1": "float64", "_2": "float64", "_3": "float64"},
                                  blocksize=partition_size)
    else:
        ddf = backend.dd.read_csv(str(ratings), sep=layout.sep, header=None, names=[USER, ITEM, RATING, TIME],
                                  dtype=dtypes, blocksize=partition_size)
    ddf = ddf[[USER, ITEM, TIME, RATING]]
    movies = None if path.is_file() else path / layout.movies
    items = read_movies(movies, fmt) if movies is not None and movies.is_file() else None
    return RawLog(ddf, items, fmt, ratings)


def has_header_csv(log: RawLog) -> bool:
    """A MovieLens ratings.csv (ml-20m and later): `movielens_csv_to_parquet` reads it."""
    return log.fmt in LAYOUTS and LAYOUTS[log.fmt].header


def movielens_csv_to_parquet(log: RawLog, target: Path, block_bytes: int, rating: bool):
    """A MovieLens ratings.csv (`has_header_csv`) as parquet files part.0.parquet, ... in reading
    order under `target` (rating only if `rating`); returns the first and last timestamp (None
    when it holds no rows). Every field is parsed and typed as `log.interactions` would be.

    Hand-written: pyarrow's streaming reader writes the files straight from Arrow, where the
    Dask frame costs a pandas conversion and several block copies per partition (half the
    read time, and the read is the ETL's largest phase); memory stays one block.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    types = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    kept = [c for c in ML_CSV_COLUMNS if rating or ML_CSV_COLUMNS[c] != RATING]
    schema = pa.schema([(ML_CSV_COLUMNS[c], types[c]) for c in kept])
    reader = pacsv.open_csv(log.ratings_path, read_options=pacsv.ReadOptions(block_size=block_bytes),
                            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)))
    target.mkdir(parents=True)
    first = last = None
    part = 0
    for batch in reader:
        table = pa.Table.from_batches([batch]).select(kept).rename_columns(schema.names)
        if not len(table):
            continue
        low, high = pc.min_max(table[TIME]).values()
        first = low.as_py() if first is None else min(first, low.as_py())
        last = high.as_py() if last is None else max(last, high.as_py())
        pq.write_table(table, target / f"part.{part}.parquet", compression=None)
        part += 1
    if part == 0:
        pq.write_table(schema.empty_table(), target / "part.0.parquet", compression=None)
    return first, last


def read_movies(path: Path, fmt: str) -> pd.DataFrame:
    """The release's movie table as raw_item_id, title, genres ('|'-separated)."""
    try:
        if fmt == "ml-100k":
            raw = pd.read_csv(path, sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
            flags = raw.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy() == "1"
            genres = ["|".join(g for g, on in zip(ML100K_GENRES, row) if on) for row in flags]
            items = pd.DataFrame({"raw_item_id": raw[0].astype("int64"), "title": raw[1], "genres": genres})
        elif LAYOUTS[fmt].sep == "::":
            # Titles contain ':' (e.g. "Star Wars: Episode IV"), so split on the full '::'.
            lines = path.read_text(encoding="latin-1").splitlines()
            fields = [line.split("::", 2) for line in lines if line]
            items = pd.DataFrame(fields, columns=["raw_item_id", "title", "genres"])
            items["raw_item_id"] = items["raw_item_id"].astype("int64")
        else:
            items = pd.read_csv(path, dtype={"movieId": "int64", "title": str, "genres": str}, keep_default_na=False)
            items = items.rename(columns={"movieId": "raw_item_id"})[["raw_item_id", "title", "genres"]]
    except (ValueError, KeyError, IndexError, pd.errors.ParserError) as exc:
        raise EtlError(f"malformed movie table {path}: {one_line(exc)}") from None
    return items.drop_duplicates("raw_item_id").reset_index(drop=True)


def read_item_table(path: Path, item_column: str) -> pd.DataFrame:
    """A generic log's item table (--item-table: CSV or parquet) as raw_item_id, title, genres;
    ids as text until the ETL gives them the log's id type."""
    if not path.is_file():
        raise EtlError(f"item table {path} does not exist")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise several types for unreadable files
        raise EtlError(f"cannot read item table {path}: {one_line(exc)}") from None
    if item_column not in table.columns:
        raise EtlError(f"item table {path} lacks column {item_column!r} (has: {', '.join(map(str, table.columns))})")
    items = pd.DataFrame({"raw_item_id": table[item_column].astype(str)})
    for column in ("title", "genres"):
        items[column] = table[column].fillna("").astype(str) if column in table.columns else ""
    return items.drop_duplicates("raw_item_id").reset_index(drop=True)


# --- generic logs --------------------------------------------------------------------

def _csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [c.strip().strip('"') for c in fh.readline().rstrip("\n").split(",")]


def _wanted(columns: ColumnNames, available: list[str], path: Path) -> dict[str, str]:
    wanted = {columns.user: USER, columns.item: ITEM, columns.time: TIME}
    missing = [c for c in wanted if c not in available]
    if missing:
        raise EtlError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(available)}); "
                       "name them with --user-col/--item-col/--time-col")
    if columns.rating and columns.rating in available:
        wanted[columns.rating] = RATING
    return wanted


def _read_generic_csv(path: Path, backend: Backend, columns: ColumnNames, partition_size) -> RawLog:
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise EtlError(f"{path} holds {len(found)} CSV files; pass the one to read as --input")
        path = found[0]
    header = _csv_header(path)
    wanted = _wanted(columns, header, path)
    # Timestamps may be written as floats; ids are text until _id_columns types them. Every column
    # is read (other columns as text): with usecols pandas silently drops a malformed line's extra fields.
    dtypes = {USER: "object", ITEM: "object", TIME: "float64", RATING: "float64"}
    ddf = backend.dd.read_csv(str(path), sep=",", header=0,
                              dtype={src: dtypes[wanted[src]] if src in wanted else "object" for src in header},
                              blocksize=partition_size, keep_default_na=False,
                              na_values={src: STR_NA_VALUES for src in header if wanted.get(src) not in (USER, ITEM)})
    ddf = _id_columns(ddf.rename(columns=wanted), path)
    ddf[TIME] = ddf[TIME].astype("int64")
    return RawLog(ddf[list(dict.fromkeys([USER, ITEM, TIME, *wanted.values()]))], None, "csv", path)


def _id_columns(ddf, path: Path):
    """Each id column as int64 if every value is a canonical integer, else as strings (one pass)."""
    import dask

    checks = {}
    for col in (USER, ITEM):
        text = ddf[col].astype(str)
        checks[col] = ((text == "").any(), text.str.fullmatch(CANONICAL_INT).all())
    for col, (empty, integral) in dask.compute(checks)[0].items():
        if empty:
            raise EtlError(f"{path}: column for {col} has empty values; every row needs an id")
        ddf[col] = ddf[col].astype("int64" if integral else str)
    return ddf


def _read_generic_parquet(path: Path, backend: Backend, columns: ColumnNames, partition_size) -> RawLog:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise EtlError(f"{path} holds no .parquet files")
    schemas = {f: _parquet_schema(f) for f in files}
    wanted = _wanted(columns, schemas[files[0]].names, path)
    # Dask takes the dtypes from the first file and casts the others: check each file's own
    # column types, so that a later file's 1001.5 is refused instead of truncated to 1001.
    for f, schema in schemas.items():
        _check_parquet_types(f, schema, wanted)
    ddf = backend.dd.read_parquet([str(f) for f in files], columns=list(wanted), split_row_groups="infer",
                                  blocksize=partition_size)
    ddf = ddf.rename(columns=wanted)
    for col in (USER, ITEM):  # integers (of any width) or strings in every file (checked above)
        ddf[col] = ddf[col].astype("int64" if _integer_ids(schemas, wanted, col) else str)
    if pd.api.types.is_datetime64_any_dtype(ddf[TIME].dtype):
        ddf[TIME] = ddf[TIME].astype("datetime64[ns]").astype("int64") // 1_000_000_000
    else:
        ddf[TIME] = ddf[TIME].astype("int64")
    if RATING in ddf.columns:
        ddf[RATING] = ddf[RATING].astype("float64")
    return RawLog(ddf[list(dict.fromkeys([USER, ITEM, TIME, *wanted.values()]))], None, "parquet", path)


def _parquet_schema(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise EtlError(f"{path} is not a readable parquet file: {one_line(exc)}") from None


def _check_parquet_types(path: Path, schema, wanted: dict[str, str]) -> None:
    import pyarrow as pa

    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise EtlError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    for src, dst in wanted.items():
        kind = schema.field(src).type
        if dst in (USER, ITEM) and not (pa.types.is_integer(kind) or pa.types.is_string(kind)
                                        or pa.types.is_large_string(kind)):
            raise EtlError(f"column {src!r} of {path} holds {kind} values; ids must be integers or strings")
        if dst == TIME and not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                                or pa.types.is_timestamp(kind)):
            raise EtlError(f"column {src!r} of {path} holds {kind} values; timestamps must be numbers or datetimes")


def _integer_ids(schemas: dict, wanted: dict[str, str], column: str) -> bool:
    """Whether `column` holds integers in every file; refuses integers in some and strings in others."""
    import pyarrow as pa

    source = next(src for src, dst in wanted.items() if dst == column)
    kinds = {f: pa.types.is_integer(schema.field(source).type) for f, schema in schemas.items()}
    if len(set(kinds.values())) > 1:
        ints, texts = (next(f for f, k in kinds.items() if k is flag) for flag in (True, False))
        raise EtlError(f"column {source!r} holds integers in {ints} but strings in {texts}; write one type")
    return next(iter(kinds.values()))
