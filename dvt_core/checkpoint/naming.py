"""Parameter names: the one place that maps between the official release, our canonical names and MindSpore.

Canonical names are the PyTorch backend's ``state_dict`` keys (``stages.0.blocks.3.attn.qkv.weight``);
safetensors files store them as they are. Two explicit tables translate:

* the official DVT PyTorch release (``less_less_token.``/``less_token.``/``normal_token.``, its
  ``feature_resuse_mlp`` spelling, ``nn.Sequential`` indices) -> canonical;
* canonical -> MindSpore (``nn.LayerNorm`` names its parameters ``gamma`` and ``beta``), and back;
* the authors' MindSpore release (``less_token.``/``normal_token.``, ``layers.``, ``attn.to_q``, ...)
  <-> canonical, both ways, with the two reshapes that layout needs (``MS_OFFICIAL_NAMES``).

No name is guessed: a key that no rule covers passes unchanged and is then reported as unexpected by
the loader.
"""
from __future__ import annotations

import re
from dvt_core.errors import CheckpointError

# Stage prefixes of the official release, by number of exits.
OFFICIAL_STAGE_PREFIXES = {
    3: ("less_less_token", "less_token", "normal_token"),
    2: ("less_token", "normal_token"),
}

# (official pattern, canonical replacement) applied inside one stage, in order.
OFFICIAL_TO_CANONICAL = (
    (r"^tokens_to_token\.", "tokenizer."),
    (r"^patch_embed\.proj\.", "tokenizer.proj."),
    (r"^(tokenizer\.attention[12])\.mlp\.0\.", r"\1.mlp.fc1."),  # Performer's nn.Sequential MLP
    (r"^(tokenizer\.attention[12])\.mlp\.2\.", r"\1.mlp.fc2."),
    (r"\.feature_resuse_mlp\.0\.", ".feature_reuse.norm."),
    (r"\.feature_resuse_mlp\.1\.fc1\.", ".feature_reuse.fc1."),
    (r"\.feature_resuse_mlp\.1\.fc2\.", ".feature_reuse.fc2."),
    (r"^relation_reuse_conv\.0\.", "relation_reuse.expand."),
    (r"^relation_reuse_conv\.2\.", "relation_reuse.reduce."),
)

MODULE_PREFIX = re.compile(r"^module\.")  # nn.DataParallel / DDP wrappers


def is_official_layout(keys) -> bool:
    """True when the keys are those of the official DVT PyTorch release."""
    firsts = {MODULE_PREFIX.sub("", k).split(".", 1)[0] for k in keys}
    return bool(firsts) and firsts <= {"less_less_token", "less_token", "normal_token"}


def official_to_canonical(key: str) -> str:
    """One official key -> canonical, keeping the official stage prefix (``rename_official`` maps it)."""
    key = MODULE_PREFIX.sub("", key)
    head, _, rest = key.partition(".")
    if head not in OFFICIAL_STAGE_PREFIXES[3]:
        return key
    return f"{head}.{stage_key_to_canonical(rest)}"


def stage_key_to_canonical(key: str) -> str:
    """One key inside one ViT / T2T-ViT (an official stage, or a whole static timm ViT / T2T-ViT release
    model, whose names are the same) -> its canonical name inside a stage."""
    for pattern, repl in OFFICIAL_TO_CANONICAL:
        key = re.sub(pattern, repl, key)
    return key


def rename_official(state: dict, num_exits: int) -> dict:
    """Official release state dict -> canonical names (``stages.<i>.``) for a cascade of ``num_exits``."""
    prefixes = OFFICIAL_STAGE_PREFIXES.get(num_exits)
    if prefixes is None:
        raise CheckpointError(f"the official release has 2- and 3-exit models; this spec has {num_exits} exits")
    index = {p: i for i, p in enumerate(prefixes)}
    out = {}
    for key, value in state.items():
        k = official_to_canonical(key)
        head, _, rest = k.partition(".")
        if head in index:
            k = f"stages.{index[head]}.{rest}"
        out[k] = value
    return out


# ---- MindSpore -------------------------------------------------------------------------------------
# nn.LayerNorm in MindSpore names its affine parameters gamma / beta; every other parameter keeps its
# torch name. LayerNorm modules are exactly those whose last name part starts with "norm".
_LN_TORCH = re.compile(r"(^|\.)(norm\d*)\.(weight|bias)$")
_LN_MINDSPORE = re.compile(r"(^|\.)(norm\d*)\.(gamma|beta)$")
_TORCH_TO_MS_LEAF = {"weight": "gamma", "bias": "beta"}
_MS_TO_TORCH_LEAF = {v: k for k, v in _TORCH_TO_MS_LEAF.items()}


def canonical_to_mindspore(key: str) -> str:
    return _LN_TORCH.sub(lambda m: f"{m.group(1)}{m.group(2)}.{_TORCH_TO_MS_LEAF[m.group(3)]}", key)


def mindspore_to_canonical(key: str) -> str:
    return _LN_MINDSPORE.sub(lambda m: f"{m.group(1)}{m.group(2)}.{_MS_TO_TORCH_LEAF[m.group(3)]}", key)


# ---- the authors' MindSpore release ------------------------------------------------------------------
# Its checkpoints (mindspore.save_checkpoint) name the two exits ``less_token.`` and ``normal_token.``.
# Inside a stage, (official name, canonical name, transform), in the order that code writes a .ckpt;
# ``{i}`` is a block index. Transforms: "patch" a Dense on (C, p, p)-flattened patches <-> the
# stride-p convolution (d, C, p, p); "q" / "k" / "v" the first / second / third third of the rows of
# the fused ``qkv`` projection.
MS_OFFICIAL_STAGE_PREFIXES = ("less_token", "normal_token")
MS_OFFICIAL_NAMES = (
    ("cls_token", "cls_token", None),
    ("pos_embedding", "pos_embed", None),
    ("stem.patch_to_embedding.dense.weight", "tokenizer.proj.weight", "patch"),
    ("stem.patch_to_embedding.dense.bias", "tokenizer.proj.bias", None),
    ("layers.{i}.norm1.gamma", "blocks.{i}.norm1.weight", None),
    ("layers.{i}.norm1.beta", "blocks.{i}.norm1.bias", None),
    ("layers.{i}.attn.to_q.weight", "blocks.{i}.attn.qkv.weight", "q"),
    ("layers.{i}.attn.to_q.bias", "blocks.{i}.attn.qkv.bias", "q"),
    ("layers.{i}.attn.to_k.weight", "blocks.{i}.attn.qkv.weight", "k"),
    ("layers.{i}.attn.to_k.bias", "blocks.{i}.attn.qkv.bias", "k"),
    ("layers.{i}.attn.to_v.weight", "blocks.{i}.attn.qkv.weight", "v"),
    ("layers.{i}.attn.to_v.bias", "blocks.{i}.attn.qkv.bias", "v"),
    ("layers.{i}.attn.to_out.weight", "blocks.{i}.attn.proj.weight", None),
    ("layers.{i}.attn.to_out.bias", "blocks.{i}.attn.proj.bias", None),
    ("layers.{i}.norm2.gamma", "blocks.{i}.norm2.weight", None),
    ("layers.{i}.norm2.beta", "blocks.{i}.norm2.bias", None),
    ("layers.{i}.mlp.ff1.dense.weight", "blocks.{i}.mlp.fc1.weight", None),
    ("layers.{i}.mlp.ff1.dense.bias", "blocks.{i}.mlp.fc1.bias", None),
    ("layers.{i}.mlp.ff2.dense.weight", "blocks.{i}.mlp.fc2.weight", None),
    ("layers.{i}.mlp.ff2.dense.bias", "blocks.{i}.mlp.fc2.bias", None),
    ("layers.{i}.feature_resuse_mlp.norm1.gamma", "blocks.{i}.feature_reuse.norm.weight", None),  # sic
    ("layers.{i}.feature_resuse_mlp.norm1.beta", "blocks.{i}.feature_reuse.norm.bias", None),
    ("layers.{i}.feature_resuse_mlp.ff1.dense.weight", "blocks.{i}.feature_reuse.fc1.weight", None),
    ("layers.{i}.feature_resuse_mlp.ff1.dense.bias", "blocks.{i}.feature_reuse.fc1.bias", None),
    ("layers.{i}.feature_resuse_mlp.ff2.dense.weight", "blocks.{i}.feature_reuse.fc2.weight", None),
    ("layers.{i}.feature_resuse_mlp.ff2.dense.bias", "blocks.{i}.feature_reuse.fc2.bias", None),
    ("head.0.weight", "head.weight", None),
    ("head.0.bias", "head.bias", None),
    ("norm.gamma", "norm.weight", None),
    ("norm.beta", "norm.bias", None),
    ("relation_reuse_conv.0.weight", "relation_reuse.expand.weight", None),
    ("relation_reuse_conv.0.bias", "relation_reuse.expand.bias", None),
    ("relation_reuse_conv.2.weight", "relation_reuse.reduce.weight", None),
    ("relation_reuse_conv.2.bias", "relation_reuse.reduce.bias", None),
)
_QKV = ("q", "k", "v")

# Training state a MindSpore training checkpoint holds besides the model: optimizer moments (one per
# parameter, under a prefix) and scalars of the optimizer, loss scaler and training loop.
MS_TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "moments.", "moment1.", "moment2.", "accum.", "mean_grad.",
                              "mean_square.", "linear.")
MS_TRAINING_STATE_NAMES = frozenset({
    "beta1_power", "beta2_power", "global_step", "learning_rate", "momentum", "weight_decay", "scale_sense",
    "loss_scale", "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num",
})


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_MS_OFFICIAL_PATTERNS = tuple((_template_regex(o), c, t) for o, c, t in MS_OFFICIAL_NAMES)


def is_ms_training_state(name: str) -> bool:
    """True for optimizer / training-loop entries of a MindSpore training checkpoint (never model weights)."""
    return name in MS_TRAINING_STATE_NAMES or name.startswith(MS_TRAINING_STATE_PREFIXES)


def is_ms_official_layout(names) -> bool:
    """True when the names (training state aside) are those of a checkpoint of the authors' MindSpore code.

    The PyTorch release uses the same stage prefixes; its stages hold ``blocks.`` and ``pos_embed``, the
    MindSpore code's ``layers.``, ``pos_embedding`` and ``stem.``.
    """
    model = [n for n in names if not is_ms_training_state(n)]
    if not model or {n.split(".", 1)[0] for n in model} - set(MS_OFFICIAL_STAGE_PREFIXES):
        return False
    return any(n.split(".", 1)[1:] and n.split(".", 1)[1].startswith(("layers.", "pos_embedding", "stem."))
               for n in model)


def ms_official_to_canonical(state: dict, in_chans: int = 3) -> dict:
    """A checkpoint of the authors' MindSpore code (training state already dropped) -> canonical names.

    ``to_q``/``to_k``/``to_v`` are stacked into ``qkv``; the patch Dense becomes the equivalent
    convolution kernel (``in_chans`` channels). A name no rule covers, or a ``qkv`` part without its
    two siblings, keeps its official name, so the loader lists it as unexpected.
    """
    import numpy as np

    out, parts = {}, {}
    for name, value in state.items():
        head, _, rest = name.partition(".")
        if head not in MS_OFFICIAL_STAGE_PREFIXES:
            out[name] = value
            continue
        prefix = f"stages.{MS_OFFICIAL_STAGE_PREFIXES.index(head)}."
        for pattern, canonical, transform in _MS_OFFICIAL_PATTERNS:
            m = pattern.match(rest)
            if m is None:
                continue
            key = prefix + canonical.format(**m.groupdict())
            if transform in _QKV:
                parts.setdefault(key, {})[transform] = (name, value)
            elif transform == "patch":
                value = np.asarray(value)
                side = int(round((value.shape[1] / in_chans) ** 0.5)) if value.ndim == 2 else 0
                if value.ndim == 2 and in_chans * side * side == value.shape[1]:
                    value = value.reshape(value.shape[0], in_chans, side, side)
                out[key] = value
            else:
                out[key] = value
            break
        else:
            out[name] = value
    for key, got in parts.items():
        if set(got) == set(_QKV):
            out[key] = np.concatenate([np.asarray(got[t][1]) for t in _QKV], axis=0)
        else:
            out.update({name: value for name, value in got.values()})
    return out


def canonical_to_ms_official(state: dict) -> dict:
    """Canonical state of a two-exit ViT cascade -> the authors' MindSpore names, in that code's order.

    The inverse of :func:`ms_official_to_canonical`: ``qkv`` split in three, the patch convolution
    flattened to a Dense weight. Raises ValueError for a canonical name the layout has no place for.
    """
    import numpy as np

    out, used = {}, set()
    stage_keys = {}
    for k in state:
        m = re.match(r"^stages\.(\d+)\.(.+)$", k)
        if m is None or int(m.group(1)) >= len(MS_OFFICIAL_STAGE_PREFIXES):
            raise CheckpointError(f"{k} has no place in the authors' MindSpore layout (two stages)")
        stage_keys.setdefault(int(m.group(1)), set()).add(m.group(2))
    for s, head in enumerate(MS_OFFICIAL_STAGE_PREFIXES):
        keys = stage_keys.get(s, set())
        depth = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
        entries = []  # in the official order: stage entries before the blocks, the blocks, the rest
        looped = [e for e in MS_OFFICIAL_NAMES if "{i}" in e[0]]
        first = MS_OFFICIAL_NAMES.index(looped[0])
        entries += [(o, c, t) for o, c, t in MS_OFFICIAL_NAMES[:first]]
        for i in range(depth):
            entries += [(o.format(i=i), c.format(i=i), t) for o, c, t in looped]
        entries += [(o, c, t) for o, c, t in MS_OFFICIAL_NAMES[first + len(looped):]]
        for official, canonical, transform in entries:
            if canonical not in keys:
                continue
            value = np.asarray(state[f"stages.{s}.{canonical}"])
            if transform in _QKV:
                value = np.split(value, 3, axis=0)[_QKV.index(transform)]
            elif transform == "patch":
                value = value.reshape(value.shape[0], -1)
            out[f"{head}.{official}"] = np.ascontiguousarray(value)
            used.add(f"stages.{s}.{canonical}")
    left = sorted(set(state) - used)
    if left:
        raise CheckpointError(f"no place in the authors' MindSpore layout for: {', '.join(left[:5])}"
                         + (f" (+{len(left) - 5} more)" if len(left) > 5 else ""))
    return out
