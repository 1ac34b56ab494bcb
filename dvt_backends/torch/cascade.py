"""The DVT cascade in PyTorch: stages of growing token grids, feature and relation reuse, early exit.

Mirrors ``dvt_backends/mindspore/cascade.py``. ``DVT(spec)(images)`` returns one logits tensor per exit;
``DVT.adaptive(images, thresholds)`` runs true early exit (written once: dvt_core.runtime.contract).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dvt_core.model.macs import exit_macs
from dvt_core.runtime.contract import ModelAPI
from dvt_core.model.recipe import INIT_STD, TRUNC_BOUND, drop_path_rates
from dvt_core.errors import InputError, check_images_shape
from dvt_core.model.specs import CascadeSpec, sinusoid_position_table

from .layers import Block, FeatureReuse, Linear, RelationReuse, TokenResize, _in_graph_capture
from .tokenizers import build_tokenizer

# dvt_core.runtime.contract.PRECISIONS -> the dtype every weight, buffer and activation is held in
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Reuse(NamedTuple):
    """What a stage hands to the next: its final tokens (pre-norm) and its attention logits."""

    features: Optional[torch.Tensor]  # (B, N, C)
    # per block (B, heads, N, N): kept apart so early exit slices only the images that go on before
    # anything is concatenated
    relations: Optional[tuple[torch.Tensor, ...]]


def select(images: torch.Tensor, carry: Reuse, rows) -> tuple[torch.Tensor, Reuse]:
    """The ``rows`` of an image batch and of its carry (the images that go on to the next stage)."""
    idx = torch.as_tensor(rows, device=images.device)
    features = None if carry.features is None else carry.features.index_select(0, idx)
    relations = None if carry.relations is None else tuple(r.index_select(0, idx) for r in carry.relations)
    return images.index_select(0, idx), Reuse(features, relations)


def join(parts) -> tuple[torch.Tensor, Reuse]:
    """``[(images, carry), ...]`` -> one batch: images and carries concatenated along the batch axis."""
    images = torch.cat([p[0] for p in parts])
    carries = [p[1] for p in parts]
    features = None if carries[0].features is None else torch.cat([c.features for c in carries])
    relations = (None if carries[0].relations is None
                 else tuple(torch.cat(blocks) for blocks in zip(*(c.relations for c in carries))))
    return images, Reuse(features, relations)


class Stage(nn.Module):
    """One exit: a ViT / T2T-ViT at its own grid, reading what the previous stage left for reuse."""

    def __init__(self, spec: CascadeSpec, index: int):
        super().__init__()
        st = spec.stages[index]
        self.index = index
        self.num_heads = st.num_heads
        self.tokenizer = build_tokenizer(st, spec.in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, st.embed_dim))
        if st.pos_embed == "sinusoid":  # fixed table, as in T2T-ViT; still part of the checkpoint
            self.pos_embed = nn.Parameter(torch.from_numpy(sinusoid_position_table(st.num_tokens, st.embed_dim)),
                                          requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, st.num_tokens, st.embed_dim))
        plan = spec.reuse_plan(index)
        fr = plan.feature
        self.relation_reuse = RelationReuse(plan.relation, st.depth) if plan.relation else None
        dpr = drop_path_rates(spec, index)
        self.blocks = nn.ModuleList(Block(st, fr.out_dim if fr else 0, dpr[j], FeatureReuse(fr) if fr else None,
                                          spec.gelu) for j in range(st.depth))
        if fr:
            self.feature_resize = TokenResize(fr.old_grid, fr.new_grid, "zero")
        self.norm = nn.LayerNorm(st.embed_dim, eps=st.ln_eps)
        self.head = Linear(st.embed_dim, spec.num_classes)
        self.has_feature_reuse = fr is not None

    def _reused_features(self, prev: torch.Tensor) -> torch.Tensor:
        """Every block's reused features, resampled once for the whole stage: (depth, B, N, reuse_dim).

        Each block has its own MLP on the previous grid; one batched resize serves them all. The
        class-token row stays zero, as in the official model.
        """
        f = torch.stack([blk.feature_reuse(prev) for blk in self.blocks])  # (D, B, n, r)
        return self.feature_resize(f)  # (D, B, N, r), class-token row zero

    def _factored_reuse(self, images: torch.Tensor, keep_relations: bool) -> bool:
        """Whether the reused logits stay factored (:class:`FactoredLogits`): where this stage hands its logits on
        (it computes them explicitly; the last stage runs the fused attention, which takes them resized), in CPU
        inference, where it was measured. Training and graph capture take them resized; an export swaps in its own
        rule and forms (dvt_backends.torch.export)."""
        return (keep_relations and images.device.type == "cpu" and not torch.is_grad_enabled()
                and not _in_graph_capture())

    def forward(self, images: torch.Tensor, reuse: Optional[Reuse] = None, keep_relations: bool = True):
        b = images.shape[0]
        x = self.tokenizer(images)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed
        feats = rels = None
        if reuse is not None and self.has_feature_reuse:
            feats = self._reused_features(reuse.features)
        if reuse is not None and self.relation_reuse is not None:
            rels = (self.relation_reuse.factored(reuse.relations) if self._factored_reuse(images, keep_relations)
                    else self.relation_reuse(reuse.relations))
        logits_per_block = []
        for j, blk in enumerate(self.blocks):
            x, logits = blk(x, None if feats is None else feats[j], None if rels is None else rels[j],
                            keep_relations)
            if keep_relations:
                logits_per_block.append(logits)
        out = self.head(self.norm(x)[:, 0])
        return out, Reuse(x, tuple(logits_per_block) if keep_relations else None)


class DVT(ModelAPI, nn.Module):
    """A Dynamic Vision Transformer: ``forward`` returns the logits of every exit, in exit order."""

    def __init__(self, spec: CascadeSpec):
        super().__init__()
        self.spec = spec.validate()
        self.stages = nn.ModuleList(Stage(spec, i) for i in range(spec.num_exits))
        self.checkpoint_meta: dict = {}
        self.exit_macs = exit_macs(self.spec)  # per image, cumulative; the spec is frozen
        self.precision = "fp32"
        self._batch_dynamic = False  # compile() without ``dynamic``: the batch axis marked dynamic per call
        self.reset_parameters()

    def set_precision(self, precision: str) -> "DVT":
        """Hold every weight and buffer in ``precision`` ("fp32", "bf16", "fp16"; in place; returns the model).

        The whole network then runs in that dtype, images cast on entry (``run_stage``, ``forward``,
        the runtime's ``to_tensor``): no float32 islands between the products. Chosen over
        ``torch.autocast``, which runs LayerNorm, softmax and the additions in float32 and casts the
        weights again at every call (slower here: docs/performance.md). Exit confidences are computed
        in float32 from the logits. ``set_precision("fp32")`` goes back.
        """
        if precision not in PRECISION_DTYPES:
            raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_DTYPES)}")
        self.to(PRECISION_DTYPES[precision])
        self.precision = precision
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in (what ``set_precision`` chose, or a plain ``model.to(dtype)``)."""
        return self.stages[0].cls_token.dtype

    # ---- initialisation (dvt_core.model.recipe) -------------------------------------------------------
    def reset_parameters(self) -> None:
        def trunc_normal(t):
            nn.init.trunc_normal_(t, std=INIT_STD, a=-TRUNC_BOUND, b=TRUNC_BOUND)

        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                trunc_normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for st in self.stages:
            trunc_normal(st.cls_token)
            if st.pos_embed.requires_grad:
                trunc_normal(st.pos_embed)

    # ---- inference ---------------------------------------------------------------------------------
    def check_images(self, images) -> None:
        if not torch.is_tensor(images):
            raise InputError(f"expected a torch.Tensor image batch, got {type(images).__name__}")
        check_images_shape(images.shape, self.spec)

    def run_stage(self, index: int, images: torch.Tensor, reuse: Optional[Reuse] = None):
        """Logits of exit ``index`` and what the next stage reuses (None after the last)."""
        last = index == len(self.stages) - 1
        keep = not last and self.spec.relation_reuse
        if images.dtype != self.dtype:  # float32 images into a bf16 / fp16 model
            images = images.to(self.dtype)
        if self._batch_dynamic:
            self._mark_batch_dynamic(images, reuse)
        logits, out = self.stages[index](images, reuse, keep_relations=keep)
        if last:
            return logits, None
        return logits, Reuse(out.features if self.spec.feature_reuse else None, out.relations)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.check_images(images)
        images = images.to(self.dtype)
        outputs, reuse = [], None
        for i in range(len(self.stages)):
            logits, reuse = self.run_stage(i, images, reuse)
            outputs.append(logits)
        return tuple(outputs)

    def compile(self, **kwargs) -> "DVT":
        """Compile every stage with ``torch.compile`` (opt-in; in place; returns the model).

        Unless ``dynamic`` is given, the batch axis of the images and the carried tensors is marked dynamic
        and nothing else: early exit hands each later stage a different number of images, which must not
        recompile per batch size, while a symbolic image size makes Inductor fail on the patch arithmetic
        (``ValueRangeError``). Same outputs as eager (to float rounding); the first call of each stage
        pays the compilation.
        """
        for st in self.stages:
            st.compile(**kwargs)
        self._batch_dynamic = "dynamic" not in kwargs
        return self

    def _mark_batch_dynamic(self, images: torch.Tensor, reuse: Optional[Reuse]) -> None:
        """Tells the compiler that the batch axis, and only it, varies (the image size is the spec's)."""
        from torch import _dynamo

        carried = () if reuse is None else (reuse.features,) + tuple(reuse.relations or ())
        for t in (images,) + carried:
            if t is not None:
                _dynamo.maybe_mark_dynamic(t, 0)

    @contextmanager
    def inference(self):
        """Evaluation mode (dropout and stochastic depth off) without gradients; restores each module's mode.

        Only the modules in training mode are switched: ``eval()`` and ``train()`` walk all the model's
        modules (about 0.7 ms each for the shipped model), which at batch 1 cost more than a small stage.
        """
        training = [m for m in self._all_modules() if m.training]
        for m in training:
            m.training = False
        try:
            with torch.no_grad():
                yield
        finally:
            for m in training:
                m.training = True

    def _all_modules(self) -> tuple:
        """Every module of the model, listed once (a cascade's modules are fixed by its spec)."""
        listed = self.__dict__.get("_module_list")
        if listed is None or listed[0] is not self:
            listed = self.__dict__["_module_list"] = tuple(self.modules())
        return listed

    # ---- training ----------------------------------------------------------------------------------
    @staticmethod
    def loss(outputs: Sequence[torch.Tensor], targets: torch.Tensor, weights: Optional[Sequence[float]] = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """The paper's objective: the sum over exits of each exit's cross entropy."""
        weights = weights or [1.0] * len(outputs)
        return sum(w * F.cross_entropy(o, targets, label_smoothing=label_smoothing)
                   for w, o in zip(weights, outputs))
