"""Resuming on another layout (world size, num_workers, batch size): Loader.load_reshaped.

The loader's position is one global row cursor plus each source's position in the global order
(data/rows.py), the same on every rank: any one rank's state resumes any layout at the exact next global row.
Nothing is read twice and nothing is skipped.

A checkpoint holds every old rank's state; they must all describe that one position. States that disagree did
not come from one step of one run (a mixed-up or damaged checkpoint folder) and are refused, as is an empty
list. Only the part that records who saved a state (`layout`) may differ between them.
"""

from __future__ import annotations

from typing import Any


def _refuse(what: str) -> ValueError:
    return ValueError(f"cannot resume from the old ranks' loader states: {what}")


def agreed_state(old_states: Any) -> dict[str, Any]:
    """The one global position every old rank's state_dict() records (checked to agree)."""
    if not isinstance(old_states, (list, tuple)) or not old_states:
        raise _refuse(f"expected a non-empty list of every old rank's state_dict(), got {type(old_states).__name__}")
    if not all(isinstance(s, dict) for s in old_states):
        raise _refuse("every state must be a state_dict() (a mapping)")
    first = {k: v for k, v in old_states[0].items() if k != "layout"}
    for i, state in enumerate(old_states[1:], start=1):
        mine = {k: v for k, v in state.items() if k != "layout"}
        if mine != first:
            keys = sorted(k for k in set(first) | set(mine) if first.get(k) != mine.get(k))
            raise _refuse(f"state {i} differs from state 0 in {', '.join(keys)}; they do not record one position "
                          "of one run (a damaged or mixed-up checkpoint?)")
    return dict(old_states[0])
