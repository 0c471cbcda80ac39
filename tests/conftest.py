"""Session fixtures: a small generated dataset, validated once and shared (read-only) by pipeline tests."""
import shutil
from pathlib import Path

import pytest

from tests.helpers import FNAPI

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A dataset under ../shared/data, or a skip with the reason where that folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is provided beside the checkout in CI and dev machines)")
    return path


@pytest.fixture(scope="session")
def validated_sample(tmp_path_factory):
    """300 users over 3 days: raw tables under raw/, validate_inputs' outputs under out/. Do not modify."""
    from data_sources.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset
    from pipelines import validate_inputs

    root = tmp_path_factory.mktemp("sample")
    config = SampleDataConfig(users=300, days=3, seed=11, lfv_videos=400, sfv_videos=800,
                              new_lfv_videos_per_day=10, new_sfv_videos_per_day=20)
    write_sample_dataset(generate_sample_dataset(config), str(root / "raw"))
    validate_inputs.run([f"--start_date={config.dates[0]}", f"--end_date={config.dates[-1]}",
                         f"--input_root={root}/raw", f"--output_root={root}/out", *FNAPI])
    return {"root": root, "config": config, "dates": config.dates}


@pytest.fixture
def sample_copy(validated_sample, tmp_path):
    """A private copy of the validated sample that a test may add outputs to."""
    shutil.copytree(validated_sample["root"], tmp_path / "sample")
    return {**validated_sample, "root": tmp_path / "sample"}


SMALL_SID_MODEL = ["--levels=3", "--codebook_size=16", "--steps=300", "--batch_size=256", "--latent_dim=16"]


def run_daily_flow(root, dates, *, sid_model_args=SMALL_SID_MODEL, build_dates=None):
    """The daily flow up to the examples, on a validated sample under ``root``: train the SID model on the first
    day's catalog, assign SIDs and fold histories day by day, train the query tokenizer, fit the feature transform
    on the first day, build examples for ``build_dates`` (default: all but the last date)."""
    from pipelines import (assign_sids, build_examples, fit_feature_transform, train_query_tokenizer,
                           train_sid_model, update_histories)

    out = f"{root}/out"
    train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={out}/validated/videos", f"--date={dates[0]}", f"--output={out}/sid_model", *sid_model_args]))
    span = [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={out}", *FNAPI]
    assign_sids.run(span + [f"--sid_model={out}/sid_model"])
    update_histories.run(span + ["--backfill_days=1"])
    train_query_tokenizer.run(span + ["--query_vocab_size=200"])
    fit_feature_transform.run([f"--date={dates[0]}", f"--output_root={out}", *FNAPI])
    built = {}
    for day in build_dates or dates[:-1]:
        [built[day]] = build_examples.run([f"--date={day}", f"--output_root={out}", *FNAPI])
    return built


@pytest.fixture(scope="session")
def daily_flow(validated_sample, tmp_path_factory):
    """The validated sample after the whole daily flow (examples built for every day but the last). Read-only."""
    root = tmp_path_factory.mktemp("flow")
    shutil.copytree(validated_sample["root"], root, dirs_exist_ok=True)
    stats = run_daily_flow(root, validated_sample["dates"])
    return {**validated_sample, "root": root, "stats": stats}


# A user model small enough to train in seconds; only the plumbing around it is under test where it is used.
FLOW_MODEL = dict(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, mlp_dim=64, embedding_dim=16,
                  max_tokens=128)


@pytest.fixture(scope="session")
def flow_model(daily_flow, tmp_path_factory):
    """A tiny user model trained a few steps on every day of the daily flow's examples. Read-only."""
    from tokenminds_model import train as train_lib

    output = tmp_path_factory.mktemp("flow_model") / "model"
    dirs = [f"{daily_flow['root']}/out/examples/date={day}" for day in sorted(daily_flow["stats"])]
    train_lib.train(dirs, str(output), steps=10, batch_size=16, learning_rate=3e-3, progress=False,
                    tensorboard=False, **FLOW_MODEL)
    return str(output)


@pytest.fixture
def translated_jobs(monkeypatch):
    """Captures the Dataflow job each pipeline.run() translated."""
    from apache_beam.runners.dataflow import dataflow_runner

    jobs = []
    original = dataflow_runner.DataflowRunner.run_pipeline

    def capture(self, pipeline, options):
        result = original(self, pipeline, options)
        jobs.append(result.job)
        return result

    monkeypatch.setattr(dataflow_runner.DataflowRunner, "run_pipeline", capture)
    return jobs
