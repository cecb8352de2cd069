"""The chaos suite's overlap check on made-up activations (no cluster)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tests.chaos.observe import Activation, Freeze, Observer
from tests.cluster_support import Cluster

DELIVER = "sentinel-link.deliver"


def observer(*activations: Activation, freezes: tuple[Freeze, ...] = ()) -> Observer:
    watching = Observer(cast(Cluster, None), ["st1", "st2"])  # never started: no polls
    for act in activations:
        watching.activations[(act.server, act.service, act.unit, act.start)] = act
    watching.freezes.extend(freezes)
    return watching


def old(end: float, stopping: float | None) -> Activation:
    """st1's sentinel link, primary at epoch 5 from t=0."""
    return Activation("st1", "sentinel-link", DELIVER, 5, 0.0, end, stopping)


NEW = Activation("st2", "sentinel-link", DELIVER, 6, 15.0, 40.0)
FROZEN = Freeze("st1", "sentinel-link", stopped=10.0, resumed=20.0)


@pytest.mark.parametrize(
    ("activations", "freezes", "ok", "strict", "late"),
    [
        # Live, and its stop returned after the other began: an overlap, however long its
        # stop took (a handover waits for the stop to return).
        ((old(16.0, 14.0), NEW), (), False, 1, 0),
        ((old(15.0, 14.0), NEW), (), True, 0, 0),
        # Frozen from 10 to 20: after waking it began to stop at 20.3, its stop returned at
        # 22.5: it fenced itself 0.3 s after waking.
        ((old(22.5, 20.3), NEW), (FROZEN,), True, 0, 0),
        # ... at 21.5: later than the 1 s margin.
        ((old(22.5, 21.5), NEW), (FROZEN,), False, 0, 1),
        # No stopping time known (an older process): its stop's return counts.
        ((old(22.5, None), NEW), (FROZEN,), False, 0, 1),
    ],
)
def test_overlaps(
    activations: tuple[Activation, ...],
    freezes: tuple[Freeze, ...],
    ok: bool,
    strict: int,
    late: int,
) -> None:
    result: dict[str, Any] = observer(*activations, freezes=freezes).overlaps(wake_margin=1.0)
    woke_late = len(result["ran_after_wake_longer_than_margin"])
    assert (result["ok"], result["overlap_count"], woke_late) == (ok, strict, late)
