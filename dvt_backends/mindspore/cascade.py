"""The DVT cascade in MindSpore: stages of growing token grids, feature and relation reuse, early exit.

Mirrors ``dvt_backends/torch/cascade.py``. ``DVT(spec)(images)`` returns one logits tensor per exit;
``DVT.adaptive(images, thresholds)`` runs true early exit (written once: dvt_core.runtime.contract).
Runs in MindSpore's default PyNative mode; ``DVT.compiled()`` gives a graph-mode (``ms.jit``) forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple, Optional, Sequence

from dvt_core.model.macs import exit_macs
from dvt_core.runtime.contract import ModelAPI
from dvt_core.model.recipe import INIT_STD, drop_path_rates
from dvt_core.errors import InputError, check_images_shape
from dvt_core.model.specs import CascadeSpec, sinusoid_position_table

from . import compat as C
from .layers import Block, FeatureReuse, RelationReuse, TokenResize
from .tokenizers import build_tokenizer

class Reuse(NamedTuple):
    """What a stage hands to the next: its final tokens (pre-norm) and its attention logits.

    The cascade passes it on as a plain ``(features, relations)`` tuple (graph mode cannot build or read
    a NamedTuple); a Reuse, being a tuple, is accepted wherever one is read. Unlike torch's, the
    relations are channel-major, (heads x depth, B, N, N): block ``j``'s heads are one contiguous
    slice (see layers.Attention); ``RELATION_BATCH_AXIS`` names their batch axis.
    """

    features: Optional[object]  # (B, N, C)
    relations: Optional[object]  # (heads x depth, B, N, N)


FEATURE_BATCH_AXIS, RELATION_BATCH_AXIS = 0, 1


def select(images, carry, rows):
    """The ``rows`` of an image batch and of its ``(features, relations)`` carry (the images that go on)."""
    idx = C.index_tensor(rows)
    picked = tuple(None if t is None else C.gather_rows(t, idx, axis)
                   for t, axis in zip(carry, (FEATURE_BATCH_AXIS, RELATION_BATCH_AXIS)))
    return C.gather_rows(images, idx), picked


def join(parts):
    """``[(images, carry), ...]`` -> one batch: images and carries concatenated along their batch axes."""
    images = C.cat([p[0] for p in parts], 0)
    carries = [p[1] for p in parts]
    joined = tuple(None if carries[0][k] is None else C.cat([c[k] for c in carries], axis)
                   for k, axis in enumerate((FEATURE_BATCH_AXIS, RELATION_BATCH_AXIS)))
    return images, joined


class Stage(C.Cell):
    """One exit: a ViT / T2T-ViT at its own grid, reading what the previous stage left for reuse."""

    def __init__(self, spec: CascadeSpec, index: int):
        super().__init__()
        st = spec.stages[index]
        self.index = index
        self.num_heads = st.num_heads
        self.depth = st.depth
        self.embed_dim = st.embed_dim
        self.tokenizer = build_tokenizer(st, spec.in_chans, spec.img_size)
        self.cls_token = C.trunc_normal_param((1, 1, st.embed_dim), INIT_STD)
        if st.pos_embed == "sinusoid":  # fixed table, as in T2T-ViT; still part of the checkpoint
            self.pos_embed = C.array_param(sinusoid_position_table(st.num_tokens, st.embed_dim), requires_grad=False)
        else:
            self.pos_embed = C.trunc_normal_param((1, st.num_tokens, st.embed_dim), INIT_STD)
        plan = spec.reuse_plan(index)
        fr = plan.feature
        self.relation_reuse = RelationReuse(plan.relation) if plan.relation else None
        dpr = drop_path_rates(spec, index)
        self.blocks = C.CellList(
            [Block(st, fr.out_dim if fr else 0, dpr[j], FeatureReuse(fr) if fr else None, spec.gelu)
             for j in range(st.depth)])
        if fr:
            self.feature_resize = TokenResize(fr.old_grid, fr.new_grid, "zero")
        self.norm = C.layer_norm(st.embed_dim, st.ln_eps)
        self.head = C.dense(st.embed_dim, spec.num_classes)
        self.has_feature_reuse = fr is not None
        self.has_relation_reuse = self.relation_reuse is not None

    def _reused_features(self, prev):
        """Every block's reused features, resampled once for the whole stage: (depth, B, N, reuse_dim).

        Each block has its own MLP on the previous grid; one batched resize serves them all. The
        class-token row stays zero, as in the official model.
        """
        f = C.stack([blk.feature_reuse(prev) for blk in self.blocks])  # (D, B, n, r)
        return self.feature_resize(f)  # (D, B, N, r), class-token row zero

    def construct(self, images, reuse: Optional[Reuse] = None, keep_relations: bool = True):
        b = images.shape[0]
        x = self.tokenizer(images)
        cls = C.broadcast_to(self.cls_token, (b, 1, self.embed_dim))
        x = C.cat((cls, x), 1) + self.pos_embed
        feats = rels = None
        # reuse[0] / reuse[1] rather than .features / .relations: graph mode handles plain tuples only
        if reuse is not None and self.has_feature_reuse:
            feats = self._reused_features(reuse[0])
        if reuse is not None and self.has_relation_reuse:
            rels = self.relation_reuse(reuse[1])
        h = self.num_heads
        logits_per_head = []
        for j, blk in enumerate(self.blocks):
            x, logits = blk(x, None if feats is None else feats[j],
                            None if rels is None else rels[j * h:(j + 1) * h])
            if keep_relations:
                logits_per_head = logits_per_head + logits
        out = self.head(self.norm(x)[:, 0])
        relations = C.stack(logits_per_head, 0) if keep_relations else None  # (depth x heads, B, N, N)
        return out, (x, relations)


class DVT(ModelAPI, C.Cell):
    """A Dynamic Vision Transformer: ``construct`` returns the logits of every exit, in exit order."""

    def __init__(self, spec: CascadeSpec):
        super().__init__()
        self.spec = spec.validate()
        self.num_exits = spec.num_exits
        self.feature_reuse = spec.feature_reuse
        self.relation_reuse = spec.relation_reuse
        self.stages = C.CellList([Stage(spec, i) for i in range(spec.num_exits)])
        self.checkpoint_meta: dict = {}
        self.exit_macs = exit_macs(self.spec)  # per image, cumulative; the spec is frozen
        self._compiled = None

    # ---- inference ---------------------------------------------------------------------------------
    def check_images(self, images) -> None:
        if not C.is_tensor(images):
            raise InputError(f"expected a mindspore.Tensor image batch, got {type(images).__name__}")
        check_images_shape(C.shape_of(images), self.spec)

    def run_stage(self, index: int, images, reuse: Optional[Reuse] = None):
        """Logits of exit ``index`` and what the next stage reuses (None after the last).

        ``reuse`` and the returned carry are ``(features, relations)`` tuples (see :class:`Reuse`).
        """
        last = index == self.num_exits - 1
        keep = not last and self.relation_reuse
        logits, out = self.stages[index](images, reuse, keep)
        if last:
            return logits, None
        return logits, (out[0] if self.feature_reuse else None, out[1])

    def forward_exits(self, images) -> tuple:
        """Every exit's logits, without the input check (what ``compiled`` traces)."""
        outputs, reuse = [], None
        for i in range(self.num_exits):
            logits, reuse = self.run_stage(i, images, reuse)
            outputs.append(logits)
        return tuple(outputs)

    def construct(self, images) -> tuple:
        self.check_images(images)
        return self.forward_exits(images)

    def compiled(self):
        """A graph-mode (``ms.jit``) function images -> tuple of exit logits, checking its input first.

        Same arithmetic as ``construct``; compiled once per input shape. Faster on CPU than PyNative.
        """
        if self._compiled is None:
            self._compiled = C.jit(self.forward_exits)

        def run(images):
            self.check_images(images)
            return self._compiled(images)

        return run

    @contextmanager
    def inference(self):
        """Evaluation mode (dropout and stochastic depth off); restores the previous mode."""
        was_training = self.training
        self.set_train(False)
        try:
            yield
        finally:
            self.set_train(was_training)

    # ---- training ----------------------------------------------------------------------------------
    @staticmethod
    def loss(outputs: Sequence, targets, weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0):
        """The paper's objective: the sum over exits of each exit's cross entropy."""
        weights = weights or [1.0] * len(outputs)
        total = None
        for w, o in zip(weights, outputs):
            term = C.cross_entropy(o, targets, label_smoothing) * w
            total = term if total is None else total + term
        return total
