"""User-model training throughput and hardware efficiency: examples/s, tokens/s and FLOP/s of the jitted training
step per preset, as a share of a matmul yardstick measured in the same run; scaling over (fake) devices.

Batches come from real examples (default: ``workdir/out/examples/date=2026-01-02`` when ``make demo`` has built it,
or ``--examples DIR``), read once and kept in memory so the figures are the model's, not the input pipeline's;
without examples (or with ``--synthetic``), random histories of up to 1,024 tokens with the sample's length profile
(median ~250). For each preset the first step (compilation) is timed apart, then ``--steps`` steps.

FLOPs. ``model GFLOP/step`` counts the matrix products of the training step (forward and backward, every
``dot_general`` of the step's jaxpr, scan bodies times their trip count) with the attention traced as the
materialised softmax, i.e. what the model needs, not what an implementation recomputes (the CPU attention kernel
recomputes its weights in the backward pass; that work is not counted). Padded positions are counted: the shapes
are static. ``XLA GFLOP/step`` is XLA's own cost analysis of the compiled step (it also counts elementwise work).

Yardstick. On CPU: a float32 1024^3 matmul; on an accelerator: a bfloat16 8192^3 matmul, and the chip's nominal
dense bfloat16 peak where known (model FLOP utilisation, MFU = model FLOP/s / peak). Shared machines are noisy, so
every timed step is bracketed by two yardstick runs and its share is model FLOP/s over their mean; the table gives
the median share (and the median of the same ratio in CPU-seconds, which other processes' load disturbs less).

``--scaling`` also runs the tiny preset in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(on CPU) on 1, 2 and 4 devices of a data-parallel mesh (``tokenminds_model.train.TrainSharding``) at the same global
batch: step time per device count and the largest loss difference to the 1-device run. Fake CPU devices share the
same cores, so this shows equality and overhead, not a speed-up.

    .venv/bin/python -m bench.model_training [--presets tiny,base] [--steps N] [--batch-size B] [--dtype auto]
        [--examples DIR | --synthetic] [--attention auto,reference] [--scaling] [--end-to-end]

Prints tables and a final ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokenminds_model import attention as attention_lib  # noqa: E402
from tokenminds_model import train as train_lib  # noqa: E402
from tokenminds_model.model import (PRESETS, ModelConfig, count_params, default_compute_dtype,  # noqa: E402
                                    model_functions, model_inputs)
from tokenminds_model.vocabulary import LFV_ID, SFV_ID, VocabularyLayout  # noqa: E402

DEFAULT_EXAMPLES = REPO_ROOT / "workdir" / "out" / "examples" / "date=2026-01-02"
DEFAULT_BATCH = {"cpu": {"tiny": 32, "base": 4, "large": 2}, "accelerator": {"tiny": 256, "base": 64, "large": 16}}
# base and large are accelerator presets: a few steps are enough to time them on CPU.
DEFAULT_STEPS = {"cpu": {"tiny": 20, "base": 4, "large": 2}, "accelerator": {"tiny": 50, "base": 20, "large": 10}}
# Nominal dense bfloat16 peak FLOP/s per chip (vendor figures, no sparsity), by substring of the device kind.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "T4": 65e12,
             "V100": 125e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12}


# ---------------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------------
def real_batches(examples_dir: str, batch_size: int, count: int):
    from tokenminds_model.data import numpy_batches

    layout, _, spec, _ = train_lib.read_examples_metadata([examples_dir])
    batches = []
    for batch in numpy_batches([examples_dir], batch_size, seed=0, repeat=True, shuffle_buffer=4096):
        batches.append(batch)
        if len(batches) == count:
            break
    return layout, spec, batches


def synthetic_batches(batch_size: int, count: int, seed: int = 0, max_tokens: int = 1024):
    """Random hard-feature histories (lengths spread like the sample's: median ~250 of 1024 tokens)."""
    layout = VocabularyLayout(sid_levels=3, codebook_size=256, query_vocab_size=8000)
    num_targets, prefix_len = 8, 2
    spec = {"tokens": {"dtype": "int64", "shape": [max_tokens]},
            "targets": {"dtype": "int64", "shape": [num_targets, 1 + prefix_len]}}
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        lengths = np.minimum(rng.lognormal(5.5, 0.9, batch_size).astype(int) + 10, max_tokens)
        tokens = np.zeros((batch_size, max_tokens), np.int64)
        for row, length in enumerate(lengths):
            tokens[row, :length] = rng.integers(16, layout.vocab_size, length)
            tokens[row, 0:length:10] = LFV_ID
        targets = np.zeros((batch_size, num_targets, 1 + prefix_len), np.int64)
        targets[:, :, 0] = rng.choice([LFV_ID, SFV_ID], (batch_size, num_targets))
        targets[:, :, 1:] = layout.sid_tokens(rng.integers(0, 256, (batch_size, num_targets, prefix_len)), prefix_len)
        batches.append({"tokens": tokens, "length": lengths[:, None], "targets": targets,
                        "num_targets": rng.integers(1, num_targets + 1, (batch_size, 1))})
    return layout, spec, batches


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and yardsticks.
# ---------------------------------------------------------------------------------------------------------------
def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
                yield item.jaxpr
            elif type(item).__name__ == "Jaxpr":
                yield item


def dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in ``jaxpr`` (2 per multiply-add), recursing into sub-jaxprs; scan bodies count
    ``length`` times."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
        trips = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += trips * dot_flops(sub)
    return total


def model_flops(fns, params, inputs, dropout_rng) -> int:
    """Matmul FLOPs of one training step's forward + backward, attention traced as the materialised softmax."""
    def loss(p):
        return fns.loss(p, inputs, dropout_rng=dropout_rng)[0]
    with attention_lib.use_implementation("reference"):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
    return dot_flops(jaxpr.jaxpr)


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled computation (0 when the backend does not report it)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return 0.0
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


class Yardstick:
    """A plain matmul's sustained rate: float32 1024^3 on CPU, bfloat16 8192^3 on accelerators, repeated for at
    least ``seconds`` (sustained, like a training step, rather than a best-case burst). ``measure()`` returns
    ``(FLOP/s wall, FLOP/s per CPU-second)``."""

    def __init__(self, platform: str, seconds: float = 0.5) -> None:
        self.size, dtype = (1024, jnp.float32) if platform == "cpu" else (8192, jnp.bfloat16)
        self.dtype = jnp.dtype(dtype).name
        self.seconds = seconds
        self.a = jax.random.normal(jax.random.key(0), (self.size, self.size), dtype)
        self.matmul = jax.jit(lambda x: x @ x)
        jax.block_until_ready(self.matmul(self.a))

    def measure(self):
        runs = 0
        started, cpu = time.perf_counter(), time.process_time()
        while runs < 2 or time.perf_counter() - started < self.seconds:
            jax.block_until_ready(self.matmul(self.a))
            runs += 1
        wall, cpu = time.perf_counter() - started, max(time.process_time() - cpu, 1e-9)
        flops = 2 * self.size ** 3 * runs
        return flops / wall, flops / cpu


def nominal_peak(device) -> float:
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_BF16.items() if name.lower() in kind.lower()), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# One preset.
# ---------------------------------------------------------------------------------------------------------------
def bench_preset(preset: str, batch_size: int, steps: int, examples_dir, yardstick: Yardstick, dtype: str = "auto",
                 attention: str = "auto", devices: int = 1, overrides: Optional[dict] = None) -> dict:
    count = min(steps + 1, 8)
    if examples_dir:
        layout, spec, raw = real_batches(examples_dir, batch_size, count)
    else:
        layout, spec, raw = synthetic_batches(batch_size, count)
    platform = jax.default_backend()
    dtype = default_compute_dtype(PRESETS[preset]["dtype"], platform) if dtype == "auto" else dtype
    config = ModelConfig.from_layout(layout, spec, preset, **{"dtype": dtype, **(overrides or {})})
    sharding = train_lib.TrainSharding(train_lib.make_mesh(devices, batch_size))
    inputs = [sharding.put_batch(model_inputs(batch, config)) for batch in raw]
    real_tokens = [int(np.count_nonzero(batch["tokens"])) for batch in inputs]
    fns = model_functions(config)
    tc = train_lib.TrainConfig(batch_size=batch_size)
    optimizer = train_lib.make_optimizer(tc)
    params = jax.device_put(fns.init(jax.random.key(0)), sharding.tree(fns.param_shapes()))
    opt_state = jax.device_put(optimizer.init(params), sharding.tree(train_lib.opt_state_shapes(fns.param_shapes())))
    step = train_lib.make_train_step(fns, optimizer, sharding)
    key = jax.random.key(0)
    rng = (lambda i: jax.random.fold_in(key, i)) if config.dropout > 0 else (lambda i: None)

    flops = model_flops(fns, params, inputs[0], rng(0))
    with attention_lib.use_implementation(attention):  # traced (and compiled) here
        started = time.perf_counter()
        compiled = step.lower(params, opt_state, inputs[0], rng(0)).compile()
        compile_s = time.perf_counter() - started
        params, opt_state, metrics = step(params, opt_state, inputs[0], rng(0))
        jax.block_until_ready(metrics)
    step_s, step_cpu_s, shares, cpu_shares, tokens = [], [], [], [], 0
    for index in range(1, steps + 1):
        before = yardstick.measure()
        started, cpu = time.perf_counter(), time.process_time()
        params, opt_state, metrics = step(params, opt_state, inputs[index % len(inputs)], rng(index))
        jax.block_until_ready((params, metrics))
        step_s.append(time.perf_counter() - started)
        step_cpu_s.append(max(time.process_time() - cpu, 1e-9))
        after = yardstick.measure()
        tokens += real_tokens[index % len(inputs)]
        shares.append(flops / step_s[-1] / ((before[0] + after[0]) / 2))
        cpu_shares.append(flops / step_cpu_s[-1] / ((before[1] + after[1]) / 2))
    median_s = statistics.median(step_s)
    seconds = sum(step_s)
    achieved = flops / median_s
    row = {"preset": preset, "params": count_params(params), "batch_size": batch_size,
           "max_tokens": config.max_tokens, "d_model": config.d_model, "devices": sharding.devices,
           "layers": f"{config.encoder_layers}+{config.decoder_layers}", "dtype": config.dtype,
           "attention": attention, "compile_s": round(compile_s, 2), "steps": steps,
           "ms_per_step": round(1000 * median_s, 1), "examples_per_s": round(batch_size / median_s, 2),
           "tokens_per_s": round(tokens / seconds, 1),
           "padded_tokens_per_s": round(batch_size * config.max_tokens / median_s, 1),
           "final_loss": round(float(metrics["loss"]), 4),
           "model_gflop_per_step": round(flops / 1e9, 2), "xla_gflop_per_step": round(xla_flops(compiled) / 1e9, 2),
           "achieved_gflop_per_s": round(achieved / 1e9, 2),
           "yardstick_share": round(statistics.median(shares), 3),
           "yardstick_share_cpu_s": round(statistics.median(cpu_shares), 3)}
    peak = nominal_peak(jax.devices()[0])
    if peak and platform != "cpu":
        row["mfu"] = round(achieved / peak, 3)
        row["peak_tflop_per_s"] = peak / 1e12
    return row


# ---------------------------------------------------------------------------------------------------------------
# Scaling over fake devices (subprocess).
# ---------------------------------------------------------------------------------------------------------------
SCALING_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
import jax, numpy as np
from bench.model_training import synthetic_batches
from tokenminds_model import train as train_lib
from tokenminds_model.model import ModelConfig, model_functions, model_inputs
args = json.loads(sys.argv[1])
layout, spec, raw = synthetic_batches(args["batch_size"], args["steps"] + 1, max_tokens=args["max_tokens"])
config = ModelConfig.from_layout(layout, spec, args["preset"], dtype="float32")
fns = model_functions(config)
rows = []
for devices in args["devices"]:
    for mode in args["shardings"]:
        sharding = train_lib.TrainSharding(train_lib.make_mesh(devices, args["batch_size"]), mode)
        tc = train_lib.TrainConfig(batch_size=args["batch_size"])
        optimizer = train_lib.make_optimizer(tc)
        params = jax.jit(fns._init, out_shardings=sharding.tree(fns.param_shapes()))(jax.random.key(0))
        opt_state = jax.jit(optimizer.init, out_shardings=sharding.tree(train_lib.opt_state_shapes(
            fns.param_shapes())))(params)
        step = train_lib.make_train_step(fns, optimizer, sharding)
        inputs = [sharding.put_batch(model_inputs(b, config)) for b in raw]
        key = jax.random.key(0)
        losses, times = [], []
        for index, batch in enumerate(inputs):
            started = time.perf_counter()
            params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, index)
                                              if config.dropout > 0 else None)
            losses.append(float(metrics["loss"]))
            times.append(time.perf_counter() - started)
        rows.append({"devices": devices, "sharding": mode, "losses": losses, "first_step_s": times[0],
                     "ms_per_step": 1000 * float(np.median(times[1:]))})
print("RESULT " + json.dumps({"visible_devices": len(jax.devices()), "rows": rows}))
"""


def scaling(preset: str, batch_size: int, steps: int, max_tokens: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=4").strip(),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    spec = {"preset": preset, "batch_size": batch_size, "steps": steps, "max_tokens": max_tokens,
            "devices": [1, 2, 4], "shardings": ["replicated", "fsdp"]}
    child = subprocess.run([sys.executable, "-c", SCALING_CHILD, json.dumps(spec), str(REPO_ROOT)], env=env,
                           capture_output=True, text=True, timeout=3600)
    if child.returncode:
        raise RuntimeError(f"scaling subprocess failed:\n{child.stderr[-3000:]}")
    result = json.loads(next(l for l in child.stdout.splitlines()[::-1] if l.startswith("RESULT "))[7:])
    reference = np.array(result["rows"][0]["losses"])
    for row in result["rows"]:
        row["max_loss_diff_vs_1_device"] = float(np.max(np.abs(np.array(row["losses"]) - reference)))
    return {"preset": preset, "batch_size": batch_size, "max_tokens": max_tokens, **result}


# ---------------------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per preset")
    parser.add_argument("--examples", default=str(DEFAULT_EXAMPLES) if (DEFAULT_EXAMPLES / "_SUCCESS").exists()
                        else None)
    parser.add_argument("--synthetic", action="store_true", help="random histories even if examples exist")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every preset")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute dtype (auto: float32 on CPU, the preset's on accelerators)")
    parser.add_argument("--attention", default="auto",
                        help="comma-separated attention implementations to time side by side (auto, reference, "
                             "chunked, xla); FLOPs are counted the same way for all")
    parser.add_argument("--devices", type=int, default=1, help="devices of the data-parallel mesh per preset")
    parser.add_argument("--model-overrides", default=None, help='JSON of ModelConfig fields, e.g. \'{"dropout": 0}\'')
    parser.add_argument("--scaling", action="store_true", help="also time tiny on 1/2/4 fake CPU devices")
    parser.add_argument("--scaling-preset", default="tiny")
    parser.add_argument("--end-to-end", action="store_true", help="also time train() on the examples (tiny)")
    parser.add_argument("--end-to-end-steps", type=int, default=50)
    args = parser.parse_args()
    examples = None if args.synthetic else args.examples
    platform = jax.default_backend()
    kind = "cpu" if platform == "cpu" else "accelerator"
    device = jax.devices()[0]

    print(f"JAX {jax.__version__} on {platform} ({getattr(device, 'device_kind', '?')}, {len(jax.devices())} "
          f"device(s), {os.cpu_count()} CPUs); data: {examples or 'synthetic'}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    yardstick = Yardstick(platform)
    wall, per_cpu = yardstick.measure()
    print(f"yardstick: {yardstick.dtype} {yardstick.size}^3 matmul {wall / 1e9:,.1f} GFLOP/s "
          f"({per_cpu / 1e9:,.1f} per CPU-second)" + (f"; nominal bf16 peak {nominal_peak(device) / 1e12:.0f} "
                                                      f"TFLOP/s" if nominal_peak(device) else ""), flush=True)
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        for attention in [a.strip() for a in args.attention.split(",") if a.strip()]:
            rows.append(bench_preset(preset, args.batch_size or DEFAULT_BATCH[kind].get(preset, 8),
                                     args.steps or DEFAULT_STEPS[kind].get(preset, 5), examples, yardstick,
                                     args.dtype, attention, args.devices,
                                     json.loads(args.model_overrides) if args.model_overrides else None))
            print(f"  {preset} (attention {attention}): done", flush=True)
    scaled = None
    if args.scaling:
        scaled = scaling(args.scaling_preset, 32, 6, 256)
    end_to_end = None
    if args.end_to_end and examples:
        with tempfile.TemporaryDirectory() as output:
            result = train_lib.train([examples], os.path.join(output, "ckpt"), preset="tiny",
                                     steps=args.end_to_end_steps, batch_size=DEFAULT_BATCH["cpu"]["tiny"],
                                     progress=False, log_every=10)
        end_to_end = {key: value for key, value in result.summary().items()
                      if key in ("steps", "first_loss", "final_loss", "examples_per_s", "tokens_per_s",
                                 "first_step_s", "wall_s")}

    mfu = any("mfu" in row for row in rows)
    print("\n== training step throughput (data in memory; median step; FLOPs: matmuls, forward + backward) ==")
    header = (f"{'preset':<7}{'params':>11}{'layers':>7}{'d':>5}{'T':>6}{'batch':>6}{'dtype':>9}{'attention':>10}"
              f"{'compile s':>10}{'ms/step':>10}{'examples/s':>11}{'tokens/s':>10}{'model GF':>9}{'XLA GF':>8}"
              f"{'GFLOP/s':>9}{'share':>7}{'(cpu-s)':>8}" + (f"{'MFU':>7}" if mfu else ""))
    print(header)
    for row in rows:
        print(f"{row['preset']:<7}{row['params']:>11,}{row['layers']:>7}{row['d_model']:>5}{row['max_tokens']:>6}"
              f"{row['batch_size']:>6}{row['dtype']:>9}{row['attention']:>10}{row['compile_s']:>10.1f}"
              f"{row['ms_per_step']:>10.1f}{row['examples_per_s']:>11,.1f}{row['tokens_per_s']:>10,.0f}"
              f"{row['model_gflop_per_step']:>9.1f}{row['xla_gflop_per_step']:>8.1f}"
              f"{row['achieved_gflop_per_s']:>9.1f}{row['yardstick_share']:>7.0%}{row['yardstick_share_cpu_s']:>8.0%}"
              + (f"{row.get('mfu', 0):>7.1%}" if mfu else ""))
    print(f"share = model GFLOP/s / the {yardstick.dtype} {yardstick.size}^3 matmul's GFLOP/s measured around each "
          f"step (median over steps); (cpu-s): the same in FLOP per CPU-second" +
          ("; MFU = model FLOP/s / nominal bf16 peak" if mfu else ""))
    if scaled:
        print(f"\n== data-parallel scaling, {scaled['preset']}, global batch {scaled['batch_size']}, "
              f"{scaled['max_tokens']} tokens, {scaled['visible_devices']} fake CPU devices (same cores: not a "
              f"speed-up) ==")
        print(f"{'devices':>8}{'params':>12}{'ms/step':>10}{'first step s':>14}{'max |loss - 1 device|':>24}")
        for row in scaled["rows"]:
            print(f"{row['devices']:>8}{row['sharding']:>12}{row['ms_per_step']:>10.1f}{row['first_step_s']:>14.1f}"
                  f"{row['max_loss_diff_vs_1_device']:>24.2e}")
    if end_to_end:
        print(f"\n== train() end to end, tiny, {end_to_end['steps']} steps (tf.data input, logging, checkpoint) ==")
        print(f"examples/s {end_to_end['examples_per_s']:,.1f}, tokens/s {end_to_end['tokens_per_s']:,.0f}, "
              f"first step (incl. compile) {end_to_end['first_step_s']:.1f} s, wall {end_to_end['wall_s']:.1f} s, "
              f"loss {end_to_end['first_loss']:.3f} -> {end_to_end['final_loss']:.3f}")
    result = {"platform": platform, "device_kind": getattr(device, "device_kind", None), "cpus": os.cpu_count(),
              "data": "real" if examples else "synthetic", "load_average": round(os.getloadavg()[0], 2),
              "yardstick": {"dtype": yardstick.dtype, "size": yardstick.size, "gflop_per_s": round(wall / 1e9, 1)},
              "matmul_gflop_per_s": round(wall / 1e9, 1), "rows": rows, "scaling": scaled,
              "end_to_end": end_to_end}
    tiny = next((row for row in rows if row["preset"] == "tiny"), None)
    if tiny:
        result.update(tiny_examples_per_s=tiny["examples_per_s"], tiny_tokens_per_s=tiny["tokens_per_s"])
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
