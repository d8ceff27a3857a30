"""Clickable example inputs that load through the queue.

`gr.Examples` loads a clicked sample with a direct (queue-skipping) call, and this app refuses every direct call
(`app.limits.RequestGuard`). A `gr.Dataset` whose click is an ordinary private, queued event fills the same inputs.
"""
from __future__ import annotations

import gradio as gr


def example_picker(samples: list[list], inputs: list, label: str, per_page: int = 6, elem_id: str | None = None,
                   headers: list[str] | None = None, **event) -> gr.Dataset:
    """A table of `samples` (one value per component of `inputs`); clicking a row puts its values in `inputs`.
    `event`: keyword arguments of the click event (visibility, concurrency group)."""
    table = gr.Dataset(components=inputs, samples=samples, label=label, samples_per_page=per_page, type="index",
                       elem_id=elem_id, headers=headers)

    def pick(i: int):
        row = samples[int(i)]
        return row[0] if len(inputs) == 1 else tuple(row)

    table.click(pick, table, inputs, show_progress="hidden", **event)
    return table


__all__ = ["example_picker"]
