"""``hubconf.py``: every zoo model loads through ``torch.hub.load(<clone>, name, source="local")``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dvt_core

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


def _hubconf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvt_hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_has_one_entry_per_zoo_model():
    hub = _hubconf()
    # what torch.hub.list shows: the public callables of hubconf.py
    entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entries == dvt_core.list_models()
    assert all(isinstance(d, str) for d in hub.dependencies) and "torch" in hub.dependencies
    assert "14x14" in hub.dvt_deit_small.__doc__ and "pretrained" in hub.dvt_deit_small.__doc__


def test_pretrained_loads_the_shipped_weights():
    model = torch.hub.load(str(REPO), "dvt_fashion_mnist", source="local", pretrained=True)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.checkpoint_meta["arch"] == "dvt_fashion_mnist"
    want = dvt_core.build("dvt_fashion_mnist", weights="default").state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        assert [tuple(o.shape) for o in model(x)] == [(2, 10)] * 3


def test_overrides_and_untrained_models():
    model = torch.hub.load(str(REPO), "dvt_t2t_vit_12", source="local", pretrained=False, img_size=32,
                           grids=(2, 3, 4), depth=1, embed_dim=32, num_heads=2, token_dim=16, num_classes=5)
    assert model.spec == dvt_core.get_spec("dvt_t2t_vit_12", img_size=32, grids=(2, 3, 4), depth=1, embed_dim=32,
                                           num_heads=2, token_dim=16, num_classes=5)
    assert not model.checkpoint_meta
    with pytest.raises(dvt_core.CheckpointError, match="no default weights ship for 'dvt_t2t_vit_12'"):
        torch.hub.load(str(REPO), "dvt_t2t_vit_12", source="local", pretrained=True)


def test_hub_load_from_another_folder_in_a_fresh_process(tmp_path):
    """As a user runs it: a fresh interpreter, started elsewhere, nothing of the clone on its path."""
    code = ("import torch, sys; "
            f"m = torch.hub.load({str(REPO)!r}, 'static_fashion_mnist_2x2', source='local', pretrained=True); "
            "import dvt_core; out = m(torch.zeros(1, 1, 28, 28)); "
            "print(type(m).__module__, len(out), tuple(out[0].shape), dvt_core.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[:4] == ["dvt_backends.torch.cascade", "1", "(1,", "10)"]
    assert words[4] == str(REPO / "dvt_core" / "__init__.py")  # the clone's code, not another install
