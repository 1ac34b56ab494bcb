"""Architecture specs: plain dataclasses that hold every number of a DVT cascade.

A backend turns a :class:`CascadeSpec` into tensors and never invents a constant of its own: the
token grids, tokenizer geometry, LayerNorm epsilons, GELU flavour and reuse widths all live here.
Specs round-trip through plain dicts and YAML.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from dvt_core.errors import CheckpointError, DVTError, SpecError
from dvt_core.model.limits import MAX_EXITS, check_spec_limits
from dvt_core.schema import check_fields, want_list

FAMILIES = ("t2t", "vit")
T2T_TOKEN_TYPES = ("performer", "transformer")
POS_EMBEDS = ("sinusoid", "learned")
#: GELU flavours: "exact" is x * Phi(x) (erf; torch's default), "tanh" the tanh approximation
#: (MindSpore's nn.GELU default, used throughout the authors' MindSpore code).
GELUS = ("exact", "tanh")
#: What the feature-reuse MLP does with its LayerNorm: "apply" it (the PyTorch release), or "discard"
#: its output (the MindSpore release computes it and then feeds the raw tokens to fc1); either way its
#: parameters exist, load and round-trip.
FEATURE_REUSE_NORMS = ("apply", "discard")


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution / unfold along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class T2TSpec:
    """Tokens-to-token module of T2T-ViT: three soft splits (unfold) with two token transformers between.

    ``kernels/strides/paddings`` are those of the three unfolds. The first one fixes the token grid;
    the next two halve it. The Performer variant uses random features (``kernel_ratio`` of the token
    dim); the Transformer variant one-head softmax attention whose scale is ``dim ** -0.5`` of its
    *input* width (as the official code computes it).
    """

    kernels: tuple[int, int, int] = (7, 3, 3)
    strides: tuple[int, int, int] = (4, 2, 2)
    paddings: tuple[int, int, int] = (2, 1, 1)
    token_dim: int = 64
    token_type: str = "performer"
    kernel_ratio: float = 0.5
    performer_eps: float = 1e-8
    dropout: float = 0.1  # the official Performer keeps 0.1 dropout in training
    ln_eps: float = 1e-5  # the token transformers' LayerNorms (the official code uses nn.LayerNorm's default)

    def grid(self, img_size: int) -> int:
        n = img_size
        for k, s, p in zip(self.kernels, self.strides, self.paddings):
            n = conv_out(n, k, s, p)
        return n

    def split_grids(self, img_size: int) -> tuple[int, int, int]:
        """Grid after each of the three soft splits."""
        out, n = [], img_size
        for k, s, p in zip(self.kernels, self.strides, self.paddings):
            n = conv_out(n, k, s, p)
            out.append(n)
        return tuple(out)

    @property
    def performer_features(self) -> int:
        return int(self.token_dim * self.kernel_ratio)


@dataclass(frozen=True)
class StageSpec:
    """One exit of the cascade: a plain ViT / T2T-ViT at its own token grid."""

    family: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    grid: int
    qkv_bias: bool = False
    ln_eps: float = 1e-5
    pos_embed: str = "sinusoid"
    # ViT patch embedding (a convolution); unused for T2T.
    patch_kernel: int = 16
    patch_stride: int = 16
    patch_padding: int = 0
    # T2T tokens-to-token module; unused for ViT.
    t2t: Optional[T2TSpec] = None

    @property
    def num_tokens(self) -> int:
        """Tokens including the class token."""
        return self.grid * self.grid + 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def relation_channels(self) -> int:
        """Attention-logit maps of the whole stage: heads x depth (the relation-reuse channels)."""
        return self.num_heads * self.depth

    def tokenizer_grid(self, img_size: int) -> int:
        if self.family == "t2t":
            return self.t2t.grid(img_size)
        return conv_out(img_size, self.patch_kernel, self.patch_stride, self.patch_padding)


@dataclass(frozen=True)
class FeatureReusePlan:
    """Per-block MLP over the previous stage's final tokens: LayerNorm(in) -> in->hidden -> GELU -> out.

    ``apply_norm`` False keeps the LayerNorm's parameters but feeds the raw tokens to the first layer.
    """

    in_dim: int
    hidden: int
    out_dim: int
    ln_eps: float
    old_grid: int
    new_grid: int
    gelu: str = "exact"
    apply_norm: bool = True


@dataclass(frozen=True)
class RelationReusePlan:
    """1x1-conv MLP over the previous stage's attention logits (in -> hidden -> out channels), then resize."""

    in_channels: int
    hidden_channels: int
    out_channels: int
    old_grid: int
    new_grid: int
    gelu: str = "exact"


@dataclass(frozen=True)
class ReusePlan:
    """What stage ``index`` reuses from the one before it; None where it reuses nothing."""

    feature: Optional[FeatureReusePlan]
    relation: Optional[RelationReusePlan]


@dataclass(frozen=True)
class CascadeSpec:
    """A DVT: stages in exit order, plus how later stages reuse earlier ones."""

    name: str
    stages: tuple[StageSpec, ...]
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    feature_reuse: bool = True
    relation_reuse: bool = True
    feature_reuse_dim: int = 48  # width of the reused features concatenated into each MLP (paper: 48)
    feature_reuse_hidden: int = 128  # hidden width of the per-block reuse MLP
    relation_reuse_expand: int = 3  # hidden channels of the relation-mixing MLP = expand x heads x depth
    gelu: str = "exact"  # GELUS: of the block MLPs and both reuse MLPs ("tanh": the MindSpore release)
    feature_reuse_norm: str = "apply"  # FEATURE_REUSE_NORMS ("discard": the MindSpore release)
    drop_path_rate: float = 0.0  # stochastic depth while training (linearly increasing over blocks)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(s.grid for s in self.stages)

    def uses_feature_reuse(self, index: int) -> bool:
        return self.feature_reuse and index > 0

    def uses_relation_reuse(self, index: int) -> bool:
        return self.relation_reuse and index > 0

    def reuse_plan(self, index: int) -> ReusePlan:
        """Every width and grid the reuse modules of stage ``index`` are built with."""
        st = self.stages[index]
        prev = self.stages[index - 1] if index > 0 else None
        feature = relation = None
        if self.uses_feature_reuse(index):
            feature = FeatureReusePlan(prev.embed_dim, self.feature_reuse_hidden, self.feature_reuse_dim, st.ln_eps,
                                       prev.grid, st.grid, self.gelu, self.feature_reuse_norm == "apply")
        if self.uses_relation_reuse(index):
            relation = RelationReusePlan(prev.relation_channels, st.relation_channels * self.relation_reuse_expand,
                                         st.relation_channels, prev.grid, st.grid, self.gelu)
        return ReusePlan(feature, relation)

    def validate(self) -> "CascadeSpec":
        check_spec_limits(self)  # names, ranges and sizes first: before any derived number is computed
        if not self.stages:
            raise SpecError(f"{self.name}: a cascade needs at least one stage")
        if self.num_classes < 1:
            raise SpecError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if self.in_chans < 1:
            raise SpecError(f"{self.name}: in_chans must be >= 1, got {self.in_chans}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise SpecError(
                f"{self.name}: mean/std need one value per input channel ({self.in_chans}), "
                f"got {len(self.mean)} and {len(self.std)}")
        if self.gelu not in GELUS:
            raise SpecError(f"{self.name}: gelu must be one of {GELUS}, got {self.gelu!r}")
        if self.feature_reuse_norm not in FEATURE_REUSE_NORMS:
            raise SpecError(f"{self.name}: feature_reuse_norm must be one of {FEATURE_REUSE_NORMS}, "
                            f"got {self.feature_reuse_norm!r}")
        for i, st in enumerate(self.stages):
            where = f"{self.name} stage {i}"
            if st.family not in FAMILIES:
                raise SpecError(f"{where}: family must be one of {FAMILIES}, got {st.family!r}")
            if st.embed_dim < 1 or st.depth < 1 or st.num_heads < 1:
                raise SpecError(f"{where}: embed_dim, depth and num_heads must be positive")
            if st.embed_dim % st.num_heads:
                raise SpecError(f"{where}: embed_dim {st.embed_dim} is not divisible by num_heads {st.num_heads}")
            if st.pos_embed not in POS_EMBEDS:
                raise SpecError(f"{where}: pos_embed must be one of {POS_EMBEDS}, got {st.pos_embed!r}")
            if st.family == "t2t":
                if st.t2t is None:
                    raise SpecError(f"{where}: a t2t stage needs its tokens-to-token spec")
                if not st.t2t.ln_eps > 0:
                    raise SpecError(f"{where}: t2t ln_eps must be positive, got {st.t2t.ln_eps}")
                if st.t2t.token_type not in T2T_TOKEN_TYPES:
                    raise SpecError(f"{where}: t2t token_type must be one of {T2T_TOKEN_TYPES}")
            got = st.tokenizer_grid(self.img_size)
            if got != st.grid:
                raise SpecError(
                    f"{where}: its tokenizer turns a {self.img_size}x{self.img_size} image into a "
                    f"{got}x{got} grid, not the {st.grid}x{st.grid} the spec names")
        for i in range(1, len(self.stages)):
            prev, cur = self.stages[i - 1], self.stages[i]
            if cur.grid < prev.grid:
                raise SpecError(
                    f"{self.name}: token grids must not shrink from one exit to the next, got {self.grids}")
            if self.relation_reuse and prev.relation_channels != cur.relation_channels:
                raise SpecError(
                    f"{self.name}: relation reuse maps stage {i - 1}'s heads x depth "
                    f"({prev.relation_channels}) onto stage {i}'s ({cur.relation_channels}); they must be "
                    "equal. Pass relation_reuse=False or give both stages the same heads and depth")
        return self

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CascadeSpec":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown cascade spec fields: {sorted(unknown)}")
        stages = []
        for s in d.pop("stages"):
            s = dict(s)
            sknown = {f.name for f in dataclasses.fields(StageSpec)}
            if set(s) - sknown:
                raise SpecError(f"unknown stage spec fields: {sorted(set(s) - sknown)}")
            t2t = s.pop("t2t", None)
            if t2t is not None:
                t2t = T2TSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in t2t.items()})
            stages.append(StageSpec(t2t=t2t, **s))
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(stages=tuple(stages), **d).validate()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "CascadeSpec":
        import yaml

        return cls.from_dict(yaml.safe_load(text))


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---- deriving tokenizers for a requested grid ---------------------------------------------------

def vit_patch_for_grid(img_size: int, grid: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a patch embedding that cuts ``img_size`` into ``grid`` patches.

    kernel = stride = ceil(img / grid), the overhang split as padding: for 224 this gives the official
    DVT DeiT geometry (32/0 for 7x7, 23/3 for 10x10, 16/0 for 14x14).
    """
    if grid < 1 or grid > img_size:
        raise SpecError(f"a {grid}x{grid} token grid is impossible for a {img_size}-pixel image")
    k = math.ceil(img_size / grid)
    pad = math.ceil((k * grid - img_size) / 2)
    if conv_out(img_size, k, k, pad) != grid:
        raise SpecError(f"no patch embedding cuts a {img_size}-pixel image into a {grid}x{grid} grid")
    return k, k, pad


def t2t_for_grid(img_size: int, grid: int, base: T2TSpec) -> T2TSpec:
    """A tokens-to-token spec whose first soft split gives ``grid`` after the two halving splits.

    The official geometry has kernel ~ 7/4 x stride and padding ~ half the overlap (14/8/3, 11/6/5,
    7/4/2 for 7x7, 10x10, 14x14 at 224 px); this searches strides near img / (4 grid) with that rule.
    Registry entries list the official numbers literally; this serves overrides.
    """
    if grid < 1:
        raise SpecError(f"token grid must be positive, got {grid}")
    target = img_size / (4 * grid)
    candidates = sorted(range(1, max(2, img_size // grid) + 1), key=lambda s: abs(s - target))
    for s in candidates:
        k = max(s, math.ceil(7 * s / 4))
        for p in sorted(range(0, k), key=lambda p: abs(p - math.ceil((k - s) / 2))):
            trial = dataclasses.replace(base, kernels=(k,) + tuple(base.kernels[1:]),
                                        strides=(s,) + tuple(base.strides[1:]),
                                        paddings=(p,) + tuple(base.paddings[1:]))
            if conv_out(img_size, k, s, p) >= 1 and trial.grid(img_size) == grid:
                return trial
    raise SpecError(f"no tokens-to-token geometry turns a {img_size}-pixel image into a {grid}x{grid} grid")


def stage_for_grid(stage: StageSpec, img_size: int, grid: int) -> StageSpec:
    """The same stage at another grid / image size (tokenizer re-derived only when needed)."""
    if stage.tokenizer_grid(img_size) == grid and stage.grid == grid:
        return stage
    if stage.family == "vit":
        k, s, p = vit_patch_for_grid(img_size, grid)
        return dataclasses.replace(stage, grid=grid, patch_kernel=k, patch_stride=s, patch_padding=p)
    return dataclasses.replace(stage, grid=grid, t2t=t2t_for_grid(img_size, grid, stage.t2t))


STAGE_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "ln_eps", "pos_embed")
CASCADE_OVERRIDES = ("num_classes", "in_chans", "mean", "std", "feature_reuse", "relation_reuse",
                     "feature_reuse_dim", "feature_reuse_hidden", "relation_reuse_expand", "name",
                     "drop_path_rate", "gelu", "feature_reuse_norm")


# What each override accepts: (kind, lower bound, bound included, choices). Kinds: "int", "float",
# "bool", "str", "ints" / "floats" (a tuple). Fields not listed take the kind of their default value.
_OVERRIDE_RULES: dict[str, tuple] = {
    "num_classes": ("int", 1, True, None), "in_chans": ("int", 1, True, None), "img_size": ("int", 1, True, None),
    "embed_dim": ("int", 1, True, None), "depth": ("int", 1, True, None), "num_heads": ("int", 1, True, None),
    "token_dim": ("int", 1, True, None), "feature_reuse_dim": ("int", 1, True, None),
    "feature_reuse_hidden": ("int", 1, True, None), "relation_reuse_expand": ("int", 1, True, None),
    "mlp_ratio": ("float", 0.0, False, None), "ln_eps": ("float", 0.0, False, None),
    "drop_path_rate": ("float", 0.0, True, None),
    "qkv_bias": ("bool", None, None, None), "feature_reuse": ("bool", None, None, None),
    "relation_reuse": ("bool", None, None, None),
    "name": ("str", None, None, None), "pos_embed": ("str", None, None, POS_EMBEDS),
    "gelu": ("str", None, None, GELUS), "feature_reuse_norm": ("str", None, None, FEATURE_REUSE_NORMS),
    "grids": ("ints", 1, True, None), "mean": ("floats", None, None, None), "std": ("floats", 0.0, False, None),
}
_UPPER = {"drop_path_rate": 1.0}  # exclusive upper bounds


def _default_kind(key: str) -> tuple:
    """The rule of a field not in the table, from its default value's type."""
    for cls in (CascadeSpec, StageSpec, T2TSpec):
        for f in dataclasses.fields(cls):
            if f.name == key and f.default is not dataclasses.MISSING:
                d = f.default
                kind = ("bool" if isinstance(d, bool) else "int" if isinstance(d, int) else
                        "float" if isinstance(d, float) else "str" if isinstance(d, str) else
                        "floats" if isinstance(d, tuple) else None)
                if kind:
                    return kind, None, None, None
    return "any", None, None, None


def _allowed(kind: str, low, inclusive, choices, key: str) -> str:
    if choices:
        return f"one of {', '.join(choices)}"
    bound = "" if low is None else f" {'>=' if inclusive else '>'} {low:g}"
    upper = f" and < {_UPPER[key]:g}" if key in _UPPER else ""
    return {"int": f"{bound.strip()} (a whole number)" if bound else "a whole number",
            "float": f"{bound.strip()}{upper} (a number)" if bound else "a number", "bool": "true or false",
            "str": "a non-empty string",
            "ints": f"whole numbers{bound}, comma-separated (e.g. {key}=2,4,7)",
            "floats": f"numbers{bound}, one per input channel, comma-separated (e.g. {key}=0.5 or {key}=0.5,0.5,0.5)",
            }.get(kind, "a valid value")


def _scalar(kind: str, value):
    """``value`` as ``kind`` ("int", "float", "bool", "str"), or raise ValueError."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError
    if kind == "str":
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise ValueError
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, str):
        value = float(value.strip())  # ValueError for text that is not a number
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    if kind == "int":
        if not number.is_integer():
            raise ValueError
        return int(number)
    return number


def check_override(spec: CascadeSpec, key: str, value):
    """``value`` of override ``key`` converted to the field's type and range-checked; a SpecError naming
    the field, the value and what it accepts otherwise. Tuple fields take a list, a tuple, a scalar, or
    text such as ``"2,4,7"``, ``"[2,4,7]"`` or ``"(2, 4, 7)"``."""
    kind, low, inclusive, choices = _OVERRIDE_RULES.get(key) or _default_kind(key)
    if kind == "any":
        return value

    def fail():
        return SpecError(f"{spec.name}: {key} must be {_allowed(kind, low, inclusive, choices, key)}, "
                         f"got {value!r}")

    try:
        if kind in ("ints", "floats"):
            items = value
            if isinstance(items, str):
                text = items.strip().strip("()[]").strip()
                items = [v for v in (p.strip() for p in text.split(",")) if v != ""] if text else []
            elif not isinstance(items, (list, tuple)):
                items = [items]
            out = tuple(_scalar(kind[:-1] if kind == "ints" else "float", v) for v in items)
            if not out:
                raise ValueError
        else:
            out = _scalar(kind, value)
    except (TypeError, ValueError):
        raise fail() from None
    for v in (out if isinstance(out, tuple) else (out,)):
        if choices and v not in choices:
            raise fail()
        if low is not None and not isinstance(v, (bool, str)) and (v < low or (v == low and not inclusive)):
            raise fail()
        if key in _UPPER and v >= _UPPER[key]:
            raise fail()
    return out


def apply_overrides(spec: CascadeSpec, **overrides) -> CascadeSpec:
    """A new spec with ``overrides`` applied, validated.

    Cascade-wide fields (``num_classes``, ``feature_reuse``, ...) replace the field; stage fields
    (``depth``, ``embed_dim``, ...) apply to every stage; ``img_size`` and ``grids`` (one per exit)
    re-derive each tokenizer. ``token_dim`` sets the T2T token width. ``in_chans`` without
    ``mean``/``std`` repeats the first channel's statistics.
    """
    if not overrides:
        return spec.validate()
    allowed = set(STAGE_OVERRIDES) | set(CASCADE_OVERRIDES) | {"img_size", "grids", "token_dim"}
    unknown = set(overrides) - allowed
    if unknown:
        raise SpecError(f"unknown override(s) {sorted(unknown)} for {spec.name}; known: {sorted(allowed)}")
    ov = {k: check_override(spec, k, v) for k, v in overrides.items()}
    stage_kw = {k: ov.pop(k) for k in STAGE_OVERRIDES if k in ov}
    img_size = int(ov.pop("img_size", spec.img_size))
    grids = ov.pop("grids", None)
    token_dim = ov.pop("token_dim", None)
    if grids is None:
        grids = spec.grids
    grids = tuple(int(g) for g in grids)
    if len(grids) != spec.num_exits:
        raise SpecError(f"{spec.name} has {spec.num_exits} exits; grids={grids} names {len(grids)}")
    if "in_chans" in ov and ov["in_chans"] != spec.in_chans:
        c = int(ov["in_chans"])
        ov.setdefault("mean", (spec.mean[0],) * c)
        ov.setdefault("std", (spec.std[0],) * c)
    for key in ("mean", "std"):
        if key in ov:
            ov[key] = tuple(float(v) for v in ov[key])
    stages = []
    for st, g in zip(spec.stages, grids):
        if stage_kw:
            st = dataclasses.replace(st, **stage_kw)
        if token_dim is not None and st.t2t is not None:
            st = dataclasses.replace(st, t2t=dataclasses.replace(st.t2t, token_dim=int(token_dim)))
        stages.append(stage_for_grid(st, img_size, g))
    return dataclasses.replace(spec, stages=tuple(stages), img_size=img_size, **ov).validate()


def sinusoid_position_table(n_position: int, dim: int):
    """(1, n_position, dim) float32 sinusoid position table (the T2T-ViT initialisation of ``pos_embed``)."""
    import numpy as np

    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table[None].astype(np.float32)


def check_spec_dict(d, where: str = "spec", error=CheckpointError):
    """A :class:`~dvt_core.model.specs.CascadeSpec` from an untrusted dict: every field's type checked and
    named, then the spec's own validation and size limits (:func:`~dvt_core.model.limits.check_spec_limits`)."""
    def stage(s, w):
        check_fields(StageSpec, s, w, error, {"t2t": lambda t, tw: None if t is None else
                                               check_fields(T2TSpec, t, tw, error, {})})

    def stages(v, w):
        for i, s in enumerate(want_list(v, w, max_len=MAX_EXITS, error=error)):
            stage(s, f"{w}[{i}]")

    check_fields(CascadeSpec, d, where, error, {"stages": stages})
    try:
        return CascadeSpec.from_dict(d)
    except DVTError as exc:
        raise error(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        raise error(f"{where} does not describe a model ({type(exc).__name__}: {str(exc)[:120]})") from None
