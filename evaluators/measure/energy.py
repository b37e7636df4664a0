"""Energy meters the device really has: RAPL package counters (powercap sysfs) and NVML on NVIDIA GPUs.

Nothing here estimates: `open_meter` returns None when no counter is readable, and the measurement then
records energy_source "none". RAPL counts the whole package (idle power of every core included), so
joules per inference are what the package drew while the model ran, not the model's share of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class EnergyMeter(Protocol):
    source: str  # "rapl" | "nvml"

    def read_j(self) -> float:
        """Joules since the meter was opened; monotonic (counter wrap-around handled)."""
        ...


class RaplMeter:
    """Sum of the package domains' energy_uj (intel-rapl:N; AMD Zen exposes the same names)."""

    source = "rapl"

    def __init__(self, domains: list[Path]) -> None:
        self.domains = domains
        self._range = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self._last = [self._raw(d) for d in domains]
        self._total_uj = 0

    @staticmethod
    def _raw(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def read_j(self) -> float:
        for i, domain in enumerate(self.domains):
            now = self._raw(domain)
            # The counter wraps at max_energy_range_uj (every few minutes at full load on big packages).
            delta = now - self._last[i] if now >= self._last[i] else now + self._range[i] - self._last[i]
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


class NvmlMeter:
    """nvmlDeviceGetTotalEnergyConsumption (mJ since the driver loaded) of one GPU."""

    source = "nvml"

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._start_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def read_j(self) -> float:
        return (int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) - self._start_mj) / 1e3


def rapl_domains(root: str | Path = "/sys/class/powercap") -> list[Path]:
    """The readable package domains (intel-rapl:N, name package-N), not their core/uncore/dram subzones."""
    root = Path(root)
    found = []
    for d in sorted(root.glob("intel-rapl:*")):
        if d.name.count(":") != 1:  # intel-rapl:0:1 is a subzone of package 0: counted in it already
            continue
        try:
            if not (d / "name").read_text().strip().startswith("package"):
                continue
            int((d / "energy_uj").read_text())  # root-only on most kernels since CVE-2020-8694
            int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        found.append(d)
    return found


def open_meter(provider: str, rapl_root: str | Path = "/sys/class/powercap") -> EnergyMeter | None:
    """The meter for a provider's device, or None when this machine exposes none readable."""
    if provider == "cuda":
        try:
            return NvmlMeter()
        except Exception:  # pynvml missing, no driver, or a GPU without an energy counter
            return None
    domains = rapl_domains(rapl_root)
    return RaplMeter(domains) if domains else None
