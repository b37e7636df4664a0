"""What device a latency was measured on: CPU model, cores, the ISA flags that change kernels, runtime.

Stdlib only (the device agent imports it). The reader functions take the text so that tests can feed
/proc/cpuinfo of machines that are not this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# ISA features that select different ONNX Runtime kernels (int8 dot products, fp16/bf16 math, vector width).
X86_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
)
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Arm "CPU part" numbers (implementer 0x41) of the cores found in boards people deploy to.
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4b": "Cortex-A78C", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}
# The fields that decide how fast a file runs: not memory (a 4 vs 8 GiB board times the same), not the
# kernel release or the list of installed providers (they change with updates that do not change timing).
ID_FIELDS = ("cpu_model", "arch", "logical_cores", "flags", "onnxruntime", "provider", "gpu")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """{"cpu_model", "flags"} from /proc/cpuinfo text (x86: model name/flags; arm64: Features/CPU part)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:  # the first processor stands for all (big.LITTLE: the first part seen)
            fields[key] = value.strip()
    words = set((fields.get("flags") or fields.get("features") or "").split())
    wanted = X86_FLAGS if "flags" in fields else ARM_FLAGS
    model = fields.get("model name") or ""
    if not model and "cpu part" in fields:
        parts = sorted({m.group(1).lower() for m in re.finditer(r"(?im)^cpu part\s*:\s*(0x[0-9a-f]+)", text)})
        model = " + ".join(ARM_PARTS.get(p, f"arm part {p}") for p in parts)
    board = fields.get("model") if not (fields.get("model") or "").isdigit() else None
    if board:  # Raspberry Pi and friends name the board in cpuinfo's "Model"
        model = f"{model} ({board})" if model else board
    return {"cpu_model": model or platform.processor() or "unknown", "flags": sorted(w for w in wanted if w in words)}


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    try:
        return parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        return {"cpu_model": platform.processor() or "unknown", "flags": []}


def parse_meminfo_gib(text: str) -> float | None:
    """MemTotal rounded to 0.5 GiB: stable across boots (the kernel's reserve moves by a few MiB)."""
    m = re.search(r"(?m)^MemTotal:\s*(\d+)\s*kB", text)
    return round(int(m.group(1)) / 2**20 * 2) / 2 if m else None


def _memory_gib() -> float | None:
    try:
        return parse_meminfo_gib(Path("/proc/meminfo").read_text())
    except OSError:
        return None


def _gpu(timeout_s: float = 5.0) -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, driver = first.partition(",")
    return {"name": name.strip(), "driver": driver.strip()} if name.strip() else None


def _onnxruntime() -> tuple[str | None, list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return str(ort.__version__), list(ort.get_available_providers())


def device_fingerprint(provider: str = "cpu", *, cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """Where a measurement runs: JSON-safe, stable across calls and reboots on the same device."""
    if provider not in ("cpu", "cuda"):
        raise ValueError(f"provider={provider!r} is unknown; allowed: cpu, cuda")
    cpu = read_cpuinfo(cpuinfo)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    version, providers = _onnxruntime()
    return {
        "cpu_model": cpu["cpu_model"],
        "arch": platform.machine(),
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "flags": cpu["flags"],
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "onnxruntime": version,
        "providers": providers,
        "provider": provider,
        # Only asked for a cuda target: nvidia-smi can take seconds, and a CPU timing does not depend on it.
        "gpu": _gpu() if provider == "cuda" else None,
    }


def fingerprint_id(fp: dict[str, Any]) -> str:
    """sha256[:16] of the fields that define the device for timing (see ID_FIELDS)."""
    missing = [k for k in ID_FIELDS if k not in fp]
    if missing:
        raise ValueError(f"fingerprint: keys {', '.join(missing)} are missing; allowed: a device_fingerprint() dict")
    canon = json.dumps({k: fp[k] for k in ID_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def int8_has_vnni(fp: Mapping[str, Any]) -> bool:
    """True where int8 dot products have no intermediate saturation (x86 VNNI/AMX, arm64 SDOT):
    full 8-bit weights are safe; without it ORT's u8s8 path needs 7-bit (reduced range) weights."""
    flags = set(fp.get("flags") or [])
    arch = str(fp.get("arch", "")).lower()
    if arch in ("aarch64", "arm64"):
        return "asimddp" in flags
    return bool(flags & set(VNNI_FLAGS))
