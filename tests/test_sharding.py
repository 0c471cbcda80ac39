"""Data-parallel and FSDP training on several devices gives the 1-device results; checkpoints move between meshes.

The 4-device runs use 4 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``), which must be set
before JAX starts, so they run in ONE subprocess (``tokenminds_model.train.train`` with ``devices=4``) while the
1-device runs run here. The runs (tiny model of ``tests/test_model.py``, dropout on, examples in file order):

- ``F``: 3 steps on 1 device; ``S``: 6 steps on 1 device (the reference curve);
- ``A``: 3 steps on 4 devices, parameters replicated (data parallel);
- ``D``: ``F`` resumed on 4 devices with FSDP (parameters and Adam moments sharded), 3 more steps;
- ``R``: ``A`` resumed here on 1 device, 3 more steps.

Tolerances: losses ``rtol=1e-5`` (observed: <= 3e-7 relative; the only difference is the order of the cross-device
sums). Parameters ``atol=1e-4`` (observed: <= 2e-5) for all but 0.1% of the elements, and every element within
``steps * learning_rate``: Adam (eps 1e-9) divides each gradient by its own magnitude, so where the exact gradient is
zero or cancels to within rounding error its update is that noise scaled up to the learning rate, in an arbitrary
direction, on 1 device as on 4. That is always so for the attention *key* biases (softmax is invariant to them) and
now and then for single elements (measured: 1 element of 59k).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_model import DAYS, TEST_MODEL, TRAIN_ARGS, make_layout, write_examples
from tokenminds_model import train as train_lib
from tokenminds_model.model_checkpoints import load_model
from tokenminds_model.train import TrainSharding, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(shuffle=False, log_every=3, tensorboard=False, **TRAIN_ARGS, **TEST_MODEL)
DEVICES = 4

CHILD = """
import json, sys
import jax
from tokenminds_model import train as train_lib
from tokenminds_model.model import model_functions
runs = json.loads(sys.argv[1])
train_lib.FSDP_MIN_ELEMENTS = 256  # the test model's arrays are small: shard every array of 256+ elements
out = {"devices": len(jax.devices())}
for name, kwargs in runs.items():
    result = train_lib.train(**kwargs)
    sharding = train_lib.TrainSharding(train_lib.make_mesh(result.devices), result.param_sharding)
    shardings = jax.tree.leaves(sharding.tree(model_functions(result.config).param_shapes()))
    out[name] = {"losses": list(result.losses), "devices": result.devices, "param_sharding": result.param_sharding,
                 "ms_per_step": result.ms_per_step, "leaves": len(shardings),
                 "sharded_leaves": sum(s.spec != jax.sharding.PartitionSpec() for s in shardings)}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    layout = make_layout()
    dirs = [write_examples(root / "examples", layout, day, seed) for seed, day in enumerate(DAYS)]
    out = root / "runs"
    results = {"F": train_lib.train(dirs, str(out / "F"), steps=3, **RUN),
               "S": train_lib.train(dirs, str(out / "S"), steps=6, **RUN)}
    children = {"A": dict(example_dirs=dirs, output=str(out / "A"), steps=3, devices=DEVICES, **RUN),
                "D": dict(example_dirs=dirs, output=str(out / "D"), init_from=str(out / "F"), steps=3,
                          skip_batches=3, devices=DEVICES, param_sharding="fsdp", **RUN)}
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(children)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    reported = json.loads(next(line for line in child.stdout.splitlines()[::-1] if line.startswith("RESULT "))[7:])
    results["R"] = train_lib.train(dirs, str(out / "R"), init_from=str(out / "A"), steps=3, skip_batches=3, **RUN)
    params = {name: load_model(out / name)[1] for name in ("F", "S", "A", "D", "R")}
    return {"results": results, "child": reported, "params": params}


def assert_params_close(params, reference, steps):
    """Every parameter within ``steps * learning_rate`` of the reference (the most Adam can move it on rounding
    noise), and all but 0.1% of the elements (measured: <= 1 of 59k) within ``atol 1e-4`` (measured <= 2e-5)."""
    far, total = 0, 0
    for (path, leaf), ref in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference)):
        name = jax.tree_util.keystr(path)
        difference = np.abs(np.asarray(leaf) - np.asarray(ref))
        assert difference.max() <= steps * TRAIN_ARGS["learning_rate"] * 1.01, name
        if "attention']['key']['bias" not in name:  # zero exact gradient: always noise (module docstring)
            far += int(np.sum(difference > 1e-4))
            total += difference.size
    assert far <= 1e-3 * total, (far, total)


def test_four_devices_train_like_one(runs):
    child, results = runs["child"], runs["results"]
    assert child["devices"] == DEVICES and child["A"]["devices"] == DEVICES and child["D"]["devices"] == DEVICES
    assert child["A"]["sharded_leaves"] == 0 and child["D"]["param_sharding"] == "fsdp"
    assert 0 < child["D"]["sharded_leaves"] < child["D"]["leaves"]  # the large arrays are sharded, not all
    # Data parallel: the same loss curve and parameters as 3 steps on one device.
    np.testing.assert_allclose(child["A"]["losses"], results["F"].losses, rtol=1e-5)
    assert_params_close(runs["params"]["A"], runs["params"]["F"], steps=3)
    assert all(child[name]["ms_per_step"] > 0 for name in ("A", "D"))


def test_checkpoints_move_between_one_and_four_devices(runs):
    child, results = runs["child"], runs["results"]
    reference = results["S"].losses[3:]
    # 1 -> 4 (FSDP): F's checkpoint continued on 4 devices; 4 -> 1: A's checkpoint continued here.
    np.testing.assert_allclose(child["D"]["losses"], reference, rtol=1e-5)
    np.testing.assert_allclose(results["R"].losses, reference, rtol=1e-5)
    assert results["R"].start_step == 3 and results["R"].step == 6
    for name in ("D", "R"):
        assert_params_close(runs["params"][name], runs["params"]["S"], steps=6)


def test_mesh_and_fsdp_rules():
    assert make_mesh("auto").devices.size == len(jax.local_devices())
    with pytest.raises(ValueError, match="devices"):
        make_mesh(len(jax.local_devices()) + 1)
    sharding = TrainSharding(make_mesh(1), "fsdp")
    assert sharding.for_shape((1024, 256)).spec == jax.sharding.PartitionSpec()  # one device: nothing to shard
    with pytest.raises(ValueError, match="param sharding"):
        TrainSharding(make_mesh(1), "zero3")
    args = train_lib.parse_args(["--examples=x", "--output=y", "--devices=4", "--param_sharding=fsdp",
                                 "--compute_dtype=bfloat16"])
    assert (args.devices, args.param_sharding, args.compute_dtype) == ("4", "fsdp", "bfloat16")
