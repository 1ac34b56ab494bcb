"""``dvt profile``: measure a model's cost profile on this machine and store it with the weights.

One call, :func:`profile_weights`: open a checkpoint (or the shipped weights, or an export folder) in the chosen
runtime, precision and threads, time every stage inside the cascade at each batch size
(:func:`dvt_core.runtime.cost_model.measure`, beside the same runtime's static model where there is one), say at
the stored operating point whether early exit pays at each batch size, and store the profile as ``cost_profile``:
in a new checkpoint (``out``), in place only with ``force`` (never in the shipped weights), or in an export's
manifest (in place, with ``force``; its hashes still checked). This sits above ``dvt_core.export`` (it rewrites
manifests) and reaches every framework through the runtime registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dvt_core.errors import InputError
from dvt_core.runtime import cost_model
from dvt_core.runtime.builder import build

DEFAULT_BATCH_SIZES = (1, 64)


def _destination(src: Path, exported: bool, shipped: bool, out, force: bool) -> Optional[Path]:
    """Where the profile goes (None: the export's manifest), refused before any timing when not allowed."""
    from dvt_core import fileio
    from dvt_core.checkpoint.registry import is_shipped_file

    if exported:
        if out is not None:
            raise InputError("an export folder's profile is stored in its own dvt.json; drop --out (copy the "
                             "folder first to keep the original)")
        if not force:
            raise InputError(f"storing the profile rewrites {src / 'dvt.json'}; pass --force to do so")
        fileio.check_writable(src / "dvt.json", force=True)
        return None
    if out is None:
        if shipped:
            raise InputError(f"refusing to modify the shipped weights {src} (their SHA-256 is registered); "
                             "write a profiled copy with --out FILE")
        if not force:
            raise InputError(f"storing the profile in {src} rewrites it; pass --force, or write a copy with --out")
        return fileio.check_writable(src, force=True)
    dst = Path(out)
    if is_shipped_file(dst):
        raise InputError(f"refusing to overwrite the shipped weights {dst}; choose another --out")
    if dst.exists() and dst.resolve() == src.resolve() and not force:
        raise InputError(f"--out {dst} is the checkpoint itself; pass --force to rewrite it in place")
    return fileio.check_writable(dst, force=force)


def _source(weights, model: Optional[str]) -> tuple[Path, bool, bool]:
    """(checkpoint or export path, is it an export, is it shipped)."""
    from dvt_core.checkpoint.registry import default_weights_path, is_shipped_file
    from dvt_core.export.writer import is_export

    if weights is None:
        raise InputError("name what to profile with --weights FILE, --weights DIR (an export folder) or "
                         "--weights default --model NAME")
    if str(weights) == "default":
        if model is None:
            raise InputError("--weights default needs --model NAME")
        return Path(default_weights_path(model)), False, True
    src = Path(weights)
    if not src.exists():
        raise InputError(f"weights file or folder not found: {src}")
    if src.is_dir() and not is_export(src):
        raise InputError(f"{src} is a folder but not a dvt export (no dvt.json)")
    return src, is_export(src), is_shipped_file(src)


def _static_model(model, src: Path, exported: bool, backend: str, precision: str, threads, device=None):
    """The same runtime's static model of the last stage's grid (random weights: timing does not depend on
    them), or None for an export without the static model's export beside it."""
    from dvt_core.model.zoo import static_spec
    from dvt_core.bench.benchmarking import sibling_export

    spec = static_spec(model.spec, model.spec.num_exits - 1)
    if not exported:
        return build(spec, backend=backend, precision=precision, device=device)
    sibling = sibling_export(src, spec.name)
    return None if sibling is None else build(sibling, backend=backend, precision=precision,
                                                       threads=threads, device=device)


def _stored_shares(model, images: np.ndarray) -> Optional[list]:
    """The exit shares of the stored operating point on ``images`` (None without one)."""
    from dvt_core.errors import DVTError
    from dvt_core.runtime import policy
    from dvt_core.bench.benchmarking import exit_probs
    from dvt_core.runtime.operating_point import model_thresholds

    try:
        thresholds = model_thresholds(model)
    except DVTError:
        return None
    probs = exit_probs(model, [images[i:i + 64] for i in range(0, len(images), 64)])
    exits = policy.assign_exits(probs, thresholds)
    return (np.bincount(exits, minlength=model.spec.num_exits) / len(exits)).tolist()


def _open(src: Path, exported: bool, model_name, backend: str, precision: str, threads, overrides: dict,
          device: Optional[str] = None, allow_lossy_cast: bool = False, trust_native_code: bool = False):
    from dvt_core.runtime.contract import GraphRuntime, backend_of, get_backend

    if exported:
        if not isinstance(get_backend(backend), GraphRuntime):
            raise InputError(f"{src} is an export folder: profile it with the runtime that runs it "
                             "(--backend onnx or openvino)")
        return build(src, backend=backend, precision=precision, threads=threads, device=device,
                     trust_native_code=trust_native_code)
    if isinstance(get_backend(backend), GraphRuntime):
        raise InputError(f"the {backend} runtime runs export folders: `dvt export` the checkpoint, then profile "
                         "the folder")
    model = build(model_name, backend=backend, weights=str(src), precision=precision, device=device,
                           allow_lossy_cast=allow_lossy_cast, **overrides)
    if threads is not None:
        backend_of(model).set_threads(model, threads)
    return model


def _store(src: Path, dst: Optional[Path], model, profile: dict, force: bool) -> Path:
    """The profile written beside the weights: the export's manifest, or a checkpoint (atomically)."""
    from dvt_core.checkpoint.files import format_for_suffix, read_checkpoint, write_checkpoint
    from dvt_core.export.manifest import rewrite_cost_profile

    if dst is None:
        return rewrite_cost_profile(src, profile)
    ckpt = read_checkpoint(src)
    if dst.resolve() == src.resolve():
        fmt = "torch" if ckpt.format == "official" else ckpt.format
    else:
        fmt = format_for_suffix(dst)
    meta = {**dict(ckpt.meta or {}), "cost_profile": profile}
    state = ckpt.canonical_state(model.spec.num_exits, model.spec.in_chans)
    return write_checkpoint(dst, state, meta, fmt=fmt, force=True)


def profile_weights(weights, model: Optional[str] = None, backend: str = "torch", precision: str = "fp32",
                    threads: Optional[int] = None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                    images: int = 64, repeats: int = 3, warmup: int = 1, out=None, force: bool = False,
                    progress: bool = False, overrides: Optional[dict] = None, seed: int = 0,
                    device: Optional[str] = None, sha256: Optional[str] = None, allow_lossy_cast: bool = False,
                    trust_native_code: bool = False) -> dict:
    """Measure and store the cost profile of ``weights`` (a checkpoint, ``"default"`` with ``model``, or an
    export folder run by ``backend``) at ``precision`` with ``threads``, over ``images`` images per batch
    size (at least one batch), on ``device`` (None: the runtime's default); ``sha256`` checks a weights file.
    Every check on the source and the destination comes before any timing. Returns the
    ``profile``, where it was ``written``, the ``exit_shares`` of the stored operating point on the timed
    images (None without one), the ``payoff`` lines and what the images were (``images``)."""
    from tqdm.auto import tqdm

    from dvt_core.checkpoint.registry import check_weights
    from dvt_core.bench.benchmarking import benchmark_images

    check_weights(model, weights, sha256)
    src, exported, shipped = _source(weights, model)
    dst = _destination(src, exported, shipped, out, force)
    if exported and backend == "torch":  # the default: an export runs on its own runtime
        from dvt_core.export.manifest import read_manifest

        backend = read_manifest(src, verify=False)["graph_format"]
    net = _open(src, exported, model, backend, precision, threads, overrides or {}, device, allow_lossy_cast,
                trust_native_code)
    static = _static_model(net, src, exported, backend, precision, threads, device)
    count = max(int(images), max(batch_sizes))
    pictures, what = benchmark_images(net, count, seed)
    with tqdm(total=len(set(batch_sizes)), desc=f"profiling {net.spec.name}", unit="batch size",
              disable=not progress, leave=False) as bar:
        profile = cost_model.measure(net, pictures, batch_sizes, repeats, warmup, static, threads, precision,
                                     step=lambda _: bar.update())
    shares = _stored_shares(net, pictures)
    written = _store(src, dst, net, profile, force)
    lines = cost_model.payoff_lines(profile, shares) if shares is not None else []
    return {"profile": profile, "written": str(written), "exit_shares": shares, "payoff": lines,
            "images": what, "static": static is not None}
