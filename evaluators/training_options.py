"""What a training config may say, checked without importing Lightning (the driver validates it)."""

from __future__ import annotations

OPTIMIZERS = ("adam", "sgd", "adamw")
DEFAULT_MOMENTUM = 0.9  # SGD's (Nesterov) when neither the evaluator nor the candidate says otherwise
ACCELERATORS = ("cpu", "cuda", "auto")


def check_accelerator(accelerator: str) -> None:
    """Validate an accelerator name and that it can be honoured; never fall back silently."""
    if accelerator == "gpu":
        raise ValueError("accelerator='gpu' is ambiguous; allowed: cpu, cuda, auto (say 'cuda' for NVIDIA GPUs)")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is unknown; allowed: {', '.join(ACCELERATORS)}")
    if accelerator == "cuda" and not _cuda_available():
        raise RuntimeError("accelerator='cuda' requested but torch sees no CUDA device on this machine")


def _cuda_available() -> bool:
    import torch  # only asked for when a config names CUDA

    return bool(torch.cuda.is_available())
