"""The wheel, installed (not editable) into a scratch environment, works from a folder outside the checkout.

The wheel is built from a copy of the source tree (``pip wheel --no-deps``, no network), installed into
a fresh venv whose only link to the project's environment is a ``.pth`` line naming its site-packages
(so the pinned torch and MindSpore are reused, but not the editable install of this checkout), and run
from an empty folder: ``dvt demo``, ``build(name, weights="default")`` in both backends. The installed
distribution must add no generic top-level module (``backends``, ``weights``).
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "runs", "out", "kernel_meta", "rank_*", "*.ir")
TOP_LEVEL = {"dvt_core", "dvt_backends", "dvt_weights"}


def _run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, environment, wheel path, empty working folder) of an installed wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], cwd=root)
    wheel = next(dist.glob("dvt-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    # the project environment's packages (torch, MindSpore, numpy ...), without its .pth hooks
    (site / "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(root), "OMP_NUM_THREADS": "1",
           "GLOG_v": "3", "VIRTUAL_ENV": str(venv)}
    return py, env, wheel, work


def test_wheel_adds_no_generic_top_level_module(installed):
    py, env, wheel, work = installed
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert tops == TOP_LEVEL
        assert "dvt_weights/registry.yaml" in zf.namelist()
        assert "dvt_weights/dvt_fashion_mnist.safetensors" in zf.namelist()
        assert "dvt_core/assets/fashion_mnist_test_subset.npz" in zf.namelist()
    code = ("import importlib.util as u, dvt_core; "
            "print(dvt_core.__file__); print([n for n in ('backends', 'weights', 'hubconf') if u.find_spec(n)])")
    out = _run([py, "-c", code], cwd=work, env=env).stdout.splitlines()
    assert out[0].startswith(str(work.parent / "venv")), out  # the installed copy, not the checkout
    assert out[1] == "[]"


def test_installed_dvt_demo_runs_from_another_folder(installed):
    py, env, _, work = installed
    r = _run([py.with_name("dvt"), "demo"], cwd=work, env=env)
    assert "accuracy:" in r.stdout and "exits taken" in r.stdout, r.stdout
    assert (work / "dvt_demo.png").stat().st_size > 1000
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("backend", ["torch", pytest.param("mindspore", marks=pytest.mark.mindspore)])
def test_installed_build_with_default_weights(installed, backend):
    if backend == "mindspore" and importlib.util.find_spec("mindspore") is None:
        pytest.skip("mindspore is not installed")
    py, env, _, work = installed
    code = ("import numpy as np, dvt_core, dvt_backends, dvt_core.checkpoint.registry as w, dvt_core.data.sources as s; "
            f"m = dvt_core.build('dvt_fashion_mnist', backend={backend!r}, weights='default'); "
            "b = dvt_core.runtime.contract.backend_of(m); "
            "d = np.load(s.__file__.replace('data/sources.py', 'assets/fashion_mnist_test_subset.npz')); "
            "x = s.normalize(d['images'][:200], m.spec.mean, m.spec.std); "
            "acc = (b.forward_numpy(m, x)[-1].argmax(1) == d['labels'][:200]).mean(); "
            "print(b.name, w.weights_dir(), dvt_backends.__file__, acc)")
    name, weights_dir, backends_file, acc = _run([py, "-c", code], cwd=work, env=env).stdout.split()
    venv = str(work.parent / "venv")
    assert name == backend and weights_dir.startswith(venv) and backends_file.startswith(venv)
    assert float(acc) > 0.8
