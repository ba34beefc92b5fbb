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
)


def quiet_merlin() -> None:
    for category, message in EXPECTED:
        warnings.filterwarnings("ignore", message=message, category=category)
