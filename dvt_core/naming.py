"""Parameter names: the one place that maps between the official release, our canonical names and MindSpore.

Canonical names are the PyTorch backend's ``state_dict`` keys (``stages.0.blocks.3.attn.qkv.weight``);
safetensors files store them as they are. Two explicit tables translate:

* the official DVT PyTorch release (``less_less_token.``/``less_token.``/``normal_token.``, its
  ``feature_resuse_mlp`` spelling, ``nn.Sequential`` indices) -> canonical;
* canonical -> MindSpore (``nn.LayerNorm`` names its parameters ``gamma`` and ``beta``), and back.

No name is guessed: a key that no rule covers passes unchanged and is then reported as unexpected by
the loader.
"""
from __future__ import annotations

import re

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

_MODULE_PREFIX = re.compile(r"^module\.")  # nn.DataParallel / DDP wrappers


def is_official_layout(keys) -> bool:
    """True when the keys are those of the official DVT PyTorch release."""
    firsts = {_MODULE_PREFIX.sub("", k).split(".", 1)[0] for k in keys}
    return bool(firsts) and firsts <= {"less_less_token", "less_token", "normal_token"}


def official_to_canonical(key: str) -> str:
    """One official key -> canonical, keeping the official stage prefix (``rename_official`` maps it)."""
    key = _MODULE_PREFIX.sub("", key)
    head, _, rest = key.partition(".")
    if head not in OFFICIAL_STAGE_PREFIXES[3]:
        return key
    for pattern, repl in OFFICIAL_TO_CANONICAL:
        rest = re.sub(pattern, repl, rest)
    return f"{head}.{rest}"


def rename_official(state: dict, num_exits: int) -> dict:
    """Official release state dict -> canonical names (``stages.<i>.``) for a cascade of ``num_exits``."""
    prefixes = OFFICIAL_STAGE_PREFIXES.get(num_exits)
    if prefixes is None:
        raise ValueError(f"the official release has 2- and 3-exit models; this spec has {num_exits} exits")
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
