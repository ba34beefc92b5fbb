"""`merlin-ncf STAGE [options]`: every stage's command behind one installed entry point.

    merlin-ncf etl --input ml-1m/ --output data/ml-1m
    merlin-ncf train --data data/ml-1m --output runs/neumf
    merlin-ncf export --data data/ml-1m --run runs/neumf --output repository
    merlin-ncf serve --repository repository
    merlin-ncf query --user 42 --top-k 10

`python workflows/etl.py ...` and the other scripts stay equivalent.
"""

from __future__ import annotations

import importlib
import sys

from merlin_ncf.errors import EXIT_USER_ERROR, run_cli

# Stage command -> module with main(argv); imported only when chosen (Merlin imports cost seconds).
COMMANDS = {
    "synthetic": ("merlin_ncf.workflows.synthetic", "generate a synthetic MovieLens-like release"),
    "etl": ("merlin_ncf.workflows.etl", "interaction log -> ETL directory (NVTabular)"),
    "transcode": ("merlin_ncf.workflows.transcode", "a Dataset Feature Specification directory -> ETL directory"),
    "check-spec": ("merlin_ncf.workflows.check_spec", "check a Dataset Feature Specification directory"),
    "train": ("merlin_ncf.models.train_ncf", "ETL directory -> trained model (run directory)"),
    "export": ("merlin_ncf.serving.export", "ETL + run -> Triton model repository"),
    "serve": ("merlin_ncf.serving.serve", "run tritonserver on a model repository"),
    "query": ("merlin_ncf.serving.client", "ask a running server for scores or top-K"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: merlin-ncf COMMAND [options]   (merlin-ncf COMMAND --help)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        sys.exit(0 if argv else EXIT_USER_ERROR)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"merlin-ncf: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"merlin-ncf {name}"  # argparse's prog for usage and error lines
    run_cli(lambda: module.main(rest), prog=sys.argv[0])


if __name__ == "__main__":
    main()
