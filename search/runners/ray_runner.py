"""Ray Tune runner: the broker's trials as Ray actors, bookkeeping on the driver.

Trials run in worker processes (one per `runner.resources`), so only numbers and file paths travel
back; MLflow, the trial log and the progress line live in the driver (see `Recorder`).

What happens when a trial ends (trials.jsonl first, then MLflow and Optuna's journal) is the broker's
(search/broker.py), the same as for runner=local; this runner only places the trials.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import ray

from hwnas.search.broker import Broker
from hwnas.search.runners.limits import check_timeout
from hwnas.search.runners.sweep import Sweep


def _as_config(value: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.create(dict(value)) if isinstance(value, dict) and not isinstance(value, DictConfig) else value


class RayRunner:
    def __init__(
        self,
        *,
        max_concurrent: int,
        resources: dict[str, float],
        address: str | None,
        storage: str | None,
        max_failures: int,
        trial_timeout_s: float | None,
        connect_timeout_s: float = 15.0,
    ) -> None:
        from hwnas.search.checks import CONNECT_TIMEOUT, integer, mapping, number
        from hwnas.search.checks import address as check_address

        # The same checks as `hwnas` runs on the config, for a RayRunner built in Python.
        integer(1, 100_000)("runner.max_concurrent", max_concurrent)
        mapping({"cpu": number(0, 100_000, lo_open=True), "gpu": number(0, 100_000)})("runner.resources", _as_config(resources))
        check_address("runner.address", address)
        integer(0, 1000)("runner.max_failures", max_failures)
        CONNECT_TIMEOUT("runner.connect_timeout_s", connect_timeout_s)
        if max_concurrent < 1:
            raise ValueError(f"runner.max_concurrent: {max_concurrent} is not allowed; allowed: an integer >= 1")
        unknown = set(resources) - {"cpu", "gpu"}
        if unknown:
            raise ValueError(f"runner.resources.{sorted(unknown)[0]}: unknown resource; allowed: cpu, gpu")
        if float(resources.get("cpu", 1)) <= 0 or float(resources.get("gpu", 0)) < 0:
            raise ValueError(f"runner.resources: {dict(resources)} is not allowed; allowed: cpu > 0, gpu >= 0")
        if max_failures < 0:
            raise ValueError(f"runner.max_failures: {max_failures} is not allowed; allowed: an integer >= 0")
        self.max_concurrent = max_concurrent
        self.resources = {"cpu": float(resources.get("cpu", 1)), "gpu": float(resources.get("gpu", 0))}
        self.address = address
        self.storage = storage
        self.max_failures = max_failures
        self.trial_timeout_s = check_timeout(trial_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)

    def start(self) -> None:
        """Start or join Ray, and check the cluster can keep this sweep's state. Before any trial."""
        # Quiet: the progress line is the sweep's output; Ray's tables and worker logs are not.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # A failed trial reports its error instead of the objectives; the searcher records it FAILED.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        warnings.filterwarnings("ignore", module="ray")
        if not ray.is_initialized():
            # A local instance would prestart idle workers that Tune never uses (each trial actor gets
            # its own process): on 2 cores they took CPU from start-up, ~2 s later first trials.
            local: dict[str, Any] = {}
            if not self.address:
                local["_system_config"] = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
            else:
                from hwnas.search.reach import check_ray_address

                # Something must speak gRPC there within runner.connect_timeout_s (a silent port would
                # hang ray.init for minutes); Ray's own GCS connect waits get the same bound.
                check_ray_address(self.address, self.connect_timeout_s)
                wait = str(max(1, round(self.connect_timeout_s)))
                os.environ.setdefault("RAY_py_gcs_connect_timeout_s", wait)
                os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", wait)
            try:
                ray.init(
                    # null means a new local instance, as documented: not whatever cluster
                    # RAY_ADDRESS or an earlier `ray start` on this machine left behind.
                    address=self.address or "local",
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    **local,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = " (a token-authenticated cluster also needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here)"
                raise ValueError(f"runner.address: cannot join Ray at {self.address!r}: {str(exc).splitlines()[0]}{hint}") from None
        for name in ("ray", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and self.storage is None:
            raise ValueError(
                f"runner.storage: null on a cluster of {len(nodes)} nodes; allowed: a path every node "
                "can read and write (NFS or similar), where trials write their models and Ray its state"
            )
        if self.resources["gpu"] > 0:
            total = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
            if total < self.resources["gpu"]:
                raise ValueError(
                    f"runner.resources.gpu: {self.resources['gpu']} per trial, but the cluster has {total:g} GPUs; allowed: <= {total:g}"
                )

    def run(self, sweep: Sweep, broker: Broker) -> None:
        from ray import tune

        from hwnas.search.runners.ray_search import BrokerScheduler, BrokerSearcher, StartCallback
        from hwnas.search.runners.ray_trial import run_trial

        self.start()
        if broker.left() <= 0:
            return  # a resumed sweep that had every trial recorded
        root = Path(self.storage).resolve() / sweep.run_dir.resolve().name if self.storage else sweep.run_dir.resolve()
        trials: dict[str, Any] = {}
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                evaluator=sweep.evaluator,
                trials_root=str(root / "trials"),
                threads=max(1, int(self.resources["cpu"])),
                timeout_s=self.trial_timeout_s,
                rungs=broker.rungs if broker.reports else None,
            ),
            self.resources,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=BrokerSearcher(broker, trials),
                # The sweep's scheduler decides in the broker; Tune's side only relays (continue / stop).
                scheduler=BrokerScheduler(broker),
                # The broker counts the trials (n_trials): its searcher answers FINISHED when none is left.
                num_samples=-1,
                max_concurrent_trials=self.max_concurrent,
                # A function trainable has no state between trials: reusing the worker process saves
                # the seconds that importing torch + Lightning costs per trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(root / "ray"),
                verbose=0,
                callbacks=[StartCallback(broker, trials)],
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        tuner.fit()
        if broker.in_flight:
            # Ray Tune catches Ctrl-C itself and returns from fit() with trials cut short.
            raise KeyboardInterrupt
