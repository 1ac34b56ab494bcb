"""``build``: a spec (or zoo name) plus optional weights -> a backend model, importing only that backend."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from dvt_core.runtime.contract import BACKENDS, EXPORT_BACKENDS, get_backend  # noqa: F401  (used from here too)
from dvt_core.checkpoint.files import Checkpoint, checked_state, read_checkpoint
from dvt_core.errors import CheckpointError, InputError
from dvt_core.model.specs import CascadeSpec
from dvt_core.model.zoo import get_spec


def resolve_spec(name_or_spec: Union[str, CascadeSpec, None], ckpt: Optional[Checkpoint], **overrides) -> CascadeSpec:
    """The spec to build: the checkpoint's own when it carries one, else the zoo entry; plus overrides."""
    meta_spec = (ckpt.meta or {}).get("spec") if ckpt is not None else None
    if meta_spec is not None:
        saved = CascadeSpec.from_dict(meta_spec)
        wanted = name_or_spec.name if isinstance(name_or_spec, CascadeSpec) else name_or_spec
        arch = ckpt.meta.get("arch", saved.name)
        if wanted is not None and wanted not in (arch, saved.name):
            raise CheckpointError(f"{ckpt.path} holds weights of {arch}, not {wanted}")
        return get_spec(saved, **overrides)
    if name_or_spec is None:
        raise InputError("name a model (its checkpoint carries no architecture)")
    return get_spec(name_or_spec, **overrides)


def build(name_or_spec: Union[str, CascadeSpec, None] = None, backend: str = "torch",
          weights: Union[str, Path, None] = None, allow_lossy_cast: bool = False, compile: bool = False,
          precision: str = "fp32", **overrides):
    """Build a DVT for ``backend`` ("torch" or "mindspore"), or load an export ("onnx" or "mindir").

    ``weights`` is a path to an official release ``.pth.tar``, a torch state dict, a ``.safetensors``
    or a MindSpore ``.ckpt`` (recognised from the content), or ``"default"`` for the weights this
    project ships for that model. The checkpoint's metadata is kept as ``model.checkpoint_meta``.
    The tensors are checked against the spec before the model is built; NaN / inf and lossy dtype
    casts (int to float, float64 beyond tolerance) are refused unless ``allow_lossy_cast``.

    The model comes back in evaluation mode in every backend (dropout and stochastic depth off):
    call ``model.train()`` (torch) or ``model.set_train(True)`` (MindSpore) to train it.
    ``compile=True`` (torch) compiles the stages after the weights are loaded (``model.compile()``:
    torch.compile with dynamic batch sizes).
    ``precision`` ("fp32", "bf16", "fp16"; ``dvt_core.runtime.precision``) is the dtype the model
    computes in, set through the backend's ``set_precision``; a backend without one runs fp32 only and
    refuses the others (InputError).
    """
    from dvt_core.runtime.precision import apply_precision, check_precision

    check_precision(precision)
    if compile and backend != "torch":
        raise InputError("compile=True is for the torch backend; on MindSpore use model.compiled() (graph mode)")
    if backend in EXPORT_BACKENDS:  # build(DIR, backend="onnx") or build(NAME, backend="onnx", weights=DIR)
        directory = weights if weights is not None else name_or_spec
        if directory is None or isinstance(directory, CascadeSpec):
            raise InputError(f"the {backend} backend runs an export folder: build(DIR, backend={backend!r})")
        if overrides:
            raise InputError(f"an export's spec is fixed; the {backend} backend takes no overrides")
        wanted = None if weights is None else getattr(name_or_spec, "name", name_or_spec)
        mod = get_backend(backend)
        return apply_precision(mod, mod.load(directory, model=wanted), precision)
    ckpt = None
    if weights is not None:
        if str(weights) == "default":
            from dvt_core.checkpoint.registry import default_weights_path

            name = name_or_spec.name if isinstance(name_or_spec, CascadeSpec) else name_or_spec
            weights = default_weights_path(name)
        ckpt = read_checkpoint(weights)
    spec = resolve_spec(name_or_spec, ckpt, **overrides)
    state = None
    if ckpt is not None:  # names, shapes and values checked before any model is allocated
        state = checked_state(ckpt, spec, source=str(weights), allow_lossy=allow_lossy_cast)
    mod = get_backend(backend)
    model = mod.build_model(spec)
    if ckpt is not None:
        mod.load_state(model, state, source=str(weights))
        model.checkpoint_meta = dict(ckpt.meta)
    model = apply_precision(mod, model, precision)
    if compile:
        model.compile()
    return model
