"""One installed package: the wheel holds `hwnas` and nothing else at the top, ships conf/, and works
installed (not editable) from any directory; no module imports the repository's folders by their bare names."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"search": "hwnas/search", "spaces": "hwnas/spaces", "evaluators": "hwnas/evaluators", "scripts": "hwnas/scripts", "conf": "hwnas/conf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, cwd=out,
    )
    (built,) = out.glob("hwnas-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    return target


def test_the_wheel_installs_one_top_level_package_holding_every_folder(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"hwnas", "hwnas-0.1.0.dist-info"}
    for folder, packaged in FOLDERS.items():
        suffixes = (".py", ".yaml")
        files = {str(p.relative_to(ROOT / folder)) for p in (ROOT / folder).rglob("*") if p.suffix in suffixes and "__pycache__" not in p.parts}
        assert files, folder
        missing = {f for f in files if f"{packaged}/{f}" not in names}
        assert not missing, f"{folder}/ files missing from the wheel: {sorted(missing)}"


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "HOME": str(installed.parent / "home")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_installed_package_runs_from_any_directory_with_its_own_config(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, "-c", "import hwnas, hwnas.search.config as c; print(hwnas.__file__); print(c.CONF_DIR)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(installed) and Path(conf_dir) == installed / "hwnas" / "conf"
    cfg = _run(installed, "-m", "hwnas", "--cfg", "n_trials=3", "search=nsga2", cwd=tmp_path)
    assert cfg.returncode == 0, cfg.stderr
    assert re.search(r"^n_trials: 3$", cfg.stdout, re.M) and "NSGAIISampler" in cfg.stdout
    bad = _run(installed, "-m", "hwnas", "search=nope", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("hwnas: error: search=nope: unknown choice")
    script = _run(installed, "-m", "hwnas.scripts.bench_samplers", "--help", cwd=tmp_path)
    assert script.returncode == 0 and "usage" in script.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written where it ran


def test_no_module_imports_the_folders_by_their_bare_names() -> None:
    bare = re.compile(r"^\s*(from|import)\s+(search|spaces|evaluators|scripts|conf)(\.|\s|$)", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("hwnas", "search", "spaces", "evaluators", "scripts", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if bare.search(p.read_text())
    ]
    assert offenders == []
