"""`evaluator.init_from=PATH`: every candidate network starts from pretrained weights before training.

The file is a `.safetensors` file, or a PyTorch state_dict (`.pt`, `.pth`, `.bin`, ...) read with
`torch.load(weights_only=True)`: no pickled object is ever constructed. A mapping under a `state_dict`
key (a common checkpoint layout) is used when the top level holds no tensors.

Checked once, before any trial (`check_init_file`): the file exists, reads in its format and holds at
least one tensor. A safetensors file is checked from its header (no torch in the driver).

Per trial (`load_init`) the policy is `evaluator.init_strict`:

- false (default): every tensor whose key is in the candidate's state_dict with the same shape is
  loaded; the rest are skipped. A search's candidates differ in widths and depths, so the file fits some
  layers of most of them and all layers of few; the trial reports `init_loaded_tensors` (and
  `init_skipped_tensors`, the file's tensors that did not fit), so a sweep shows how much each candidate
  started from.
- true: the candidate's state_dict and the file must match exactly (the same keys, the same shapes),
  as for fine-tuning one architecture; otherwise the trial fails with one line naming the first key
  that does not fit and both shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

KEY = "evaluator.init_from"
ALLOWED = "a .safetensors file, or a torch state_dict file that torch.load(weights_only=True) reads, or null"
SAFETENSORS_SUFFIX = ".safetensors"
METRICS = ("init_loaded_tensors", "init_skipped_tensors")


def _refuse(path: Any, what: str) -> ValueError:
    return ValueError(f"{KEY}: {str(path)!r} {what}; allowed: {ALLOWED}")


def check_init_file(path: Any) -> str | None:
    """The file as an absolute path (trials run in other processes and folders), or None when not set;
    ValueError (one line, naming evaluator.init_from) when it is missing or not a weights file."""
    if path is None:
        return None
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise _refuse(path, "is not a file path")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise _refuse(path, "is not a file")
    if resolved.suffix == SAFETENSORS_SUFFIX:
        shapes = _safetensors_shapes(resolved)
    else:
        shapes = {k: tuple(v.shape) for k, v in read_state(resolved).items()}
    if not shapes:
        raise _refuse(path, "holds no tensor")
    return str(resolved)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:  # the header only: nothing is loaded, no torch
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file, whatever safetensors raises
        raise _refuse(path, f"is not a safetensors file ({type(exc).__name__})") from None


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors by key, on the CPU; ValueError (one line) when it is not a weights file."""
    import torch

    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001
            raise _refuse(path, f"is not a safetensors file ({type(exc).__name__})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the restricted unpickler decides
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for a pickled object, RuntimeError for garbage
        raise _refuse(path, f"is not a state_dict that torch.load(weights_only=True) reads ({type(exc).__name__})") from None
    if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        loaded = loaded.get("state_dict", loaded)
    if not isinstance(loaded, Mapping):
        raise _refuse(path, f"holds a {type(loaded).__name__}, not a state_dict")
    state = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(state) != len(loaded):
        bad = next(k for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
        raise _refuse(path, f"holds {bad!r}, which is not a tensor under a string key")
    return state


def _shape(t: Any) -> str:
    return "absent" if t is None else "(" + ", ".join(map(str, t.shape)) + ")"


def load_init(model: nn.Module, path: str | Path, *, strict: bool = False) -> dict[str, float]:
    """Load the file's tensors that fit into `model` (all or nothing with `strict`); returns the metrics
    init_loaded_tensors and init_skipped_tensors."""
    import torch

    state = read_state(path)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if strict:
        bad = next((k for k in [*state, *own] if k not in fits), None)
        if bad is not None:
            raise ValueError(
                f"{KEY}: {bad!r} has shape {_shape(state.get(bad))} in {Path(path).name} and {_shape(own.get(bad))} in "
                f"this candidate; allowed: a file of exactly this network (evaluator.init_strict=false loads what fits)"
            )
    with torch.no_grad():
        model.load_state_dict(fits, strict=False)
    return {"init_loaded_tensors": float(len(fits)), "init_skipped_tensors": float(len(state) - len(fits))}
