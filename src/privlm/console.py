"""What privlm shows on a terminal: the one progress display every runtime uses."""

from __future__ import annotations


def progress_bar(enabled: bool):  # -> rich.progress.Progress | None
    """A rich progress display (rounds, clients), or None when progress is off."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=False)
