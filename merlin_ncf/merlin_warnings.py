"""The warnings Merlin 23.08 emits on every CPU run, silenced by their exact text.

Targeted rather than by category, so that any other (deprecation) warning still shows.
"""

from __future__ import annotations

import warnings

EXPECTED = (
    # merlin.io, once per Dataset: CPU mode is a supported mode of this project.
    (UserWarning, r"Initializing an NVTabular Dataset in CPU mode"),
    # merlin.dtypes, at import: TensorFlow is not part of this stack.
    (UserWarning, r"Tensorflow dtype mappings did not load successfully"),
    # merlin.dtypes, at import in a process that keeps torch out (without_torch).
    (UserWarning, r"PyTorch dtype mappings did not load successfully"),
)


def quiet_merlin() -> None:
    for category, message in EXPECTED:
        warnings.filterwarnings("ignore", message=message, category=category)


def without_torch() -> None:
    """Keep torch out of a process that never uses it (the ETL command): merlin imports it only
    to register torch's dtype names, ~2 s of CPU at every start. Call before merlin is imported;
    does nothing where torch is already loaded."""
    import sys

    sys.modules.setdefault("torch", None)
