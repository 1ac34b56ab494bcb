"""``build``: a spec (or zoo name) plus optional weights -> a backend model, importing only that backend."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from dvt_core.runtime.contract import GraphRuntime, get_backend
from dvt_core.checkpoint.files import checked_state, read_checkpoint, resolve_spec  # noqa: F401  (resolve_spec: also here)
from dvt_core.errors import CheckpointError, InputError
from dvt_core.model.specs import CascadeSpec


PROBE_BATCH = 2  # blank images each stage of an opened export runs once (not 1: a batch axis of 1 hides in shapes)


def check_stage_outputs(runtime: GraphRuntime, model, where) -> None:
    """Run every stage of an opened export once, on blank images, each on the carry of the stage before: a graph
    whose outputs are not what its spec and the next stage expect (another class count, carried features of
    another shape, with the manifest's hashes updated to match) is refused here, before the first image, as a
    CheckpointError and not a traceback in the middle of a run."""
    import numpy as np

    spec = model.spec
    images = runtime.to_tensor(model, np.zeros((PROBE_BATCH, spec.in_chans, spec.img_size, spec.img_size),
                                               np.float32))
    carry = None
    for i in range(spec.num_exits):
        stage = f"{where}: stage {i + 1} of {spec.num_exits}"
        try:
            logits, carry = runtime.run_stage(model, i, images, carry)
            shape = tuple(runtime.to_numpy(logits).shape)
        except Exception as exc:  # noqa: BLE001 - every runtime raises its own types for a graph fed wrong shapes
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{stage} cannot run on what the stage before gives it: {text}") from None
        if shape != (PROBE_BATCH, spec.num_classes):
            raise CheckpointError(f"{stage} gives logits of shape {list(shape)} for {PROBE_BATCH} images; its spec "
                                  f"says ({PROBE_BATCH}, {spec.num_classes})")
        axes = getattr(carry, "axes", {})
        for name, value in (carry or {}).items():
            if len(value.shape) <= axes.get(name, 0) or value.shape[axes.get(name, 0)] != PROBE_BATCH:
                raise CheckpointError(f"{stage} carries {name} of shape {list(value.shape)}, without the batch of "
                                      f"{PROBE_BATCH} on its axis {axes.get(name, 0)}")


def _open_export(runtime, backend: str, name_or_spec, weights, precision: Optional[str], device, threads,
                 trust_native_code: bool, overrides: dict):
    """``build`` for an export runtime: the folder opened, checked and probed (:func:`check_stage_outputs`)."""
    directory = weights if weights is not None else name_or_spec
    if directory is None or isinstance(directory, CascadeSpec):
        raise InputError(f"the {backend} backend runs an export folder: build(DIR, backend={backend!r})")
    if overrides:
        raise InputError(f"an export's spec is fixed; the {backend} backend takes no overrides")
    if getattr(runtime, "runs_native_code", False) and not trust_native_code:
        raise InputError(f"{directory}: a {backend} export runs native code from its folder when opened; open only "
                         "folders you made or trust, with trust_native_code=True (CLI: --trust-native-code)")
    wanted = None if weights is None else getattr(name_or_spec, "name", name_or_spec)
    if precision is None:  # a folder compiled in one precision (pt2) runs in it; other exports in fp32
        folder_precision = getattr(runtime, "folder_precision", None)
        precision = "fp32" if folder_precision is None else folder_precision(directory)
    model = runtime.open(directory, model=wanted, device=device or "cpu", precision=precision, threads=threads)
    check_stage_outputs(runtime, model, directory)
    return model


def build(name_or_spec: Union[str, CascadeSpec, None] = None, backend: str = "torch",
          weights: Union[str, Path, None] = None, allow_lossy_cast: bool = False, compile: bool = False,
          precision: Optional[str] = None, device: Optional[str] = None, threads: Optional[int] = None,
          trust_native_code: bool = False, **overrides):
    """Build a DVT for a framework ("torch", "mindspore"), or open an export folder ("onnx", "mindir", ...).

    ``weights`` is a path to an official release ``.pth.tar``, a torch state dict, a ``.safetensors``
    or a MindSpore ``.ckpt`` (recognised from the content), or ``"default"`` for the weights this
    project ships for that model. The checkpoint's metadata is kept as ``model.checkpoint_meta``.
    The tensors are checked against the spec before the model is built; NaN / inf and lossy dtype
    casts (int to float, float64 beyond tolerance) are refused unless ``allow_lossy_cast``.
    An export runtime opens ``build(DIR, backend=...)`` (or ``build(NAME, backend=..., weights=DIR)``).

    ``precision`` ("fp32", "bf16", "fp16": what the runtime offers; None: fp32, or for a pt2 export the precision
    its packages were compiled in) and ``device`` (None: the runtime's default) are checked before any work; ``threads`` sets an export runtime's intra-op threads.
    The model comes back in evaluation mode in every backend (dropout and stochastic depth off):
    call ``model.train()`` (torch) or ``model.set_train(True)`` (MindSpore) to train it.
    ``compile=True`` (torch) compiles the stages after the weights are loaded (``model.compile()``:
    torch.compile with a dynamic batch axis).
    ``trust_native_code=True`` is needed to open a folder whose graphs are native code (``pt2``: loading a
    package runs it, as loading a shared library would): the folder's hashes show it was not changed since it
    was written, not who wrote it, so open only folders you made or trust.
    """
    runtime = get_backend(backend)
    runtime.check_precision(precision or "fp32")
    if compile and backend != "torch":
        raise InputError("compile=True is for the torch backend; on MindSpore use model.compiled() (graph mode)")
    if isinstance(runtime, GraphRuntime):
        return _open_export(runtime, backend, name_or_spec, weights, precision, device, threads, trust_native_code,
                            overrides)
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
    model = runtime.set_precision(model, precision or "fp32")
    if compile:
        model.compile()
    return model
