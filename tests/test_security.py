"""Security basics, checked over the source tree and the output-path guards."""
import re
from pathlib import Path

import os

import pytest

from transforms import outputs

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipelines", "transforms", "data_sources", "tokenminds_model", "dags", "bench", "scripts")


def code_files():
    for directory in CODE_DIRS:
        yield from sorted((REPO / directory).rglob("*.py"))


def test_nothing_read_from_storage_is_unpickled():
    # Beam pickles DoFns on its own; our code never uses pickle-family loaders on data or models.
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b|allow_pickle\s*=\s*True"
                         r"|pickle\.loads?\(|torch\.load\(", re.M)
    offenders = [str(p.relative_to(REPO)) for p in code_files() if pattern.search(p.read_text())]
    assert offenders == []


def test_no_credentials_or_real_project_ids_in_the_repository():
    secrets = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"type\":\s*\"service_account\"|AIza[0-9A-Za-z_-]{35}"
                         r"|ya29\.[0-9A-Za-z_-]+|aws_secret_access_key", re.I)
    files = [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts
             and "workdir" not in p.parts and p.name != "test_security.py" and p.suffix in (".py", ".md", ".sh", ".txt", ".json", ".cfg", ".toml", "")]
    assert [str(p) for p in files if secrets.search(p.read_text(errors="ignore"))] == []
    # Project ids appear only as placeholders in docs and as the fake ids of tests.
    project_flags = re.compile(r"--(?:bq_)?project[= ]([a-z][a-z0-9-]+)")
    allowed = {"YOUR_PROJECT", "my-project", "tokenminds-ci", "your-project"}
    for path in files:
        for project in project_flags.findall(path.read_text(errors="ignore")):
            assert project in allowed or project.upper() == project, (path, project)


def test_bigquery_sql_is_never_built_from_option_values():
    source = (REPO / "transforms" / "sources.py").read_text()
    assert "@partition_date" in source
    # The only f-string SQL interpolates validated identifiers and column names, never a date or free text.
    for line in source.splitlines():
        if "WHERE" in line:
            assert "{" not in line.split("WHERE", 1)[1].replace("{partition_column}", ""), line


@pytest.mark.parametrize("path", ["/", "", "workdir/out", "workdir/out/histories", "workdir/out/../date=2026-01-01",
                                  "gs://bucket/out/validated/date=2026-01-01/.."])
def test_replacing_outputs_is_confined_to_date_partitions(path):
    from transforms.publish import DayOutputs

    with pytest.raises(ValueError, match="refusing to publish"):
        DayOutputs("job", [path])


def test_publishing_a_partition_replaces_only_that_partition(tmp_path):
    from transforms.publish import DayOutputs

    keep = tmp_path / "out" / "histories" / "date=2026-01-01"
    replace = tmp_path / "out" / "histories" / "date=2026-01-02"
    for d in (keep, replace):
        d.mkdir(parents=True)
        (d / "part-00000-of-00002.parquet").write_text("old")
    day = DayOutputs("job", [str(replace)])
    day.check_replaceable()
    staged = day.staged(str(replace))
    os.makedirs(staged)
    with open(os.path.join(staged, "part-00000-of-00001.parquet"), "w") as handle:
        handle.write("new")
    day.publish()
    assert sorted(p.name for p in keep.iterdir()) == ["part-00000-of-00002.parquet"]
    assert sorted(p.name for p in replace.iterdir()) == ["_MANIFEST.json", "part-00000-of-00001.parquet"]
    assert [p.name for p in replace.parent.iterdir() if p.name.startswith(".")] == []


def test_an_artifact_directory_is_only_replaced_if_it_is_that_artifact(tmp_path):
    (tmp_path / "someones_files").mkdir()
    (tmp_path / "someones_files" / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not an artifact"):
        outputs.replace_artifact_dir(str(tmp_path / "someones_files"), "query_tokenizer.json")
    assert (tmp_path / "someones_files" / "thesis.tex").exists()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "query_tokenizer.json").write_text("{}")
    assert outputs.replace_artifact_dir(str(tmp_path / "tok"), "query_tokenizer.json") == 1
