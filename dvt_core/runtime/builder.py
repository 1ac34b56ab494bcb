"""``build``: a spec (or zoo name) plus optional weights -> a backend model, importing only that backend."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from dvt_core.runtime.contract import GraphRuntime, get_backend
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
          precision: str = "fp32", device: Optional[str] = None, threads: Optional[int] = None, **overrides):
    """Build a DVT for a framework ("torch", "mindspore"), or open an export folder ("onnx", "mindir", ...).

    ``weights`` is a path to an official release ``.pth.tar``, a torch state dict, a ``.safetensors``
    or a MindSpore ``.ckpt`` (recognised from the content), or ``"default"`` for the weights this
    project ships for that model. The checkpoint's metadata is kept as ``model.checkpoint_meta``.
    The tensors are checked against the spec before the model is built; NaN / inf and lossy dtype
    casts (int to float, float64 beyond tolerance) are refused unless ``allow_lossy_cast``.
    An export runtime opens ``build(DIR, backend=...)`` (or ``build(NAME, backend=..., weights=DIR)``).

    ``precision`` ("fp32", "bf16", "fp16": what the runtime offers) and ``device`` (None: the runtime's
    default) are checked before any work; ``threads`` sets an export runtime's intra-op threads.
    The model comes back in evaluation mode in every backend (dropout and stochastic depth off):
    call ``model.train()`` (torch) or ``model.set_train(True)`` (MindSpore) to train it.
    ``compile=True`` (torch) compiles the stages after the weights are loaded (``model.compile()``:
    torch.compile with a dynamic batch axis).
    """
    runtime = get_backend(backend)
    runtime.check_precision(precision)
    if compile and backend != "torch":
        raise InputError("compile=True is for the torch backend; on MindSpore use model.compiled() (graph mode)")
    if isinstance(runtime, GraphRuntime):
        directory = weights if weights is not None else name_or_spec
        if directory is None or isinstance(directory, CascadeSpec):
            raise InputError(f"the {backend} backend runs an export folder: build(DIR, backend={backend!r})")
        if overrides:
            raise InputError(f"an export's spec is fixed; the {backend} backend takes no overrides")
        wanted = None if weights is None else getattr(name_or_spec, "name", name_or_spec)
        return runtime.open(directory, model=wanted, device=device or "cpu", precision=precision, threads=threads)
    if threads is not None:
        raise InputError(f"threads= is for export runtimes; set the {backend} framework's own thread count")
    if device is not None:
        runtime.device_for(device)
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
    model = runtime.build_model(spec)
    if ckpt is not None:
        runtime.load_state(model, state, source=str(weights))
        model.checkpoint_meta = dict(ckpt.meta)
    if device is not None:
        model = runtime.to_device(model, device)
    model = runtime.set_precision(model, precision)
    if compile:
        model.compile()
    return model
