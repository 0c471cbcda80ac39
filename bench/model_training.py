"""User-model training throughput: examples/s and tokens/s of the jitted training step, per preset.

Batches come from real examples (default: ``workdir/out/examples/date=2026-01-02`` when ``make demo`` has built it,
or ``--examples DIR``), read once and kept in memory so the figures are the model's, not the input pipeline's;
without examples, random histories with the sample's length profile are used. For each preset: the first step
(compilation) is timed apart, then ``--steps`` steps; ``tokens/s`` counts non-pad encoder tokens (after fitting to
the preset's ``max_tokens``), ``padded tokens/s`` every encoder position. ``--end-to-end`` also times
``tokenminds_model.train.train`` (tf.data input, logging, checkpoint) for the tiny preset.

    .venv/bin/python -m bench.model_training [--presets tiny,base] [--steps N] [--examples DIR] [--end-to-end]

Prints a table and a final ``RESULT {json}`` line. The CPU figures depend on what else runs on the machine: the
load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tokenminds_model import train as train_lib  # noqa: E402
from tokenminds_model.model import ModelConfig, count_params, model_functions, model_inputs  # noqa: E402
from tokenminds_model.vocabulary import LFV_ID, SFV_ID, VocabularyLayout  # noqa: E402

DEFAULT_EXAMPLES = REPO_ROOT / "workdir" / "out" / "examples" / "date=2026-01-02"
DEFAULT_BATCH = {"tiny": 32, "base": 4, "large": 2}
# base and large are accelerator presets: a few steps are enough to time them on CPU.
DEFAULT_STEPS = {"tiny": 20, "base": 3, "large": 2}


def real_batches(examples_dir: str, batch_size: int, count: int):
    from tokenminds_model.data import numpy_batches

    layout, _, spec, _ = train_lib.read_examples_metadata([examples_dir])
    batches = []
    for batch in numpy_batches([examples_dir], batch_size, seed=0, repeat=True, shuffle_buffer=4096):
        batches.append(batch)
        if len(batches) == count:
            break
    return layout, spec, batches


def synthetic_batches(batch_size: int, count: int, seed: int = 0):
    """Random hard-feature histories (lengths spread like the sample's: median ~250 of 1024 tokens)."""
    layout = VocabularyLayout(sid_levels=3, codebook_size=256, query_vocab_size=8000)
    max_tokens, num_targets, prefix_len = 1024, 8, 2
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


def bench_preset(preset: str, batch_size: int, steps: int, examples_dir) -> dict:
    count = min(steps + 1, 16)
    if examples_dir:
        layout, spec, raw = real_batches(examples_dir, batch_size, count)
    else:
        layout, spec, raw = synthetic_batches(batch_size, count)
    config = ModelConfig.from_layout(layout, spec, preset)
    inputs = [model_inputs(batch, config) for batch in raw]
    real_tokens = [int(np.count_nonzero(batch["tokens"])) for batch in inputs]
    fns = model_functions(config)
    tc = train_lib.TrainConfig(batch_size=batch_size)
    params = fns.init(jax.random.key(0))
    optimizer = train_lib.make_optimizer(tc)
    opt_state = optimizer.init(params)
    step = train_lib.make_train_step(fns, optimizer)
    key = jax.random.key(0)
    rng = (lambda i: jax.random.fold_in(key, i)) if config.dropout > 0 else (lambda i: None)

    started = time.perf_counter()
    compiled = step.lower(params, opt_state, inputs[0], rng(0)).compile()
    compile_s = time.perf_counter() - started
    flops = step_flops(compiled)
    params, opt_state, metrics = step(params, opt_state, inputs[0], rng(0))
    jax.block_until_ready(metrics)
    tokens = 0
    started = time.perf_counter()
    for index in range(1, steps + 1):
        params, opt_state, metrics = step(params, opt_state, inputs[index % len(inputs)], rng(index))
        tokens += real_tokens[index % len(inputs)]
    jax.block_until_ready((params, metrics))
    seconds = time.perf_counter() - started
    return {"preset": preset, "params": count_params(params), "batch_size": batch_size,
            "max_tokens": config.max_tokens, "d_model": config.d_model,
            "layers": f"{config.encoder_layers}+{config.decoder_layers}", "dtype": config.dtype,
            "compile_s": round(compile_s, 2), "steps": steps, "ms_per_step": round(1000 * seconds / steps, 1),
            "examples_per_s": round(steps * batch_size / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "padded_tokens_per_s": round(steps * batch_size * config.max_tokens / seconds, 1),
            "final_loss": round(float(metrics["loss"]), 4),
            "gflop_per_step": round(flops / 1e9, 2) if flops else None,
            "achieved_gflop_per_s": round(flops * steps / seconds / 1e9, 2) if flops else None}


def step_flops(compiled) -> float:
    """XLA's FLOP count of one compiled training step (0 when the backend does not report it)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return 0.0
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def matmul_gflop_per_s(size: int = 1024, repeats: int = 5) -> float:
    """A plain float32 matmul's rate right now: the yardstick for the machine (shared cores vary)."""
    a = jax.random.normal(jax.random.key(0), (size, size))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,base")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per preset (default {DEFAULT_STEPS})")
    parser.add_argument("--examples", default=str(DEFAULT_EXAMPLES) if (DEFAULT_EXAMPLES / "_SUCCESS").exists()
                        else None)
    parser.add_argument("--synthetic", action="store_true", help="random histories even if examples exist")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every preset")
    parser.add_argument("--end-to-end", action="store_true", help="also time train() on the examples (tiny)")
    parser.add_argument("--end-to-end-steps", type=int, default=50)
    args = parser.parse_args()
    examples = None if args.synthetic else args.examples

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s), "
          f"{os.cpu_count()} CPUs); data: {examples or 'synthetic'}; load average {os.getloadavg()[0]:.1f}")
    yardstick = matmul_gflop_per_s()
    print(f"float32 1024^3 matmul: {yardstick:.1f} GFLOP/s")
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        rows.append(bench_preset(preset, args.batch_size or DEFAULT_BATCH.get(preset, 8),
                                 args.steps or DEFAULT_STEPS.get(preset, 5), examples))
        print(f"  {preset}: done", flush=True)
    end_to_end = None
    if args.end_to_end and examples:
        with tempfile.TemporaryDirectory() as output:
            result = train_lib.train([examples], os.path.join(output, "ckpt"), preset="tiny",
                                     steps=args.end_to_end_steps, batch_size=DEFAULT_BATCH["tiny"],
                                     progress=False, log_every=10)
        end_to_end = {key: value for key, value in result.summary().items()
                      if key in ("steps", "first_loss", "final_loss", "examples_per_s", "tokens_per_s",
                                 "first_step_s", "wall_s")}

    header = (f"{'preset':<7}{'params':>11}{'layers':>8}{'d':>6}{'T':>6}{'batch':>7}{'compile s':>11}"
              f"{'ms/step':>10}{'examples/s':>12}{'tokens/s':>11}{'padded tok/s':>14}{'GFLOP/step':>12}"
              f"{'GFLOP/s':>9}")
    print("\n== training step throughput (data in memory) ==")
    print(header)
    for row in rows:
        print(f"{row['preset']:<7}{row['params']:>11,}{row['layers']:>8}{row['d_model']:>6}{row['max_tokens']:>6}"
              f"{row['batch_size']:>7}{row['compile_s']:>11.1f}{row['ms_per_step']:>10.1f}"
              f"{row['examples_per_s']:>12,.1f}{row['tokens_per_s']:>11,.0f}{row['padded_tokens_per_s']:>14,.0f}"
              f"{row['gflop_per_step'] or 0:>12.1f}{row['achieved_gflop_per_s'] or 0:>9.1f}")
    if end_to_end:
        print(f"\n== train() end to end, tiny, {end_to_end['steps']} steps (tf.data input, logging, checkpoint) ==")
        print(f"examples/s {end_to_end['examples_per_s']:,.1f}, tokens/s {end_to_end['tokens_per_s']:,.0f}, "
              f"first step (incl. compile) {end_to_end['first_step_s']:.1f} s, wall {end_to_end['wall_s']:.1f} s, "
              f"loss {end_to_end['first_loss']:.3f} -> {end_to_end['final_loss']:.3f}")
    result = {"platform": jax.devices()[0].platform, "cpus": os.cpu_count(), "data": "real" if examples else
              "synthetic", "load_average": round(os.getloadavg()[0], 2), "matmul_gflop_per_s": round(yardstick, 1),
              "rows": rows, "end_to_end": end_to_end}
    tiny = next((row for row in rows if row["preset"] == "tiny"), None)
    if tiny:
        result.update(tiny_examples_per_s=tiny["examples_per_s"], tiny_tokens_per_s=tiny["tokens_per_s"])
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
