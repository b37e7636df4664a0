"""Any LightningDataModule as a hwnas dataset, read once by the driver into the same cache as every source.

The contract (README, "Your own LightningDataModule"):
- hwnas builds the module from `dataset.module` (its `_target_` passes the plug-in policy), calls
  `setup("fit")` and `setup("test")` — never `prepare_data()`: the data must already be on disk,
  nothing may be downloaded — and reads `train_dataloader()` once, then `val_dataloader()` and
  `test_dataloader()` once each when the module has them (else val / test are seeded, stratified
  cuts of train).
- Every batch is `(x, y)`: x a float tensor N×C×H×W with one C×H×W for the whole module, y integer
  class indices 0..num_classes-1 (N,).
- The module has `num_classes` (int >= 2); `classes` (list of names, that many) is optional.
- Loaders are deterministic: no random augmentation (hwnas' `dataset.augment` augments every epoch
  instead, seeded); order does not matter — hwnas sorts what it reads, so a shuffling train loader
  gives the same fingerprint.
hwnas normalises what it reads per channel with the train split's mean and std, like every source.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from hwnas.evaluators.data.base import POOL, TEST, VAL, DataError, Scan
from hwnas.evaluators.data.recipe import CachedData, check_labels, finite_or_refuse

MAX_ITEMS = 5_000_000


class LightningData(CachedData):
    """`dataset=lightning dataset.module._target_=mylab.data.MyModule plugins=[mylab]`."""

    kind = "lightning"

    def __init__(self, *, module: Any, **common: Any) -> None:
        target = module.get("_target_") if hasattr(module, "get") else None
        if not isinstance(target, str) or not target:
            raise ValueError(
                "dataset.module._target_: missing; allowed: your LightningDataModule class, e.g. "
                "dataset.module._target_=mylab.data.MyModule plugins=[mylab]"
            )
        common.setdefault("resolution", None)
        common.setdefault("channels", None)
        super().__init__(**common)
        from omegaconf import OmegaConf

        # Plain data (the node is already checked by the plug-in policy): picklable to workers.
        plain = OmegaConf.to_container(module, resolve=True) if OmegaConf.is_config(module) else dict(module)
        self.module_config: dict[str, Any] = dict(plain)  # type: ignore[arg-type]

    def _describe(self) -> dict[str, Any]:
        return {"module": self.module_config["_target_"]}

    def _module(self) -> Any:
        import pytorch_lightning as pl
        from hydra.utils import instantiate

        target = self.module_config["_target_"]
        try:
            module = instantiate(self.module_config)
        except Exception as exc:  # the user's constructor: any error is theirs, reported in one line
            raise DataError(f"dataset.module: {target} could not be built ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(module, pl.LightningDataModule):
            raise DataError(f"dataset.module._target_: {target} built a {type(module).__name__}; allowed: a LightningDataModule")
        return module

    def _read_module(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        module = self._module()
        target = self.module_config["_target_"]
        n_classes = getattr(module, "num_classes", None)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise DataError(f"dataset.module: {target}.num_classes is {n_classes!r}; allowed: an int >= 2 (the contract)")
        classes = getattr(module, "classes", None)
        if classes is None:
            classes = [str(i) for i in range(n_classes)]
        elif not (isinstance(classes, (list, tuple)) and len(classes) == n_classes):
            raise DataError(f"dataset.module: {target}.classes is not a list of {n_classes} names (the contract)")
        for stage in ("fit", "test"):
            try:
                module.setup(stage)
            except Exception as exc:
                raise DataError(f"dataset.module: {target}.setup({stage!r}) raised {type(exc).__name__}: {str(exc)[:200]}") from None
        xs, ys, codes = [], [], []
        for name, code, required in (("train", POOL, True), ("val", VAL, False), ("test", TEST, False)):
            got = self._materialise(module, name, n_classes, required)
            if got is not None:
                xs.append(got[0])
                ys.append(got[1])
                codes.append(np.full(len(got[1]), code, dtype=np.int8))
        shapes = {x.shape[1:] for x in xs}
        if len(shapes) > 1:
            raise DataError(f"dataset.module: {target}'s loaders give images of shapes {sorted(shapes)}; allowed: one C×H×W (the contract)")
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(codes), [str(c) for c in classes]

    def _materialise(self, module: Any, split: str, n_classes: int, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
        import pytorch_lightning as pl
        import torch

        target = self.module_config["_target_"]
        where = f"dataset.module: {target}.{split}_dataloader()"
        hook = getattr(module, f"{split}_dataloader", None)
        try:
            # A hook the module does not define is Lightning's own, which raises MisconfigurationException
            # when called: the module has no such loader (val / test are then cut from train).
            defined = hook is not None and getattr(hook, "__func__", hook) is not getattr(pl.LightningDataModule, f"{split}_dataloader")
            loader = hook() if defined and hook is not None else None
        except NotImplementedError:
            loader = None
        except Exception as exc:
            raise DataError(f"{where} raised {type(exc).__name__}: {str(exc)[:200]}") from None
        if loader is None or (isinstance(loader, (list, tuple)) and not loader):
            if required:
                raise DataError(f"{where} gives no loader; allowed: a DataLoader of (x, y) batches (the contract)")
            return None
        xs, ys, count = [], [], 0
        try:
            for batch in loader:
                if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
                    raise DataError(f"{where} yields {type(batch).__name__}; allowed: (x, y) tensor pairs (the contract)")
                x, y = batch
                if x.ndim != 4 or not x.is_floating_point():
                    raise DataError(f"{where} yields x of {x.dtype} {tuple(x.shape)}; allowed: float N×C×H×W (the contract)")
                if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
                    raise DataError(f"{where} yields y of {y.dtype} {tuple(y.shape)}; allowed: integer class indices (N,) (the contract)")
                xs.append(x.detach().cpu().float().numpy())
                ys.append(y.detach().cpu().numpy())
                count += len(x)
                if count > MAX_ITEMS:
                    raise DataError(f"{where} yields more than {MAX_ITEMS} items; allowed: a finite loader")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{where} raised {type(exc).__name__} while iterating: {str(exc)[:200]}") from None
        if not xs:
            raise DataError(f"{where} is empty; allowed: at least one batch")
        x_all = np.concatenate(xs)
        finite_or_refuse(x_all, f"{where} x")
        y_all = check_labels(np.concatenate(ys), f"{where} y", n_classes)
        # Canonical order (by each item's bytes), so a shuffling loader reads as the same data.
        keys = [hashlib.sha256(x_all[i].tobytes() + y_all[i].tobytes()).digest() for i in range(len(y_all))]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return x_all[order], y_all[order]

    def _scan(self) -> Scan:
        x, y, own, classes = self._read_module()
        if x.shape[1] not in (1, 3) and self.channels is not None:
            raise DataError(f"dataset.channels: the module gives {x.shape[1]} channels; allowed: null (keep them)")
        digest = hashlib.sha256()
        for a in (x, y, own):
            digest.update(np.ascontiguousarray(a).data)  # the buffer: no copy of the module's whole data
        digest.update(repr((classes, x.shape)).encode())
        return Scan(
            labels=y, classes=classes, content_hash=digest.hexdigest(), own_split=own,
            channels=int(x.shape[1]), dtype="float32", native_size=(int(x.shape[2]), int(x.shape[3])), items=[x],
        )
