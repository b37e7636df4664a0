"""Private Optuna and Ray APIs hwnas still relies on, where no public one does the job: the behaviour
we rely on, pinned. Written against optuna 5.0.0 and ray 2.60.0; a failure here after an upgrade
names what to rework.

- search/study_record.py, search/constraints.py: resuming, a trial a dead driver left RUNNING is a
  FrozenTrial; Optuna has no public setter of its user attributes or constraint values, so they go
  through `study._storage` by `FrozenTrial._trial_id` (its state and values through public `tell`).
- search/samplers/regularized_evolution.py, rl_controller.py: `study._get_trials(..., use_cache=True)`,
  the trial cache Optuna's own samplers read during a sampling step (the public `get_trials` reads
  the storage each time: a cost per trial that grows with the study).
- search/runners/ray_runner.py: `ray.init(_system_config=...)` turns off worker prestart on a local
  instance (workers Tune never uses took CPU from start-up).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hwnas.search.constraints import set_constraints, violation
from hwnas.search.study_record import INTERRUPTED
from hwnas.search.sweep_state import journal_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
WRITTEN_AGAINST = {"optuna": "5.0.0", "ray": "2.60.0"}


def _left_running(run_dir: Path) -> None:
    """A driver that asked a trial, suggested its parameters, and died."""
    study = optuna.create_study(study_name="s", storage=journal_storage(run_dir), directions=["maximize"])
    study.ask().suggest_categorical("x", [0, 1])


def test_written_against() -> None:
    import ray

    # Not a gate: the checks below are. This names the versions they were written against.
    assert optuna.__version__.split(".")[0] == WRITTEN_AGAINST["optuna"].split(".")[0], optuna.__version__
    assert ray.__version__.split(".")[0] == WRITTEN_AGAINST["ray"].split(".")[0], ray.__version__


def test_a_frozen_trials_user_attr_and_constraints_through_the_storage(tmp_path: Path) -> None:
    _left_running(tmp_path)  # another process, as on resume: a new storage object reads the journal
    study = optuna.load_study(study_name="s", storage=journal_storage(tmp_path))
    (frozen,) = study.get_trials(states=(TrialState.RUNNING,))
    assert isinstance(frozen._trial_id, int)
    study._storage.set_trial_user_attr(frozen._trial_id, INTERRUPTED, True)
    set_constraints(frozen, study, {"latency_ms": 0.5})  # study._storage.set_trial_system_attr("constraints:<name>")
    study.tell(frozen.number, [0.9])  # public: a trial number is accepted
    again = optuna.load_study(study_name="s", storage=journal_storage(tmp_path)).trials[frozen.number]
    assert again.state == TrialState.COMPLETE and again.values == [0.9]
    assert again.user_attrs == {INTERRUPTED: True}
    # Read back as Trial.set_constraint would have stored it: samplers see it as a constraint.
    assert again.constraints == {"latency_ms": 0.5} and violation(again) == 0.5


def test_the_trial_cache_returns_what_get_trials_does() -> None:
    study = optuna.create_study(directions=["maximize"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.ask()  # a RUNNING one, not COMPLETE
    params = inspect.signature(study._get_trials).parameters
    assert {"deepcopy", "states", "use_cache"} <= set(params)
    cached = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
    public = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.number for t in cached] == [t.number for t in public] == [0, 1, 2]


def test_ray_init_takes_a_system_config_with_the_prestart_keys() -> None:
    import mmap

    import ray

    assert 'kwargs.pop("_system_config"' in inspect.getsource(ray.init), ray.__version__
    # RayConfig's keys are compiled into the raylet: an unknown key fails ray.init at start.
    raylet = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
    with open(raylet, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
        for key in (b"enable_worker_prestart", b"prestart_worker_first_driver"):
            assert binary.find(key) >= 0, (key, ray.__version__)


@pytest.mark.parametrize("name", ["JournalFileSymlinkLock", "JournalFileOpenLock"])
def test_journal_locks_are_public(name: str) -> None:
    # search/sweep_state.py writes the journal under Optuna's own (public) lock object.
    import optuna.storages.journal as journal

    lock = getattr(journal, name)
    assert callable(lock.acquire) and callable(lock.release)
