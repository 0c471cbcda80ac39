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
    from pipelines import validate_inputs
    from transforms.sample_data import SampleDataConfig, generate_sample_dataset, write_sample_dataset

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
