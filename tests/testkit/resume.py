"""The one resume check for every stateful part: stop at a midpoint, reload, compare with a straight run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable


def json_round_trip(state):
    """What saving a flat state to JSON and reading it back gives."""
    return json.loads(json.dumps(state))


def run_with_actions(obj, step: Callable, start: int, stop: int, actions: dict[int, Callable]) -> list:
    """Outputs of ``step(obj, i)`` for ``i`` in ``[start, stop)``; ``actions[i](obj)`` runs before step i."""
    outputs = []
    for i in range(start, stop):
        if i in actions:
            actions[i](obj)
        outputs.append(step(obj, i))
    return outputs


def assert_resumes_exactly(
    make: Callable[[], object],
    step: Callable[[object, int], object],
    *,
    total: int,
    midpoints: Iterable[int],
    actions: dict[int, Callable] | None = None,
    equal: Callable[[object, object], bool] = lambda a, b: a == b,
    make_resumed: Callable[[], object] | None = None,
    round_trip: Callable[[object], object] = json_round_trip,
    states_from_reference: bool = False,
) -> None:
    """Assert that stopping at each midpoint and resuming from a JSON round trip of ``state_dict()`` in a
    fresh object gives exactly the outputs of one uninterrupted run.

    Args:
        make: Builds a fresh object (loader, controller, mixer...).
        step: Produces the output compared at step ``i`` (e.g. the next batch).
        total: Steps in the uninterrupted run.
        midpoints: Steps after which the run is stopped and resumed.
        actions: Mutations applied before given steps in both runs (e.g. weight changes).
        equal: Output comparison.
        make_resumed: Builds the object that loads the state (default ``make``), e.g. another world size.
        round_trip: Saves and reloads the state; JSON by default (``copy.deepcopy`` stands in for
            ``torch.save`` when the state holds tensors).
        states_from_reference: Take each midpoint's state from the uninterrupted run (which must not
            change when ``state_dict()`` is called) instead of a separate stopped run; this halves the
            objects built, for objects that are slow to start (DataLoaders with spawned workers).
    """
    actions = actions or {}
    midpoints = sorted(midpoints)
    states = {}
    reference_object = make()
    reference = []
    for start, stop in zip([0, *midpoints], [*midpoints, total]):
        reference += run_with_actions(reference_object, step, start, stop, actions)
        if states_from_reference and stop in midpoints:
            states[stop] = round_trip(reference_object.state_dict())
    _close(reference_object)
    for midpoint in midpoints:
        head = reference[:midpoint]
        if not states_from_reference:
            first = make()
            head = run_with_actions(first, step, 0, midpoint, actions)
            states[midpoint] = round_trip(first.state_dict())
            _close(first)
        state = states[midpoint]
        resumed = (make_resumed or make)()
        resumed.load_state_dict(state)
        tail = run_with_actions(resumed, step, midpoint, total, actions)
        _close(resumed)
        for i, (expected, got) in enumerate(zip(reference, head + tail)):
            assert equal(expected, got), (
                f"resumed at step {midpoint}: output {i} differs from the uninterrupted run"
            )


def _close(obj) -> None:
    close = getattr(obj, "close", None)
    if close:
        close()
