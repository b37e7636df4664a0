"""Device fingerprints from /proc/cpuinfo texts of machines that are not this one, and the energy meters
(RAPL through a fake powercap tree written here: it mocks hardware this VM does not have)."""

from __future__ import annotations

import json

import pytest

from hwnas.evaluators.measure.energy import RaplMeter, open_meter, rapl_domains
from hwnas.evaluators.measure.fingerprint import (
    device_fingerprint,
    fingerprint_id,
    int8_has_vnni,
    parse_cpuinfo,
    parse_meminfo_gib,
)

X86_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 106
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni
"""
X86_AVX2 = """processor\t: 0
model\t\t: 158
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu sse sse2 avx avx2 fma f16c
"""
ARM_DOTPROD = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
ARM_A72 = """processor\t: 0
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""


def fp_of(text: str, arch: str, tmp_path) -> dict:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    fp = device_fingerprint("cpu", cpuinfo=path)
    fp["arch"] = arch  # this VM's platform.machine() stands in for the machine the text came from
    return fp


def test_x86_with_vnni(tmp_path):
    parsed = parse_cpuinfo(X86_VNNI)
    assert parsed["cpu_model"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert parsed["flags"] == sorted(["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"])
    assert int8_has_vnni(fp_of(X86_VNNI, "x86_64", tmp_path))


def test_x86_avx2_only(tmp_path):
    parsed = parse_cpuinfo(X86_AVX2)
    assert parsed["cpu_model"].startswith("Intel(R) Core(TM) i7-8700") and "(" not in parsed["cpu_model"][-2:]
    assert "avx2" in parsed["flags"] and "avx512f" not in parsed["flags"]
    assert not int8_has_vnni(fp_of(X86_AVX2, "x86_64", tmp_path))


def test_arm64_with_dot_product(tmp_path):
    parsed = parse_cpuinfo(ARM_DOTPROD)
    assert parsed["cpu_model"] == "Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)"
    assert parsed["flags"] == ["asimd", "asimddp", "asimdhp", "fphp"]
    assert int8_has_vnni(fp_of(ARM_DOTPROD, "aarch64", tmp_path))
    a72 = parse_cpuinfo(ARM_A72)
    assert a72 == {"cpu_model": "Cortex-A72", "flags": ["asimd"]}
    assert not int8_has_vnni(fp_of(ARM_A72, "aarch64", tmp_path))


def test_id_depends_on_what_times_not_on_memory_or_os(tmp_path):
    a = fp_of(X86_VNNI, "x86_64", tmp_path)
    b = fp_of(X86_AVX2, "x86_64", tmp_path)
    assert fingerprint_id(a) != fingerprint_id(b)
    same = dict(a, memory_gib=(a["memory_gib"] or 0) + 16, os="Linux 9.9", providers=["X"], usable_cores=1)
    assert fingerprint_id(same) == fingerprint_id(a)
    assert fingerprint_id(dict(a, onnxruntime="0.0.1")) != fingerprint_id(a)
    assert fingerprint_id(dict(a, provider="cuda")) != fingerprint_id(a)
    with pytest.raises(ValueError, match="missing"):
        fingerprint_id({"cpu_model": "x"})


def test_this_machine(tmp_path):
    fp = device_fingerprint("cpu")
    assert fp == device_fingerprint("cpu")  # stable across calls
    json.dumps(fp)
    assert fp["gpu"] is None and fp["provider"] == "cpu" and fp["logical_cores"] >= fp["usable_cores"] >= 1
    assert "CPUExecutionProvider" in fp["providers"] and fp["onnxruntime"]
    assert len(fingerprint_id(fp)) == 16
    with pytest.raises(ValueError, match="provider"):
        device_fingerprint("tpu")


def test_meminfo_rounds_to_half_gib():
    assert parse_meminfo_gib("MemTotal:       24599472 kB\nMemFree: 1 kB\n") == 23.5
    assert parse_meminfo_gib("MemTotal:        8058992 kB\n") == 7.5
    assert parse_meminfo_gib("nothing") is None


# -- energy: a fake /sys/class/powercap (this VM exposes no RAPL counters) ---------------------------

def write_zone(root, name: str, kind: str, uj: int, max_uj: int = 1_000_000) -> None:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(kind + "\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_reads_package_domains_and_handles_wraparound(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    write_zone(tmp_path, "intel-rapl:1", "package-1", 100)
    write_zone(tmp_path, "intel-rapl:0:0", "core", 5)  # a subzone: already counted in package 0
    write_zone(tmp_path, "intel-rapl:2", "psys", 5)  # not a package
    assert [d.name for d in rapl_domains(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    meter = open_meter("cpu", rapl_root=tmp_path)
    assert isinstance(meter, RaplMeter) and meter.source == "rapl"
    assert meter.read_j() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100000\n")  # wrapped at 1 J: +0.2 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("300100\n")  # +0.3 J
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")  # ignored
    assert meter.read_j() == pytest.approx(0.5)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("600000\n")  # +0.5 J
    assert meter.read_j() == pytest.approx(1.0)


def test_no_readable_meter_is_none(tmp_path):
    assert open_meter("cpu", rapl_root=tmp_path / "absent") is None
    write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("not a number\n")  # as if unreadable
    assert open_meter("cpu", rapl_root=tmp_path) is None
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert open_meter("cuda") is None  # no pynvml: no meter, never an estimate
