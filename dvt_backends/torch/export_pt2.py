"""Per-stage AOTInductor packages of a torch DVT (``dvt export --format pt2``; run by ``dvt_backends.pt2``).

Each stage, wrapped as for ONNX (``export.StageGraph``: images and the previous stage's carry in, logits and
the next stage's carry out), is captured by ``torch.export`` with a dynamic batch axis and compiled ahead of
time by ``torch._inductor.aoti_compile_and_package`` with freezing (the weights are constants of the compiled
code, laid out once for its kernels). The stages are captured as they run in eager torch (the reuse resize as
``embedding_bag`` on its buffers): the ONNX export's swapped-in forms hold their tables as plain tensor
attributes, which Inductor's freezing pass fails on. Loading a package compiles nothing.

``precision`` "bf16" or "fp16" compiles a copy of the model held in that dtype (``DVT.set_precision``): the
weights are frozen in it, float32 images are cast inside the graph (as eager ``run_stage`` casts them), and the
logits and the carry come out in it (the runtime converts only the logits to float32).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from dvt_core.export.manifest import PREV, stage_entry

from .cascade import DVT, PRECISION_DTYPES
from .export import BATCH_AXES, StageGraph

MAX_BATCH = 4096  # the batch axis' upper bound in the compiled code (dvt_core.schema.MAX_BENCH_BATCH is 1024)
INDUCTOR_CONFIGS = {"freezing": True}


def export_stages(model: DVT, out_dir: Path, batch: int = 2, precision: str = "fp32"):
    """Write ``stage{i}.pt2`` for every stage, compiled in ``precision``, into ``out_dir``: (stage entries,
    versions, batch axes). ``model`` itself is left as it is."""
    model = compiled_copy(model, precision)
    spec = model.spec
    was = model.training
    model.eval()
    images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size)  # float32, as the runtime feeds them
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    entries, carry = [], ()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(spec.num_exits):
                g = StageGraph(model, i).eval()
                args = (images, *carry)
                # forward(images, *carry): the images, then the varargs as one tuple (absent when empty)
                shapes = ({0: batch_dim},) + ((tuple({0: batch_dim} for _ in carry),) if carry else ())
                program = torch.export.export(g, args, dynamic_shapes=shapes, strict=False)
                file = f"stage{i + 1}.pt2"
                torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / file),
                                                         inductor_configs=INDUCTOR_CONFIGS)
                out = g(*args)
                carry = tuple(out[1:]) if isinstance(out, tuple) else ()
                entries.append(stage_entry(i, file, ["images", *(PREV + n for n in g.inputs)], ["logits", *g.outputs]))
    finally:
        model.train(was)
    return entries, {"torch": torch.__version__}, dict(BATCH_AXES)


def compiled_copy(model: DVT, precision: str) -> DVT:
    """``model`` held in ``precision``: itself when it already is, else a copy (a cast of the caller's model
    to bf16 and back would round its weights)."""
    if getattr(model, "precision", None) == precision and model.dtype == PRECISION_DTYPES[precision]:
        return model
    return copy.deepcopy(model).set_precision(precision)
