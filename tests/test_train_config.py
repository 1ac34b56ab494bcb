"""Training's library checks, without training: TrainConfig.validate's typed ranges, the sanitised model
file name, the resume check (the one spec-state diff) for both trainers' state files, ``init="default"``."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

import dvt_core
from dvt_core.errors import ConfigError, DVTError, InputError
from dvt_core.training.config import TrainConfig, model_file_name
from helpers import TINY


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("weight_decay", -0.1),
    ("weight_decay", math.nan), ("warmup_epochs", -1.0), ("warmup_epochs", math.inf), ("seed", -1),
    ("epochs", 0), ("batch_size", 0), ("batch_size", 2.5), ("max_steps", 0), ("min_lr", -1e-6),
    ("label_smoothing", 1.0), ("grad_clip", 0.0), ("checkpoint_every", 0), ("pad", -1), ("holdout", 1.5),
    ("holdout", -3), ("holdout", math.nan), ("epochs", True), ("lr", "1e-3"),
])
def test_validate_names_the_field_out_of_range(field, value):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.field == field and str(err.value).startswith(field)
    assert isinstance(err.value, DVTError)


@pytest.mark.parametrize("field, value, rule", [("epochs", 10 ** 7, "epochs must be at most 1000000"),
                                               ("seed", 2 ** 32, "seed must be at most 4294967295"),
                                               ("warmup_epochs", 1e7, "warmup_epochs must be a finite number at least 0 and at most 1e+06")])
def test_one_rule_set_for_the_library_and_for_checkpoint_records(field, value, rule):
    # TrainConfig.validate is the only place the rules live: a checkpoint's training record is refused by
    # the checkpoint metadata rules with the same words, as a CheckpointError saying where
    from dvt_core.training.config import check_train_config
    from dvt_core.errors import CheckpointError

    cfg = TrainConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match="^" + re.escape(rule)):
        cfg.validate()
    with pytest.raises(CheckpointError, match="^checkpoint_meta.train: " + re.escape(rule)):
        check_train_config(cfg, "checkpoint_meta.train", CheckpointError)


def test_validate_accepts_the_defaults_and_edges():
    assert TrainConfig().validate() == TrainConfig()
    TrainConfig(lr=1e-9, weight_decay=0.0, warmup_epochs=0.0, seed=0, holdout=0, max_steps=1).validate()
    TrainConfig(holdout=0.5, label_smoothing=0.1, grad_clip=1.0, epochs=1, batch_size=1).validate()


@pytest.mark.hostile
@pytest.mark.parametrize("name,want", [
    ("../../etc/passwd", "etc_passwd"), ("/abs/path", "abs_path"), ("..", "model"), ("", "model"),
    ("a b\\c:d", "a_b_c_d"), (".hidden", "hidden"), ("flowers", "flowers"), ("dvt_fashion_mnist", "dvt_fashion_mnist"),
    ("x" * 300, "x" * 64), ("nul\x00byte", "nul_byte"),
])
def test_model_file_name_stays_inside_its_folder(name, want, tmp_path):
    stem = model_file_name(name)
    assert stem == want
    assert (tmp_path / f"{stem}.safetensors").resolve().parent == tmp_path.resolve()


def _tiny(**extra):
    return dvt_core.get_spec("dvt_fashion_mnist", **{**TINY, **extra})


def _state_file(backend, tmp_path):
    """A trainer's state file of the tiny model, written by the trainer itself."""
    from dvt_core.training.loop import make_trainer

    cfg = TrainConfig(epochs=1, batch_size=4)
    trainer = make_trainer(backend, _tiny(), cfg)
    trainer.prepare()
    path = tmp_path / trainer.state_file
    trainer.save_state(path, {"epoch": 1, "step": 0, "partial": [0.0, 0], "history": [], "init": None})
    return trainer, path


@pytest.mark.parametrize("backend", ["torch", pytest.param("mindspore", marks=pytest.mark.mindspore)])
def test_resume_check_is_the_one_spec_state_diff(backend, tmp_path):
    if backend == "mindspore":
        pytest.importorskip("mindspore", reason="the MindSpore trainer needs mindspore")
    from dvt_core.training.loop import check_resumable

    trainer, path = _state_file(backend, tmp_path)
    check_resumable(trainer, path, _tiny())  # its own architecture: accepted
    with pytest.raises(InputError, match="another architecture than dvt_fashion_mnist.*tensors differ"):
        check_resumable(trainer, path, _tiny(embed_dim=24))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable training checkpoint"):
        check_resumable(trainer, path, _tiny())


def test_init_default_is_the_shipped_weights():
    from dvt_core.checkpoint.registry import default_weights_path
    from dvt_core.training.runs import resolve_init

    assert resolve_init("default", "dvt_fashion_mnist") == str(default_weights_path("dvt_fashion_mnist"))
    with pytest.raises(DVTError, match="no default weights"):
        resolve_init("default", "dvt_deit_tiny")
    with pytest.raises(InputError, match="--init file not found"):
        resolve_init("nowhere.pth", "dvt_fashion_mnist")


def test_folder_normalisation_is_per_channel_on_the_unit_scale():
    from dvt_core.training.runs import folder_normalisation

    rng = np.random.default_rng(0)
    rgb = np.stack([rng.integers(0, 60, (20, 8, 8)), rng.integers(100, 200, (20, 8, 8)),
                    np.full((20, 8, 8), 255)], axis=-1).astype(np.uint8)
    mean, std = folder_normalisation(rgb)
    for c in range(2):
        assert mean[c] == pytest.approx(rgb[..., c].mean() / 255, abs=1e-6)
        assert std[c] == pytest.approx(rgb[..., c].std() / 255, abs=1e-6)
    assert mean[2] == 1.0 and std[2] == 1.0  # a flat channel: no division by zero
    grey_mean, grey_std = folder_normalisation(rgb[..., 1])
    assert len(grey_mean) == len(grey_std) == 1 and grey_mean[0] == pytest.approx(mean[1], abs=1e-6)
