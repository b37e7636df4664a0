"""Loaders: nothing a user did not produce in this run is unpickled, and an ONNX file from elsewhere
is loaded without external data and checked before ONNX Runtime sees it."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hwnas.evaluators.onnx_check import OnnxFileError, load_checked

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("search", "spaces", "evaluators", "scripts", "hwnas") for p in (ROOT / d).rglob("*.py")]


def _tiny_model(path: Path, external: str | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        if external != "weights.bin":  # point the reference somewhere else, as a hostile file would
            m = onnx.load(str(path), load_external_data=False)
            for entry in m.graph.initializer[0].external_data:
                if entry.key == "location":
                    entry.value = external
            onnx.save_model(m, str(path))
    return path


def test_a_self_contained_model_loads_and_runs_from_bytes(tmp_path: Path) -> None:
    from hwnas.evaluators.onnx_accuracy import onnx_accuracy

    data = load_checked(_tiny_model(tmp_path / "m.onnx"))
    x = np.eye(4, dtype=np.float32)
    assert onnx_accuracy(data, x, np.arange(4)) == 1.0


@pytest.mark.parametrize("location", ["weights.bin", "../../../../etc/passwd"])
def test_external_data_is_refused_naming_the_file(tmp_path: Path, location: str) -> None:
    path = _tiny_model(tmp_path / "ext.onnx", external=location)
    with pytest.raises(OnnxFileError) as info:
        load_checked(path)
    message = str(info.value)
    assert str(path) in message and "external data" in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 7, "truncated"])
def test_garbage_or_truncated_onnx_is_refused_in_one_line(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        whole = _tiny_model(tmp_path / "whole.onnx").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(OnnxFileError) as info:
        load_checked(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path / "m.onnx")
    with pytest.raises(OnnxFileError, match="at most 10 bytes"):
        load_checked(path, max_bytes=10)


def test_evaluate_file_checks_a_file_from_elsewhere(tmp_path: Path) -> None:
    # What hwnas-export hands a run folder's model to: PipelineEvaluator.evaluate_file.
    from hwnas.evaluators.pipeline import PipelineEvaluator

    stub = SimpleNamespace(data=SimpleNamespace(arrays=lambda split: (np.eye(4, dtype=np.float32), np.arange(4))))
    assert PipelineEvaluator.evaluate_file(stub, _tiny_model(tmp_path / "ok.onnx"), "val") == 1.0  # type: ignore[arg-type]
    with pytest.raises(OnnxFileError, match="ext.onnx"):
        PipelineEvaluator.evaluate_file(stub, _tiny_model(tmp_path / "ext.onnx", external="weights.bin"), "val")  # type: ignore[arg-type]


# --- numpy and torch: the flags hwnas uses refuse pickled objects -------------------------------------


class _Canary:
    """Unpickling this writes a marker file: proof that a loader ran a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "unpickled"))


def test_npz_with_an_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, ok=np.arange(3), evil=np.array([_Canary(tmp_path / "marker")], dtype=object))
    with np.load(path, allow_pickle=False) as loaded:
        assert list(loaded["ok"]) == [0, 1, 2]
        with pytest.raises(ValueError, match="allow_pickle"):
            loaded["evil"]
    assert not (tmp_path / "marker").exists()


def test_torch_file_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "evil": _Canary(tmp_path / "marker")}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        torch.load(path, weights_only=True)
    assert not (tmp_path / "marker").exists()


# --- the audit: every loader in hwnas' sources is one of the safe forms -----------------------------------

UNSAFE = [
    (r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bdill\.loads?\(", "pickle"),
    (r"\bread_pickle\(|\bjoblib\.load\(", "pickle-based loader"),
    (r"\byaml\.(unsafe_)?load\(|\byaml\.full_load\(", "yaml.load (use OmegaConf.load / yaml.safe_load)"),
    (r"\bTuner\.restore\(|\bTuner\.can_restore\(", "Ray's pickled experiment state"),
]
# onnx.load with external data of a file this trial itself just exported (evaluators/quantize.py fp16)
ONNX_LOAD_EXEMPT = {("evaluators/quantize.py", "onnx.load(str(fp32_path))")}


def test_no_source_unpickles_or_loads_unsafely() -> None:
    problems = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"`[^`]*`", "", line.split("#", 1)[0])  # not code quoted in a docstring
            for pattern, what in UNSAFE:
                if re.search(pattern, code):
                    problems.append(f"{rel}:{n}: {what}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{rel}:{n}: torch.load without weights_only=True")
            if re.search(r"\b(np|numpy)\.load\(", code) and "allow_pickle=False" not in code:
                problems.append(f"{rel}:{n}: np.load without allow_pickle=False")
            exempt = any(rel == r and e in code for r, e in ONNX_LOAD_EXEMPT)
            if "onnx.load(" in code and "load_external_data=False" not in code and not exempt:
                problems.append(f"{rel}:{n}: onnx.load with external data")
    assert not problems, "\n".join(problems)


def test_resume_reads_no_pickled_optuna_snapshot(tmp_path: Path) -> None:
    # Optuna's journal restores pickled snapshots only from a snapshot-capable backend (Redis);
    # the sweep's journal is a file of JSON lines.
    from optuna.storages.journal._base import BaseJournalSnapshot

    from hwnas.search.sweep_state import journal_storage

    storage = journal_storage(tmp_path)
    assert not isinstance(storage._backend, BaseJournalSnapshot)


def test_the_run_folder_check_names_the_pending_file_tracking_writes() -> None:
    from hwnas.search import run_folder, tracking

    assert run_folder.PENDING_FILE == tracking.PENDING_FILE
