"""How a sweep gets each candidate's latency: the target, plus the cache, a predictor and a pre-screen.

Built once by the driver from conf/hardware (search/experiment.py) and shipped to every trial:

- measured on the target (conf/hardware: the local CPU under the measurement lock, or a pool of
  agents), looked up first in the cache, keyed by the ONNX file's SHA-256 + device id + protocol key;
- or, with `hardware.predictor=PATH`, predicted by a model fitted on that device's measurements
  (hwnas-predictor fit), every predicted latency carrying the predictor's error;
- or both, with `hardware.prescreen=true`: a candidate predicted far over the latency budget is not
  sent to the device (its latency is the prediction, marked so); every other one is measured.

Picklable: the cache and the predictor are opened lazily where a trial runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hwnas.evaluators.measure.base import MeasureError, Target
from hwnas.evaluators.measure.protocol import Measurement

LATENCY_FILE = "latency.json"  # next to each trial's model.onnx: the whole Measurement, fingerprint included


class LatencyPlan:
    def __init__(
        self,
        target: Target,
        *,
        cache: str | None = None,
        predictor: str | None = None,
        prescreen: bool = False,
        budget_ms: float | None = None,
        host: Target | None = None,
    ) -> None:
        """`host`: the local target that times candidates on this machine for the predictor's host
        feature (None: a default single-thread CPU target)."""
        if prescreen and predictor is None:
            raise ValueError("hardware.prescreen: true needs hardware.predictor; allowed: a predictor path, or prescreen false")
        if prescreen and budget_ms is None:
            raise ValueError("hardware.prescreen: true needs objective.latency_budget_ms; allowed: a budget, or prescreen false")
        self.target = target
        self.cache_path = str(Path(cache).resolve()) if cache else None
        self.predictor_path = str(Path(predictor).resolve()) if predictor else None
        self.prescreen = bool(prescreen)
        self.budget_ms = budget_ms
        self.host = host
        self._cache: Any = None
        self._predictor: Any = None

    # -- what the driver asks before the sweep --------------------------------------------------
    @property
    def uses_device(self) -> bool:
        """False when every latency is predicted: the device is not contacted at all."""
        return self.predictor_path is None or self.prescreen

    @property
    def isolates_host(self) -> bool:
        """True when timing runs on this machine and trials must hold the compute lock while they compute."""
        return self.uses_device and bool(getattr(self.target, "isolate", False))

    def fingerprint(self) -> dict[str, Any]:
        """The target device's fingerprint (the predictor's when every latency is predicted)."""
        return self.target.fingerprint() if self.uses_device else self._predictor_fingerprint()

    def formats(self) -> dict[str, str]:
        """What each numeric format offered on this target really computes (formats refused here are absent)."""
        from hwnas.evaluators.measure.formats import format_support
        from hwnas.spaces.candidate import FORMATS

        fp = self.fingerprint()
        supports = {fmt: format_support(fmt, self.target.provider, fp) for fmt in FORMATS}
        return {fmt: s.computes for fmt, s in supports.items() if s.ok}

    @property
    def int8_full_range(self) -> bool:
        """int8 with full 8-bit weights where the target's CPU adds u8*s8 pairs without saturating (VNNI,
        Arm dot product); 7-bit weights elsewhere (evaluators/quantize.py says why)."""
        from hwnas.evaluators.measure.fingerprint import int8_has_vnni

        fp = self.fingerprint()
        return int8_has_vnni(fp) if fp else False

    def check(self) -> None:
        """Before the sweep: the target answers (remote: every agent), the predictor loads. RuntimeError/ValueError, one line."""
        if self.uses_device:
            self.target.check_available()
        if self.predictor_path is not None:
            self.predictor()
        if self.cache_path is not None and Path(self.cache_path).exists():
            self.cache()  # an existing file must be a cache; a new one is made by the first trial, not here

    def summary(self) -> dict[str, Any]:
        """hardware.json: which device, which protocol, how latencies were obtained."""
        from hwnas.evaluators.measure.fingerprint import fingerprint_id

        fp = self.fingerprint()
        protocol = self.target.protocol()
        out: dict[str, Any] = {
            "target": self.target.name,
            "kind": type(self.target).__name__,
            "provider": self.target.provider,
            "device_id": fingerprint_id(fp) if self.uses_device else self.predictor().device_id,
            "fingerprint": fp,
            "protocol": protocol.to_dict(),
            "protocol_key": protocol.key(),
            "urls": list(getattr(self.target, "urls", []) or []),
            "isolation": "measurement lock (node-wide): no trial computes while one times"
            if self.isolates_host else ("on the device" if self.uses_device else "none (predicted)"),
            "cache": self.cache_path,
            "predictor": self._predictor_summary(),
            "prescreen": self.prescreen,
            "formats": self.formats() if fp else {},
        }
        return out

    # -- what a trial calls -----------------------------------------------------------------------
    def cache(self) -> Any:
        if self._cache is None and self.cache_path is not None:
            from hwnas.evaluators.measure.cache import LatencyCache

            self._cache = LatencyCache(self.cache_path)
        return self._cache

    def predictor(self) -> Any:
        if self._predictor is None and self.predictor_path is not None:
            from hwnas.evaluators.measure.predictor import LatencyPredictor

            self._predictor = LatencyPredictor.load(self.predictor_path)
        return self._predictor

    def measure(
        self, artifact: str | Path, *, arch: str, candidate: dict[str, Any], space: str
    ) -> tuple[Measurement, dict[str, float]]:
        """The candidate's latency and the metrics that say how it was obtained (latency_source_*)."""
        artifact = Path(artifact)
        extra: dict[str, float] = {"latency_cached": 0.0, "latency_predicted": 0.0, "latency_prescreened": 0.0}
        prediction: dict[str, Any] | None = None
        if self.predictor_path is not None:
            prediction = self._predict(artifact, arch=arch, candidate=candidate, space=space)
            extra.update(
                latency_pred_ms=prediction["latency_ms"],
                latency_pred_low_ms=prediction["low_ms"],
                latency_pred_high_ms=prediction["high_ms"],
                latency_pred_within10=prediction["within10"],
                latency_pred_mape=prediction["mape"],
                latency_pred_spearman=prediction["spearman"],
                latency_pred_n=float(prediction["n_fit"]),
            )
            far_over = self.budget_ms is not None and prediction["low_ms"] > self.budget_ms
            if not self.prescreen or far_over:
                extra["latency_predicted"] = 1.0
                extra["latency_prescreened"] = 1.0 if self.prescreen else 0.0
                m = self._predicted_measurement(prediction)
                self._write(artifact, m, prediction)
                return m, extra
        m = self._cached(self.target, artifact, arch=arch, candidate=candidate, space=space)
        if m.source == "cache":
            extra["latency_cached"] = 1.0
        self._write(artifact, m, prediction)
        return m, extra

    def measure_fresh(self, artifact: str | Path) -> tuple[Measurement, dict[str, Any] | None]:
        """A latency of the file taken now (the export's re-measurement): timed on the target with its
        protocol, never read from the cache nor written to it (the cache keeps the sweep's own figure).
        A plan that only predicts has no device to time on: then the prediction, source "predicted",
        with its error as the second item (None when measured). Nothing is written next to the file."""
        artifact = Path(artifact)
        if not self.uses_device:
            prediction = self._predict(artifact, arch="", candidate={}, space="", fresh=True)
            return self._predicted_measurement(prediction), prediction
        return self._timed(self.target, artifact), None

    # -- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _timed(target: Target, artifact: Path, device_id: str | None = None) -> Measurement:
        """`target`'s measurement of the file, timed now; refused when another device answered."""
        from hwnas.evaluators.measure.fingerprint import fingerprint_id

        device_id = device_id or fingerprint_id(target.fingerprint())
        m = target.measure(artifact)
        if m.device_id and m.device_id != device_id:
            raise MeasureError(f"{artifact.name}: measured on device {m.device_id}, expected {device_id}; "
                               "a latency is never taken from another device")
        return m

    def _cached(
        self, target: Target, artifact: Path, *, arch: str, candidate: dict[str, Any], space: str, fresh: bool = False
    ) -> Measurement:
        """`target`'s measurement of the file: from the cache (source "cache") or timed now and stored.
        Used for the device and for the host feature alike: a file is never timed twice on one device.
        `fresh`: timed now, the cache neither read nor written."""
        from hwnas.evaluators.measure.cache import file_sha256
        from hwnas.evaluators.measure.fingerprint import fingerprint_id

        if fresh:
            return self._timed(target, artifact)
        cache = self.cache()
        if cache is None:
            return target.measure(artifact)
        sha = file_sha256(artifact)
        device_id = fingerprint_id(target.fingerprint())
        key = target.protocol().key()
        hit = cache.get(sha, device_id, key)
        if hit is not None:
            return hit
        m = self._timed(target, artifact, device_id)
        cache.put(sha, device_id, key, m, arch=arch, candidate=candidate, space=space)
        return m

    def _host(self) -> Target:
        """This machine timed with the protocol the predictor's host feature was fitted with."""
        if self.host is None:
            from hwnas.evaluators.measure.predictor_cli import host_target

            context = self.predictor().context or {}
            self.host = host_target(str(context.get("host_protocol", "default")))
        return self.host

    def host_mismatch(self) -> str | None:
        """A line when the predictor's host feature was timed on another machine than this one: its
        predictions here carry an error its figures do not show."""
        from hwnas.evaluators.measure.fingerprint import fingerprint_id

        fitted_on = (self.predictor().context or {}).get("host_device_id")
        here = fingerprint_id(self._host().fingerprint())
        if fitted_on and fitted_on != here:
            return (f"hardware.predictor: fitted with host latencies from device {fitted_on}, this host is {here}: "
                    "its error figures hold for that host; refit here (hwnas-predictor fit) for figures that hold")
        return None

    def _predict(
        self, artifact: Path, *, arch: str, candidate: dict[str, Any], space: str, fresh: bool = False
    ) -> dict[str, Any]:
        host_m = self._cached(self._host(), artifact, arch=arch, candidate=candidate, space=space, fresh=fresh)
        p = self.predictor().predict_onnx(artifact, host_m.median_ms)
        return {
            "latency_ms": p.latency_ms, "low_ms": p.latency_low_ms, "high_ms": p.latency_high_ms,
            "within10": p.within10_share, "mape": p.mape, "spearman": p.spearman, "n_fit": p.n_fit,
            "outside_range": p.outside_range, "device_id": p.device_id, "host_ms": host_m.median_ms,
        }

    def _predictor_fingerprint(self) -> dict[str, Any]:
        # A table the user measured may come without a fingerprint: then only its device id is known.
        return dict(self.predictor().doc.get("fingerprint") or {})

    def _predictor_summary(self) -> dict[str, Any] | None:
        if self.predictor_path is None:
            return None
        p = self.predictor()
        return {"path": self.predictor_path, "device_id": p.device_id, "space": p.space, "family": p.family,
                "n_fit": p.n_fit, "error": p.error, "summary": p.summary(), "host_mismatch": self.host_mismatch()}

    def _predicted_measurement(self, p: dict[str, Any]) -> Measurement:
        predictor = self.predictor()
        nan = math.nan
        return Measurement(
            median_ms=float(p["latency_ms"]), p90_ms=nan, p99_ms=nan, mean_ms=nan, std_ms=nan, cv=nan,
            resolution_pct=nan, n_runs=0, n_blocks=0, runs_per_block=0, rounds=0,
            provider=self.target.provider, intra_op_threads=0, input_shape=(), output_shape=(),
            protocol={}, fingerprint=self._predictor_fingerprint(), device_id=predictor.device_id, source="predicted",
        )

    @staticmethod
    def _write(artifact: Path, m: Measurement, prediction: dict[str, Any] | None) -> None:
        record = {"measurement": m.to_dict(), "prediction": prediction}
        (artifact.parent / LATENCY_FILE).write_text(json.dumps(record, indent=1, default=float))
