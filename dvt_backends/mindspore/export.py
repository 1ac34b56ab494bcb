"""Per-stage MindIR export of a MindSpore DVT (see dvt_core.export.writer for the graphs' inputs and outputs).

Each stage is compiled on its own, wrapped so that it takes ``images`` and the previous stage's carry
(positionally: features, then relations, as far as the stage reuses them) and returns its logits and
the carry the next stage reads. The batch axis is dynamic. Relations stay in this backend's
channel-major layout, (depth x heads, B, N, N), the layout the next stage reads.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from dvt_core.export.manifest import FEATURES, PREV, RELATIONS, carry_names, stage_entry

from . import compat as C
from .cascade import DVT, FEATURE_BATCH_AXIS, RELATION_BATCH_AXIS

BATCH_AXES = {FEATURES: FEATURE_BATCH_AXIS, RELATIONS: RELATION_BATCH_AXIS}


class _StageGraph(nn.Cell):
    """Stage ``index`` as a graph; subclasses fix which carried tensors it reads."""

    def __init__(self, model: DVT, index: int):
        super().__init__()
        self.model = model
        self.index = index
        self.last = index == model.num_exits - 1
        out = carry_names(model.spec, index)
        self.emit_features = FEATURES in out
        self.emit_relations = RELATIONS in out

    def outputs(self, logits, carry):
        if self.last:
            return logits
        if self.emit_features and self.emit_relations:
            return logits, carry[0], carry[1]
        if self.emit_features:
            return logits, carry[0]
        return logits, carry[1]


class _First(_StageGraph):
    def construct(self, images):
        logits, carry = self.model.run_stage(self.index, images, None)
        return self.outputs(logits, carry)


class _Features(_StageGraph):
    def construct(self, images, features):
        logits, carry = self.model.run_stage(self.index, images, (features, None))
        return self.outputs(logits, carry)


class _Relations(_StageGraph):
    def construct(self, images, relations):
        logits, carry = self.model.run_stage(self.index, images, (None, relations))
        return self.outputs(logits, carry)


class _Both(_StageGraph):
    def construct(self, images, features, relations):
        logits, carry = self.model.run_stage(self.index, images, (features, relations))
        return self.outputs(logits, carry)


def stage_graph(model: DVT, index: int) -> _StageGraph:
    names = tuple(carry_names(model.spec, index - 1)) if index > 0 else ()
    cls = {(): _First, (FEATURES,): _Features, (RELATIONS,): _Relations, (FEATURES, RELATIONS): _Both}[names]
    return cls(model, index)


def _dynamic(t, axis: int) -> ms.Tensor:
    shape = list(C.shape_of(t))
    shape[axis] = None
    return ms.Tensor(shape=shape, dtype=C.FLOAT)


def export_stages(model: DVT, out_dir: Path, batch: int = 2):
    """Write ``stage{i}.mindir`` for every stage into ``out_dir``: (stage entries, versions, batch axes)."""
    spec = model.spec
    was = model.training
    model.set_train(False)
    images = C.to_tensor(np.random.default_rng(0).standard_normal(
        (batch, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32))
    entries, carry = [], {}
    try:
        for i in range(spec.num_exits):
            g = stage_graph(model, i)
            g.set_train(False)
            names = carry_names(spec, i - 1) if i > 0 else []
            examples = [ms.Tensor(shape=[None, spec.in_chans, spec.img_size, spec.img_size], dtype=C.FLOAT)]
            examples += [_dynamic(carry[n], BATCH_AXES[n]) for n in names]
            stem = f"stage{i + 1}"
            ms.export(g, *examples, file_name=str(Path(out_dir) / stem), file_format="MINDIR")
            outs = g(images, *[carry[n] for n in names])
            outs = outs if isinstance(outs, tuple) else (outs,)
            out_names = carry_names(spec, i)
            carry = dict(zip(out_names, outs[1:]))
            entries.append(stage_entry(i, f"{stem}.mindir", ["images", *(PREV + n for n in names)],
                                       ["logits", *out_names]))
    finally:
        model.set_train(was)
    return entries, {"mindspore": ms.__version__}, dict(BATCH_AXES)
