"""A training run on a named data set, with every check ``dvt train`` makes: :func:`train_dataset`.

What the command line used to compute lives here, so a Python user gets the same checks and the same
files: the data set's class count against the spec's, the held-out part's default size, the batch size
against the training images, the normalisation of an image folder computed from its training images,
the model's name (a sanitised folder name or ``name``), the output folder (never overwritten without
``force``; only fixed or sanitised file names inside it), the resume check and ``--init default``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from dvt_core.data import sources as dvt_data
from dvt_core.errors import DataError, InputError
from dvt_core.training import config as C
from dvt_core.training.config import FOLDER_HOLDOUT, TrainConfig
from dvt_core.training.loop import check_resumable, fit, make_trainer, output_paths

DEFAULT_INIT = "default"  # ``init="default"``: the shipped weights of the model (dvt_core.checkpoint.registry)


def resolve_init(init, arch: str) -> Optional[str]:
    """The checkpoint file ``init`` names: ``"default"`` is ``arch``'s shipped weights (checked against
    their registered SHA-256); a path must be a file."""
    if init is None:
        return None
    if str(init) == DEFAULT_INIT:
        from dvt_core.checkpoint.registry import default_weights_path

        return str(default_weights_path(arch))
    if not Path(init).is_file():
        raise InputError(f"--init file not found: {init}")
    return str(init)


def folder_normalisation(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of uint8 ``images`` (N, H, W[, C]) on the 0..1 scale the model's input
    normalisation uses (:func:`dvt_core.data.sources.normalize`); a flat channel gets std 1."""
    x = np.asarray(images)
    x = x.reshape(-1, 1) if x.ndim == 3 else x.reshape(-1, x.shape[-1])
    mean = x.mean(axis=0, dtype=np.float64) / 255.0
    std = x.std(axis=0, dtype=np.float64) / 255.0
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def fit_classes(spec, labels: np.ndarray, classes: list, fashion: bool, fixed: bool, log) -> object:
    """``spec`` with the data set's class count (an image folder's); refused when ``fixed`` (the user set
    num_classes) and they differ, or when the data has more classes than the spec predicts."""
    from dvt_core.model.zoo import get_spec

    n_classes = int(labels.max()) + 1
    if not fashion and n_classes != spec.num_classes:
        if fixed:
            raise InputError(f"the data set has {n_classes} classes ({', '.join(classes)}) but num_classes="
                             f"{spec.num_classes}; drop the override or make them agree")
        log(f"the data set has {n_classes} classes: training {spec.name} with num_classes={n_classes} "
            f"(the zoo entry has {spec.num_classes})")
        return get_spec(spec, num_classes=n_classes)
    if n_classes > spec.num_classes:
        raise InputError(f"the data set has {n_classes} classes but {spec.name} predicts {spec.num_classes}; "
                         f"pass -O num_classes={n_classes}")
    return spec


def check_split(cfg: TrainConfig, n: int, holdout_given: bool) -> None:
    """The training images left after the held-out part fill at least one batch."""
    n_train = n - cfg.holdout
    if n_train < 1:
        given = "" if holdout_given else " (the default)"
        raise C.ConfigError("holdout", f"the data set has {n} training images and holdout {cfg.holdout}{given} "
                                       "keeps them all out of training for calibration; pass a smaller --holdout "
                                       "(e.g. 0.1)")
    if n_train < cfg.batch_size:
        raise C.ConfigError("batch_size", f"the batch size {cfg.batch_size} is larger than the {n_train} training "
                                          f"images ({n} minus {cfg.holdout} held out); pass a smaller --batch-size")


def check_out(state: Path, final: Path, resume: bool, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds a run, unless resuming it or told to ``force``."""
    out = state.parent
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if not resume and not force and (state.exists() or final.exists()):
        raise InputError(f"{out} already holds a training run ({(state if state.exists() else final).name}); "
                         "pass --resume to continue it, --force to train over it, or another --out")


def train_dataset(dataset: Union[str, Path], spec, cfg: TrainConfig, out_dir, backend: str = "torch",
                  device: Optional[str] = None, holdout_given: Optional[bool] = None, name: Optional[str] = None,
                  resume: bool = False, force: bool = False, init=None, fixed_classes: bool = False,
                  fixed_normalisation: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print, setup: Optional[Callable[..., dict]] = None) -> Path:
    """Train ``spec`` on ``dataset`` (``fashion-mnist`` or a folder with one sub-folder per class) into
    ``out_dir``; returns the final weights' path. ``cfg.holdout`` None means the data set's default
    (``TrainConfig().holdout`` images of Fashion-MNIST, ``FOLDER_HOLDOUT`` of a folder). A folder's model
    gets its class count, its normalisation (unless ``fixed_normalisation``: the user set mean / std)
    and, unless ``name`` is given, the folder's name. ``init`` is a checkpoint file or ``"default"``.
    ``setup(trainer, spec, images, labels, cfg)``, called once the spec, the split and the trainer are final,
    returns more keyword arguments for :func:`~dvt_core.training.loop.fit` (``dvt adapt`` starts there)."""
    from dvt_core.data.datasets import is_fashion_mnist, load_dataset

    fashion = is_fashion_mnist(dataset)
    init_file = resolve_init(init, spec.name)
    images, labels, classes = load_dataset(dataset, "train", spec)
    if len(labels) == 0:
        raise DataError(f"{dataset} holds no images")
    spec = fit_classes(spec, labels, classes, fashion, fixed_classes, log)
    if holdout_given is None:
        holdout_given = cfg.holdout is not None
    if cfg.holdout is None:
        cfg = replace(cfg, holdout=TrainConfig().holdout if fashion else FOLDER_HOLDOUT)
    cfg = C.resolve_holdout(cfg.validate(), len(labels))
    check_split(cfg, len(labels), holdout_given)
    if not fashion and not fixed_normalisation:
        from dvt_core.model.zoo import get_spec

        train_idx, _ = dvt_data.split_holdout(len(labels), cfg.holdout, cfg.seed)
        mean, std = folder_normalisation(images[train_idx])
        spec = get_spec(spec, mean=mean, std=std)
        log(f"normalisation from the {len(train_idx)} training images: mean {list(mean)}, std {list(std)}")
    model_name = C.model_file_name(name if name is not None else (spec.name if fashion else Path(dataset).resolve().name))
    trainer = make_trainer(backend, spec, cfg, device)
    state, final = output_paths(trainer, out_dir, model_name)
    check_out(state, final, resume, force)
    if resume and not state.exists():
        log(f"nothing to resume ({state} does not exist): starting from scratch")
    elif resume:
        check_resumable(trainer, state, spec)
    if force and not resume:
        for stale in (state, final):
            if stale.exists():
                stale.unlink()
    extra = {"classes": classes}  # one key (readers still accept an older checkpoint's class_names)
    if not fashion:
        extra["normalisation"] = {"mean": list(spec.mean), "std": list(spec.std),
                                  "from": "training images" if not fixed_normalisation else "spec"}
    more = setup(trainer, spec, images, labels, cfg) if setup else {}
    extra.update(more.pop("extra_meta", {}))
    return fit(spec, images, labels, cfg, out_dir, device=device, resume=resume, progress=progress, init=init_file,
               dataset=str(dataset), name=model_name, extra_meta=extra, trainer=trainer, log=log, **more)
