"""Progress bars for people at a terminal only: tqdm's `disable=None` turns a bar off when
stderr is not a TTY, so a log file or a pipe never fills with carriage-return frames."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar, shown only if `enabled` (no --quiet) and stderr is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, **options)
