"""A small seeded fuzz of every reader of untrusted files: mutated PNG, JPEG, safetensors, .ckpt and dvt.json.

Each mutant is read in one child process under an address-space limit: it must be read or refused with a
DVTError, never another exception, a signal, or more memory than the limit allows. Bounded: a fixed count
of mutants per format, a fixed seed, one timeout for all.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.hostile

MUTANTS_PER_FORMAT = 60
SEED = 20
AS_LIMIT = 3 << 30  # numpy, Pillow and dvt_core fit easily; no reader of these formats imports a framework
PEAK_RSS_MB = 600

_CHILD = r"""
import hashlib, io, json, os, random, resource, sys, tempfile, warnings
from pathlib import Path

resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
warnings.simplefilter("error")  # a raw warning reaching the user counts as a failure too
import numpy as np
from PIL import Image

from dvt_core.checkpoint import ms_ckpt
from dvt_core.checkpoint.files import read_checkpoint, write_checkpoint
from dvt_core.data.images import read_image
from dvt_core.errors import DVTError
from dvt_core.export.manifest import carry_names, make_manifest, read_manifest, stage_entry, PREV
from dvt_core.model.zoo import get_spec

work = Path(tempfile.mkdtemp(dir=sys.argv[1]))
rng = random.Random(int(sys.argv[3]))
count = int(sys.argv[4])


def png():
    buf = io.BytesIO()
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(buf, "PNG")
    return buf.getvalue()


def jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(buf, "JPEG", progressive=True)
    return buf.getvalue()


STATE = {"stages.0.head.bias": np.arange(10, dtype=np.float32), "stages.0.head.weight": np.ones((10, 4), np.float32)}
META = {"arch": "dvt_fashion_mnist", "thresholds": [0.9, 0.8, -1e8], "classes": [str(i) for i in range(10)]}


def safetensors():
    write_checkpoint(work / "base.safetensors", STATE, META, force=True)
    return (work / "base.safetensors").read_bytes()


def ckpt():
    return ms_ckpt.encode_ckpt(STATE, {"dvt_meta": json.dumps(META)})


spec = get_spec("dvt_fashion_mnist")
export = work / "export"
export.mkdir()
stages, carried = [], []
for i in range(spec.num_exits):
    (export / f"stage{i + 1}.onnx").write_bytes(b"graph %d" % i)
    inputs = ["images"] + [PREV + c for c in carried]
    carried = carry_names(spec, i)
    st = stage_entry(i, f"stage{i + 1}.onnx", inputs, ["logits"] + carried)
    st["sha256"] = hashlib.sha256(b"graph %d" % i).hexdigest()
    stages.append(st)
manifest = make_manifest(spec, "onnx", stages, META, {}, {"features": 0, "relations": 0})
manifest["data_files"] = []
MANIFEST = json.dumps(manifest).encode()
(export / "dvt.json").write_bytes(MANIFEST)
read_manifest(export)  # the unmutated one is valid


def mutate(data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x30, 0x39, 0x22, 0x5B, 0x7B])
        elif op == 2:
            del b[pos:]
        elif op == 3:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and b:
            n = rng.randint(1, 64)
            b[pos:pos] = b[pos:pos + n] * rng.randint(2, 50)
        elif op == 5 and len(b) >= 8:
            end = rng.randrange(8, len(b) + 1)
            b[end - 8:end] = rng.randrange(1 << 64).to_bytes(8, "little")
    return bytes(b)


def read_png(p):
    read_image(p, 28, 1)


def read_manifest_file(p):
    (export / "dvt.json").write_bytes(p.read_bytes())
    read_manifest(export)


cases = [("png", png(), ".png", read_png), ("jpeg", jpeg(), ".jpg", read_png),
         ("safetensors", safetensors(), ".safetensors", read_checkpoint), ("ckpt", ckpt(), ".ckpt", read_checkpoint),
         ("dvt.json", MANIFEST, ".json", read_manifest_file)]
for kind, base, suffix, reader in cases:
    for i in range(count):
        p = work / f"m{i}{suffix}"
        p.write_bytes(mutate(base))
        try:
            reader(p)
            outcome = "read"
        except DVTError:
            outcome = "refused"
        except BaseException as exc:  # what the test looks for: anything but a DVTError
            print(f"CRASH {kind} {i}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"OK {kind} {i} {outcome}", flush=True)
with open("/proc/self/status") as fh:
    hwm = [ln for ln in fh if ln.startswith("VmHWM")][0]
print("RSS_KB", hwm.split()[1])
"""


def test_mutated_files_are_read_or_refused_never_crash(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(AS_LIMIT), str(SEED),
                           str(MUTANTS_PER_FORMAT)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    crashes = [ln for ln in proc.stdout.splitlines() if ln.startswith("CRASH")]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert not crashes, "\n".join(crashes[:20])
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK ")]
    assert len(done) == 5 * MUTANTS_PER_FORMAT
    assert any(ln.endswith("refused") for ln in done)  # the mutations do reach the checks
    rss = int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_KB")).split()[1]) / 1024
    assert rss < PEAK_RSS_MB, rss
