"""Which Optuna trials are real evaluations, and how a resumed study is brought in line with trials.jsonl.

Besides evaluations, a study holds trials that only feed the sampler: duplicates answered from
the record (COMPLETE, user attr DUPLICATE), an earlier sweep's trials (COMPLETE, user attr WARM_START) and trials whose driver died mid-evaluation (FAIL,
user attr INTERRUPTED, their candidate queued again). Counting evaluations excludes both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from hwnas.search.objectives import Objectives
from hwnas.search.trial_outcome import outcome_of_row, tell

DUPLICATE = "hwnas:duplicate_of"
INTERRUPTED = "hwnas:interrupted"
# A trial added from an earlier sweep (warm_start=RUN_DIR, search/warm_start.py): its value is the run folder.
WARM_START = "warm_start"


def evaluated_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        if DUPLICATE not in t.user_attrs and INTERRUPTED not in t.user_attrs and WARM_START not in t.user_attrs
    ]


def reconcile_study(study: optuna.Study, rows: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[dict[str, Any]]:
    """Finish every trial the dead driver left open; return the candidates that must be run again.

    A trial whose result reached trials.jsonl is told that result (the driver died between the two
    writes), as the broker would have (search/trial_outcome.py: a stopped one PRUNED, a rejected one COMPLETE). One that never finished is marked FAIL + INTERRUPTED and its candidate is queued, so it
    is retried once and counted once.
    """
    by_number = {r["number"]: r for r in rows}
    retry: list[dict[str, Any]] = []
    # WAITING trials are candidates queued by an earlier resume: ask() still hands them out.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = by_number.get(t.number)
        if row is not None:
            tell(study, t, outcome_of_row(row, objectives))
        else:
            # Optuna has no public setter of a FrozenTrial's user attribute: pinned in tests/test_private_apis.py.
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
            study.tell(t.number, state=TrialState.FAIL)
            if t.params:
                retry.append(dict(t.params))
    for params in retry:
        study.enqueue_trial(params, skip_if_exists=False)
    return retry
