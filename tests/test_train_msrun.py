"""MindSpore data-parallel training through MindSpore's own launcher, ``msrun``, on the CPU: two worker
processes (and msrun's scheduler) run the one training loop, each takes half of every global batch and
the gradients are averaged with an AllReduce, so the weights match a one-process run on the same global
batches. Another launcher's WORLD_SIZE is refused with one line.

Tiny model (one block per stage, width 16), 40 training images, two steps: the run itself takes
seconds; building msrun's cluster takes most of the time (about a minute on a 2-core machine).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dvt_core.checkpoint.files import read_checkpoint
from helpers import ROOT as REPO, TINY, _write_image_folder as write_image_folder, cli, free_port, synthetic

pytestmark = pytest.mark.mindspore

ms = pytest.importorskip("mindspore", reason="MindSpore training needs mindspore")

OV = [a for k, v in TINY.items() for a in ("-O", f"{k}={v}")]
ARGS = ["train", "--backend", "mindspore", "--model", "dvt_fashion_mnist", *OV, "--epochs", "1", "--max-steps",
        "2", "--holdout", "20", "--batch-size", "16", "--no-augment", "--no-progress"]
TOLERANCE = 1e-4  # float32: the averaged half-batch gradients against the whole batch's (measured 2.6e-6)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")
           and not k.startswith("MS_")}
    # msrun starts `python` from PATH: this interpreter's
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def test_two_msrun_workers_match_one_process(tmp_path):
    import subprocess

    msrun = Path(sys.executable).with_name("msrun")
    assert msrun.exists() or shutil.which("msrun"), "mindspore installs msrun next to its interpreter"
    images, labels = synthetic(60, seed=1)
    dataset = tmp_path / "images"
    write_image_folder(dataset, images, labels)
    launcher = tmp_path / "dvt_main.py"  # msrun runs a script file: the CLI's entry point
    launcher.write_text("import sys\nfrom dvt_core.cli.main import main\nsys.exit(main())\n")
    out = tmp_path / "dp"
    cmd = [str(msrun) if msrun.exists() else shutil.which("msrun"), "--worker_num=2", "--local_worker_num=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--join=True", f"--log_dir={tmp_path / 'log'}",
           "--cluster_time_out=120", str(launcher), *ARGS, "--dataset", str(dataset), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "log").glob("*.log")}
    worker0 = "\n".join(l for l in logs.get("worker_0.log", "").splitlines() if not l.startswith("["))
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{worker0[-3000:]}"
    assert sorted(p.name for p in out.iterdir()) == ["images.ckpt", "last.ckpt"]
    assert "epoch 1/1" in worker0 and "held-out accuracy: exit 1 (2x2)" in worker0
    dp = read_checkpoint(out / "images.ckpt")
    assert dp.meta["world_size"] == 2 and dp.meta["backend"] == "mindspore"

    single_out = tmp_path / "single"
    single = cli(*ARGS, "--dataset", dataset, "--out", single_out)  # one process: this one
    assert single.returncode == 0, single.stderr[-2000:]
    one = read_checkpoint(single_out / "images.ckpt")
    assert one.meta["world_size"] == 1 and one.meta["train"] == dp.meta["train"]
    assert one.meta["spec"] == dp.meta["spec"]

    import dvt_core
    from dvt_backends.mindspore.cascade import DVT
    from dvt_backends.mindspore.io import model_state

    ms.set_seed(0)  # the trainer's seed: the weights both runs started from
    first = model_state(DVT(dvt_core.CascadeSpec.from_dict(one.meta["spec"])))
    diff = {k: float(np.abs(one.state[k] - dp.state[k]).max()) for k in one.state}
    moved = {k: float(np.abs(one.state[k] - first[k]).max()) for k in one.state}
    assert max(moved.values()) > 1e-4, "training did not change the weights"
    assert sum(moved.values()) > 100 * sum(diff.values())
    worst = sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert max(diff.values()) < TOLERANCE, f"msrun's 2 workers and 1 process differ: {worst}"


def test_another_launchers_processes_are_refused(tmp_path, monkeypatch):
    images, labels = synthetic(40, seed=3)
    write_image_folder(tmp_path / "images", images, labels)
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    proc = cli(*ARGS, "--dataset", tmp_path / "images", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "msrun" in lines[0] and "torchrun" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
