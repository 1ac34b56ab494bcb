"""Every stage of a DVT from one static ViT (``dvt adapt``), framework-free.

The static checkpoint may be this project's (a single-exit ``static_*`` model: canonical names
``stages.0.*``), timm's ViT / DeiT layout (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.*``, ``norm.*``, ``head.*``) or the T2T-ViT release's (the same with ``tokens_to_token.*``),
recognised from the names, in a torch file (``.pth``, ``.pth.tar``; ``model`` / ``state_dict``
wrappers unwrapped, a ``module.`` prefix dropped), a ``.safetensors`` or a MindSpore ``.ckpt``.
A DeiT distillation token (``dist_token``, ``head_dist.*`` and its row of ``pos_embed``) is dropped and
listed.

Each stage then gets the static model through the ``--init`` transfer
(:func:`dvt_core.checkpoint.transfer.transfer_state`: blocks, norms and head copied, the patch kernel
resized, the position embedding resampled or recomputed), and the reuse modules start neutral:

* relation reuse: its last 1x1 convolution (``relation_reuse.reduce``) zero, so it adds zero logits;
* feature reuse: each block's ``feature_reuse.fc2`` zero, so it reuses zero features; the MLP the
  features are concatenated into takes the static ``mlp.fc1`` on the token channels and zero columns
  on the reused ones, its ``norm2`` the static affine on the token channels and 1 / 0 on the rest.

Without feature reuse every stage is therefore the static model at its own grid, the last one (at the
static model's grid) exactly. With it the widened ``norm2`` averages over the extra zeros, so a stage
starts near the static model, not equal to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dvt_core.checkpoint.naming import MODULE_PREFIX, is_official_layout, stage_key_to_canonical
from dvt_core.checkpoint.transfer import transfer_state
from dvt_core.errors import CheckpointError

WRAPPERS = ("model", "state_dict")  # what training scripts wrap a state dict in (DeiT: model, timm: state_dict)
DISTILLATION = ("dist_token", "head_dist.weight", "head_dist.bias")
REUSE_MODULE = re.compile(r"\.(feature_reuse|relation_reuse)\.")
NEUTRAL = re.compile(r"(\.relation_reuse\.reduce\.|\.feature_reuse\.fc2\.)(weight|bias)$")
WIDENED = re.compile(r"^stages\.\d+\.blocks\.\d+\.(norm2\.weight|norm2\.bias|mlp\.fc1\.weight)$")
# the architecture fields a static model's spec must share with every stage (its metadata says them)
SHARED_FIELDS = ("family", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "ln_eps")


@dataclass
class StaticModel:
    """A static ViT's tensors under canonical single-stage names (``stages.0.*``), and what was done to read them."""

    state: dict
    layout: str  # "dvt" (this project), "timm" or "t2t-vit"
    meta: dict = field(default_factory=dict)
    unwrapped: list = field(default_factory=list)  # wrapper keys taken off, outermost first
    dropped: list = field(default_factory=list)  # "name (why)"


@dataclass
class AdaptReport:
    """What :func:`adapt_state` did to every tensor of the cascade (names grouped over blocks)."""

    source: str
    layout: str
    copied: list = field(default_factory=list)
    resampled: list = field(default_factory=list)
    reinitialised: list = field(default_factory=list)
    widened: list = field(default_factory=list)
    neutral: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    unwrapped: list = field(default_factory=list)
    init_difference: Optional[dict] = None  # the last exit against the static model, once measured

    def to_meta(self) -> dict:
        return {"file": self.source, "layout": self.layout, "copied": len(self.copied),
                **{k: grouped(getattr(self, k)) for k in ("resampled", "reinitialised", "widened", "neutral",
                                                          "fresh", "dropped")},
                "unwrapped": list(self.unwrapped), "init_difference": self.init_difference}

    def lines(self) -> list[str]:
        out = [f"adapt {self.source} ({self.layout} layout"
               + (f", unwrapped from {' > '.join(self.unwrapped)}" if self.unwrapped else "")
               + f"): {len(self.copied)} tensors copied as they are"]
        words = {"resampled": "resized / resampled", "reinitialised": "re-initialised",
                 "widened": "widened for the reused features", "neutral": "zero (reuse starts neutral)",
                 "fresh": "freshly initialised", "dropped": "dropped"}
        for key, word in words.items():
            out += [f"  {word}: {name}" for name in grouped(getattr(self, key))]
        return out


def grouped(names) -> list[str]:
    """Names with block and stage indices folded (``stages.1.blocks.*.norm2.weight``), in first-seen order."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(re.sub(r"\bblocks\.\d+\.", "blocks.*.", n), None)
    return list(seen)


# ---- reading -------------------------------------------------------------------------------------------

def unwrap(obj, path) -> tuple[dict, list]:
    """The state dict inside ``model`` / ``state_dict`` wrappers (nested ones too), and the keys taken off."""
    taken = []
    while isinstance(obj, dict) and len(taken) < 4:
        key = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
        taken.append(key)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")
    return obj, taken


def read_static(path) -> StaticModel:
    """A static ViT from ``path`` in any layout and format the module docstring lists."""
    from dvt_core.checkpoint import files

    if files.sniff_format(path) != "torch":
        ckpt = files.read_checkpoint(path)
        return static_from_state(ckpt.state, path, meta=ckpt.meta)
    obj = files.torch_load(path)
    if isinstance(obj, dict) and files.META_ENTRY in obj:  # this project's own torch file, with its metadata
        ckpt = files.read_checkpoint(path)
        return static_from_state(ckpt.state, path, meta=ckpt.meta)
    inner, taken = unwrap(obj, path)
    static = static_from_state(files.to_numpy_state(inner, path), path)
    static.unwrapped = taken
    return static


def static_from_state(state: dict, path, meta: Optional[dict] = None) -> StaticModel:
    """``state`` (any recognised layout) under canonical single-stage names."""
    state = {MODULE_PREFIX.sub("", k): v for k, v in state.items()}
    if is_official_layout(state):
        raise CheckpointError(f"{path} is a DVT of the authors' release, not a static model; adapt starts from "
                              "one static ViT (load a DVT with build(..., weights=FILE))")
    if state and all(k.startswith("stages.") for k in state):
        stages = {k.split(".")[1] for k in state}
        if stages != {"0"}:
            raise CheckpointError(f"{path} is a cascade of {len(stages)} stages, not a static model; adapt starts "
                                  "from one static ViT (a single-exit model)")
        return StaticModel(dict(state), "dvt", dict(meta or {}))
    if "cls_token" not in state or not any(k.startswith("blocks.0.") for k in state):
        first = ", ".join(repr(k[:60]) for k in list(state)[:4])
        raise CheckpointError(f"{path} is not a static ViT this project recognises (this project's static "
                              f"models, timm's ViT / DeiT or T2T-ViT names); its first names are {first}")
    layout = "t2t-vit" if any(k.startswith("tokens_to_token.") for k in state) else "timm"
    state, dropped = drop_distillation(state)
    out = {f"stages.0.{stage_key_to_canonical(k)}": v for k, v in state.items()}
    return StaticModel(out, layout, dict(meta or {}), dropped=dropped)


def drop_distillation(state: dict) -> tuple[dict, list]:
    """``state`` without a DeiT distillation token, its head and its ``pos_embed`` row, and what went."""
    if "dist_token" not in state:
        return state, []
    out = {k: v for k, v in state.items() if k not in DISTILLATION}
    dropped = [f"{k} (DeiT's distillation token)" for k in DISTILLATION if k in state]
    pos = out.get("pos_embed")
    if pos is not None and np.ndim(pos) == 3 and pos.shape[1] >= 2:
        out["pos_embed"] = np.concatenate([pos[:, :1], pos[:, 2:]], axis=1)
        dropped.append(f"pos_embed row 1 of {pos.shape[1]} (the distillation token's position)")
    return out, dropped


# ---- the cascade's state ---------------------------------------------------------------------------------

FIELD_TENSORS = {"family": "the tokenizer (tokenizer.*)", "embed_dim": "every tensor", "depth": "blocks.N.*",
                 "num_heads": "blocks.*.attn.qkv.* (split into heads)", "mlp_ratio": "blocks.*.mlp.fc1.*",
                 "qkv_bias": "blocks.*.attn.qkv.bias", "ln_eps": "the LayerNorms (blocks.*.norm1, norm2, norm)"}


def check_architecture(static: StaticModel, spec, source: str) -> None:
    """Refuse a static model whose recorded spec (this project's files carry one) differs from a stage of
    ``spec`` in what no tensor shape shows (heads, LayerNorm epsilon, GELU) or in what it does; timm and
    T2T-ViT files record no spec, their shapes are all that is checked."""
    recorded = static.meta.get("spec")
    stages = recorded.get("stages") if isinstance(recorded, dict) else None
    if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
        return
    have, problems = stages[0], []
    for name, tensors in FIELD_TENSORS.items():
        differ = [i + 1 for i, st in enumerate(spec.stages) if name in have and have[name] != getattr(st, name)]
        if differ:
            want = getattr(spec.stages[differ[0] - 1], name)
            where = ("stages " if len(differ) > 1 else "stage ") + ", ".join(map(str, differ))
            problems.append(f"{name} {have[name]!r} vs {want!r} ({where}: {tensors})")
    if recorded.get("gelu", spec.gelu) != spec.gelu:
        problems.append(f"gelu {recorded['gelu']!r} vs {spec.gelu!r} (blocks.*.mlp)")
    if problems:
        raise CheckpointError(f"{source} does not fit {spec.name}: the static model differs in " + "; ".join(problems))


def widen(source: dict, fresh: dict, report: AdaptReport) -> dict:
    """``source`` with each block's ``norm2`` and ``mlp.fc1.weight`` widened to the reused channels of
    ``fresh``: the static values on the token channels, then 1 (``norm2.weight``) or 0 on the new ones."""
    out = dict(source)
    for name, value in source.items():
        want = np.shape(fresh.get(name, ()))
        have = np.shape(value)
        if not WIDENED.match(name) or len(want) != len(have) or want[:-1] != have[:-1] or want[-1] <= have[-1]:
            continue
        extra = np.ones if name.endswith("norm2.weight") else np.zeros
        pad = extra(have[:-1] + (want[-1] - have[-1],), dtype=np.asarray(value).dtype)
        out[name] = np.concatenate([np.asarray(value), pad], axis=-1)
        report.widened.append(f"{name} {tuple(have)} -> {tuple(want)}")
    return out


def fresh_split(source: dict, fresh: dict, stage, report: AdaptReport) -> dict:
    """A T2T-ViT stage at another grid splits the image with another kernel, so its first tokens-to-token
    layer reads other widths: those tensors keep ``fresh``'s initialisation (listed); the rest is copied."""
    if stage.family != "t2t":
        return source
    out = dict(source)
    for name, value in source.items():
        if ".tokenizer.attention1." in name and name in fresh and np.shape(value) != np.shape(fresh[name]):
            out[name] = fresh[name]
            report.fresh.append(f"{name} (the tokens-to-token soft split differs at {stage.grid}x{stage.grid})")
    return out


def adapt_state(static: StaticModel, target: dict, spec, source: str) -> tuple[dict, AdaptReport]:
    """The state of ``spec`` (``target``: a fresh model's, canonical names) with every stage taken from
    ``static`` and the reuse modules neutral (module docstring). CheckpointError, naming the tensors,
    when the static model's widths, depth or (where recorded) heads differ from a stage's."""
    report = AdaptReport(source, static.layout, dropped=list(static.dropped), unwrapped=list(static.unwrapped))
    check_architecture(static, spec, source)
    out = {}
    for i, st in enumerate(spec.stages):
        prefix = f"stages.{i}."
        fresh = {k: v for k, v in target.items() if k.startswith(prefix) and not REUSE_MODULE.search(k)}
        stage_source = widen({prefix + k[len("stages.0."):]: v for k, v in static.state.items()
                              if k.startswith("stages.0.")}, fresh, report)
        stage_source = fresh_split(stage_source, fresh, st, report)
        state, moved = transfer_state(stage_source, fresh, spec,
                                      source_name=f"{source} (as stage {i + 1}, {st.grid}x{st.grid} tokens)")
        out.update(state)
        done = {w.split()[0] for w in report.widened + report.fresh}
        report.copied += [n for n in moved.loaded if n not in done]
        report.resampled += moved.resampled
        report.reinitialised += moved.reinitialised
    for name, value in target.items():
        if not REUSE_MODULE.search(name):
            continue
        if NEUTRAL.search(name):
            out[name] = np.zeros_like(np.asarray(value))
            report.neutral.append(name)
        else:
            out[name] = value
            report.fresh.append(name)
    return {k: out[k] for k in target}, report


def stage_as_static(state: dict, spec, index: int) -> dict:
    """Stage ``index`` of an adapted ``state`` as the weights of ``static_spec(spec, index)``: its reuse
    modules left out, its widened tensors cut back to the token channels (the static model again)."""
    prefix, width = f"stages.{index}.", spec.stages[index].embed_dim
    out = {}
    for name, value in state.items():
        if name.startswith(prefix) and not REUSE_MODULE.search(name):
            out["stages.0." + name[len(prefix):]] = np.asarray(value)[..., :width] if WIDENED.match(name) else value
    return out


def stage_names(names, index: int) -> list[str]:
    """Every tensor of stage ``index`` among ``names``, copied or new (its reuse modules too): what
    ``--freeze-epochs`` holds still, so that while it is frozen its exit is exactly the adapted start."""
    prefix = f"stages.{index}."
    return [n for n in names if n.startswith(prefix)]
