"""Check a directory against DeepLearningExamples' Dataset Feature Specification rules.

Works on any spec directory, this project's ETL output included: every chunk readable,
each feature in one chunk per mapping, channels naming real features, ids within their
declared cardinalities, candidate lists whole and one user each.

    python workflows/check_spec.py DIR
"""

from __future__ import annotations

from pathlib import Path


from merlin_ncf.workflows.dle_spec import check  # noqa: E402
from merlin_ncf.errors import EtlError, OneLineArgumentParser, exit_with  # noqa: E402
from merlin_ncf.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a directory holding feature_spec.yaml, or the YAML file")
    args = parser.parse_args(argv)
    try:
        summary = check(args.spec)
    except EtlError as exc:
        exit_with(exc, parser.prog)
    parts = [f"{name} {s.rows:,} rows" + (f" ({s.lists:,} lists)" if s.lists is not None else "")
             for name, s in summary.items()]
    print(f"{args.spec}: follows the Dataset Feature Specification rules: {', '.join(parts)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
