"""Shared set-up for the test suite.

* The helpers beside the tests (official.py, reference_official.py) are importable.
* One intra-op thread unless OMP_NUM_THREADS says otherwise: the test machine has two shared cores, and
  OpenMP threads that spin-wait for a descheduled partner made the suite about 3x slower there.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch when it is first imported

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import dvt_core  # noqa: F401,E402  (registers dvt_backends in a checkout)
from strict_skips import pytest_runtest_makereport  # noqa: F401,E402  (CI: a skipped data-set test fails)


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import ROOT, dvt  # noqa: E402


@pytest.fixture(scope="module")
def fashion_cli(tmp_path_factory):
    """`dvt export` of the shipped Fashion-MNIST DVT, and three PNGs of the shipped test subset."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("cli")
    r = dvt("export", "dvt_fashion_mnist", "--weights", "default", "--format", "onnx", "--out", "fm", cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(ROOT / "dvt_core" / "assets" / "fashion_mnist_test_subset.npz") as d:
        for i in range(3):
            Image.fromarray(d["images"][i]).save(tmp / f"img{i}.png")
    return tmp
