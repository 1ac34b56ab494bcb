"""Helpers the test modules share (a test module never imports another test module)."""
from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The small cascade every zoo model is shrunk to: three increasing token grids on 32-pixel images, two
# blocks of two heads (dvt_vit_base has two exits and takes the first and last grid).
SMALL = dict(img_size=32, grids=(2, 3, 4), depth=2, embed_dim=32, num_heads=2, num_classes=10)
SMALL_T2T = dict(SMALL, token_dim=16)


def small_overrides(name: str) -> dict:
    import dvt_core

    ov = dict(SMALL_T2T if "t2t" in name else SMALL)
    exits = dvt_core.get_spec(name).num_exits
    if exits != len(ov["grids"]):
        g = ov["grids"]
        ov["grids"] = (g[0],) + g[len(g) - exits + 1:]
    return ov


def random_images(spec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32)


# ---- the command line, run as a user runs it ---------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


SHIPPED = ROOT / "weights" / "dvt_fashion_mnist.safetensors"


SUBSET = ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz"


CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _fashion_installed() -> bool:
    from dvt_core.data import sources as data

    root = data.fashion_mnist_root()
    return all(any((Path(root) / f"{stem}{ext}").is_file() for ext in ("", ".gz"))
               for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def needs_fashion(test):
    """Marked ``dataset`` (a skip is a failure in CI) and skipped where Fashion-MNIST is not installed."""
    skip = pytest.mark.skipif(not _fashion_installed(),
                              reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return pytest.mark.dataset(skip(test))


def _has_mindspore() -> bool:
    """Whether mindspore is installed; a broken MindSpore backend then fails its tests, never skips them."""
    import importlib.util

    return importlib.util.find_spec("mindspore") is not None


needs_mindspore = pytest.mark.skipif(not _has_mindspore(), reason="mindspore is not installed")


def dvt(*args, cwd=None, script: bool = False, timeout: int = 300,
        process: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI: ``dvt_core.cli.main.main(args)`` in this process (:func:`cli`) unless ``process``, then in a
    fresh process, ``python -m dvt_core`` or, with ``script``, the console script. A fresh process costs
    seconds (torch and MindSpore imported again); tests of what only a process shows (exit status at the
    interpreter's exit, signals, closed pipes, the console script) ask for one."""
    if not (process or script):
        return cli(*args, cwd=cwd)
    if script:
        exe = Path(sys.executable).with_name("dvt")
        if not exe.exists():
            pytest.skip(f"console script {exe} not installed (pip install -e .)")
        cmd = [str(exe), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "dvt_core", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd or os.getcwd(), env=env, capture_output=True, text=True, timeout=timeout)


class _CapturedText(io.TextIOWrapper):
    """A text stream over bytes (``.buffer`` works, as on a real stdout) that reads back what was written."""

    def __init__(self):
        super().__init__(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="\n", write_through=True)

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("utf-8", "replace")


def cli(*args, cwd=None, stdin=None) -> subprocess.CompletedProcess:
    """``dvt ARGS`` through ``dvt_core.cli.main.main`` in this process, stdout and stderr captured: the
    status main returns (an argparse exit's code; 1 and the traceback for an exception escaping main, as
    the interpreter would); ``stdin``: the text on its standard input. The working folder, the environment
    and torch's thread count are restored."""
    import contextlib
    import traceback

    from dvt_core.cli.main import main

    argv = [str(a) for a in args]
    out, err = _CapturedText(), _CapturedText()
    before_cwd, before_env = os.getcwd(), dict(os.environ)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    before_stdin = sys.stdin
    try:
        os.chdir(cwd or before_cwd)
        sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode("utf-8")), encoding="utf-8")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    sys.stderr.write(f"{exc.code}\n")
            except Exception:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
                sys.stderr.write(traceback.format_exc())
                status = 1
    finally:
        sys.stdin = before_stdin
        os.chdir(before_cwd)
        os.environ.clear()
        os.environ.update(before_env)
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
    return subprocess.CompletedProcess(["dvt", *argv], int(status or 0), out.text(), err.text())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Status 2, one stderr line, no traceback; returns the line (checked for ``fragments``)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100
        img.verify()


def read_state(path: Path) -> dict:
    from dvt_core.checkpoint.files import read_checkpoint

    return read_checkpoint(path).state


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ---- small cascades with spread-out confidences, and what the policy says of them ------------------------

EARLY_EXIT_SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, grids=(2, 3, 4), num_classes=10)

TIE = 1e-5  # confidences this close to a threshold may legitimately go either way


BATCH = 24


FAMILIES = {"t2t": ("dvt_t2t_vit_12", dict(token_dim=16)), "vit": ("dvt_deit_tiny", {})}


_MODELS: dict = {}


def small_model(family: str, feature_reuse: bool = True, relation_reuse: bool = True):
    """A small cascade in eval mode whose exits give spread-out confidences (cached per config)."""
    import torch
    from torch import nn

    import dvt_core

    key = (family, feature_reuse, relation_reuse)
    if key not in _MODELS:
        name, extra = FAMILIES[family]
        torch.manual_seed(0)
        model = dvt_core.build(name, feature_reuse=feature_reuse, relation_reuse=relation_reuse,
                               **EARLY_EXIT_SMALL, **extra).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
            for st in model.stages:
                st.head.weight.mul_(4.0)
                st.cls_token.normal_(0.0, 1.0, generator=g)
        _MODELS[key] = model
    return _MODELS[key]


def make_images(model, n: int = BATCH, seed: int = 0):
    import torch

    s = model.spec
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s.in_chans, s.img_size, s.img_size, generator=g)


def full_run(model, images, kind: str = "max_softmax"):
    """Every exit's float32 logits (exits, B, classes) and confidences (exits, B), as the policy sees them."""
    import torch

    from dvt_core.runtime import policy

    with torch.no_grad():
        logits = np.stack([o.float().numpy() for o in model(images)])
    return logits, policy.confidence(policy.softmax(logits), kind)


def split_threshold(values, share: float, gap: float = 4 * TIE, slack: int = 1) -> float:
    """A threshold that lets about ``share`` of ``values`` (the highest) through and sits in the middle of a gap of
    at least ``gap`` between two of them, so no value is within ``gap / 2`` of it: of the gaps that let through
    within ``slack`` values of ``share``, the widest. Every test that derives a threshold from confidences (a
    median, a quantile) uses this: a threshold on an image's confidence lets a last-bit difference between two
    CPU kernels decide that image's exit."""
    v = np.unique(np.asarray(values, np.float64).ravel())[::-1]  # falling
    if len(v) < 2:
        return float(v[0] - gap)
    widths = v[:-1] - v[1:]  # the gap after v[i] lets v[0..i] through: i + 1 values
    miss = np.abs(np.arange(1, len(v)) - share * len(v))
    near = np.flatnonzero(miss <= miss.min() + slack)
    near = near[widths[near] >= gap]
    assert near.size, f"no gap of {gap} between the confidences {v.tolist()} near a share of {share}"
    best = near[np.argmax(widths[near])]
    return float((v[best] + v[best + 1]) / 2)


def median_thresholds(conf, gap: float = 2e-6, slack: int = 0) -> list[float]:
    """Per exit but the last (``conf``: exits x images), a threshold near the median confidence of all images (within
    ``slack`` images, by default a sixth of them), in the widest gap there, which must be at least ``gap``. One
    framework's confidences on other batch sizes differ in the last bits (about 1e-8); two runtimes' logits by up to
    about 1e-4, their confidences by about 1e-5: pass a ``gap`` of 2e-4 where a threshold found on one runtime is
    applied in another."""
    return [split_threshold(c, 0.5, gap, slack=slack or max(1, len(c) // 6)) for c in np.asarray(conf)[:-1]]


def spread_thresholds(conf: np.ndarray, gap: float = 4 * TIE, slack: int = 1) -> list[float]:
    """Thresholds (num_exits - 1) sending about the same share of the images to every exit (``gap``, ``slack``:
    :func:`split_threshold`)."""
    n_exits = conf.shape[0]
    left = np.ones(conf.shape[1], bool)
    out = []
    for k in range(n_exits - 1):
        t = split_threshold(conf[k][left], 1.0 / (n_exits - k), gap, slack)
        out.append(t)
        left &= conf[k] < t
    return out


def reference(logits: np.ndarray, conf: np.ndarray, thresholds, costs):
    """What the policy says each image does: (exit, prediction, confidence, logits, macs, ambiguous)."""
    from dvt_core.runtime import policy
    from dvt_core.runtime.early_exit import normalize_thresholds

    n_exits, n = conf.shape
    t = normalize_thresholds(thresholds, n_exits)
    # adaptive takes +-inf as "never" / "always"; the policy only knows its finite sentinels
    exits = policy.assign_exits(conf, np.clip(t, policy.ALWAYS, policy.NEVER))
    rows = np.arange(n)
    ambiguous = np.zeros(n, bool)
    for k in range(n_exits - 1):
        ambiguous |= (exits >= k) & (np.abs(conf[k].astype(np.float64) - float(t[k])) < TIE)
    return dict(exit=exits, prediction=logits[exits, rows].argmax(1), confidence=conf[exits, rows],
                logits=logits[exits, rows], macs=np.asarray(costs, np.int64)[exits], ambiguous=ambiguous)


def assert_matches(result, ref, n_exits: int):
    n = len(ref["exit"])
    assert len(result) == n
    for name, dtype in (("prediction", np.int64), ("exit_index", np.int64), ("confidence", np.float32),
                        ("logits", np.float32), ("macs", np.int64)):
        assert getattr(result, name).dtype == dtype, name
    assert result.logits.shape == ref["logits"].shape
    keep = ~ref["ambiguous"]
    np.testing.assert_array_equal(result.exit_index[keep], ref["exit"][keep])
    np.testing.assert_array_equal(result.prediction[keep], ref["prediction"][keep])
    np.testing.assert_array_equal(result.macs[keep], ref["macs"][keep])
    np.testing.assert_allclose(result.confidence[keep], ref["confidence"][keep], rtol=0, atol=TIE)
    np.testing.assert_allclose(result.logits[keep], ref["logits"][keep], rtol=0, atol=TIE)
    # the per-image record is self-consistent, ambiguous images included
    assert result.exit_counts.dtype.kind == "i" and result.exit_counts.shape == (n_exits,)
    np.testing.assert_array_equal(result.exit_counts, np.bincount(result.exit_index, minlength=n_exits))
    assert int(result.exit_counts.sum()) == n
    np.testing.assert_array_equal(result.prediction, result.logits.argmax(1))
    assert result.mean_macs == pytest.approx(result.macs.mean(), rel=1e-12)


# ---- tiny training runs ----------------------------------------------------------------------------------

N_IMAGES = 300

TINY = dict(depth=1, embed_dim=16, num_heads=2, feature_reuse_dim=4, feature_reuse_hidden=8)


def synthetic(n: int = N_IMAGES, seed: int = 0):
    """uint8 (n, 28, 28) noise with a bright 10x3 square whose position (2 rows x 5 columns, mirrored
    left-right) is the class; int64 labels, 10 classes in equal numbers."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for img, c in zip(images, labels):
        r, col = 2 + 13 * (c // 5), 1 + 3 * (c % 5)
        img[r:r + 10, col:col + 3] = 255
        img[r:r + 10, 27 - col - 2:27 - col + 1] = 255
    return images, labels.astype(np.int64)


def _write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for i, (img, c) in enumerate(zip(images, labels)):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L" if img.ndim == 2 else "RGB").save(folder / f"{i:03d}.png")


# ---- hostile inputs: the CLI under an address-space limit; a refusal is status 2 and one line -----------------

MEM_LIMIT = 6 << 30  # address space; importing torch/MindSpore maps ~3 GB, the bombs ask for far more


def limit_memory(limit: int = MEM_LIMIT):
    """A ``preexec_fn`` that caps the child's address space at ``limit`` bytes."""
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run(args, cwd, backend="torch", timeout=240, preexec_fn=None, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "dvt_core", *map(str, args)]
    if backend and args and args[0] in ("predict", "evaluate"):
        cmd += ["--backend", backend]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn or limit_memory())


def refused(proc, *needles, status=2):
    """Status 2 (or ``status``), one line on stderr naming the problem, no traceback, no signal."""
    assert proc.returncode == status, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[WARNING")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]



def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BLOCK_IMPORTS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked in this test)", name=name)
sys.meta_path.insert(0, _Block())
"""


def run_dvt(*args, cwd=None, stdin=None, block=(), timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """The CLI fed ``stdin``: in this process (:func:`cli`) unless it needs its own: with the top-level modules
    in ``block`` unimportable (as if not installed) or ``env``, its own environment, it runs in a fresh process
    (one intra-op thread unless ``env`` says otherwise)."""
    if not block and env is None:
        return cli(*args, cwd=cwd, stdin=stdin)
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "1")
    code = BLOCK_IMPORTS.format(blocked=set(block)) if block else ""
    code += "import sys\nfrom dvt_core.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd or os.getcwd(), env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)
