"""Artifact integrity: every artifact carries a _MANIFEST.json of its files; loaders verify it before any data is
read, and writers stage, then replace only what is theirs, so a failed rewrite keeps the previous artifact.

Damage is done to private copies of the session fixtures' artifacts (``daily_flow``, ``flow_model``).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FNAPI
from tokenminds_model import manifest as manifest_lib
from tokenminds_model.manifest import ArtifactIntegrityError

REPO = Path(__file__).resolve().parents[1]
TINY_SID_MODEL = ["--levels=2", "--codebook_size=8", "--steps=20", "--batch_size=64", "--latent_dim=8"]


def copy_artifact(daily_flow, name, tmp_path) -> Path:
    copy = tmp_path / name
    shutil.copytree(Path(daily_flow["root"]) / "out" / name, copy)
    return copy


def truncate(path: Path, size: int = 12) -> str:
    with open(path, "r+b") as handle:
        handle.truncate(size)
    return str(path)


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def surface_vocabulary(transform_dir: Path) -> Path:
    [asset] = [p for p in (transform_dir / "transform_fn" / "assets").iterdir() if "surface" in p.name]
    return asset


def file_hashes(directory: Path):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def staging_leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# The manifest itself.
# ---------------------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_and_verification_names_the_first_bad_one(tmp_path):
    artifact = tmp_path / "artifact"
    (artifact / "sub").mkdir(parents=True)
    (artifact / "a.bin").write_bytes(b"x" * 3000)
    (artifact / "sub" / "b.txt").write_text("hello")
    written = manifest_lib.write_manifest(str(artifact), "query_tokenizer", extra={"version": "v1"})
    assert [(f["path"], f["size"]) for f in written["files"]] == [("a.bin", 3000), ("sub/b.txt", 5)]
    assert written["files"][0]["sha256"] == hashlib.sha256(b"x" * 3000).hexdigest()
    assert written["kind"] == "query_tokenizer" and written["extra"] == {"version": "v1"}
    assert manifest_lib.verify_artifact(str(artifact), "query_tokenizer") == written
    # Same content, same content version; other content, another.
    twin = tmp_path / "twin"
    shutil.copytree(artifact, twin)
    assert manifest_lib.write_manifest(str(twin), "query_tokenizer", extra={"version": "v1"})[
        "content_version"] == written["content_version"]
    (twin / "sub" / "b.txt").write_text("hellO")
    with pytest.raises(ArtifactIntegrityError, match=r"file sub/b.txt .*sha256 does not match") as caught:
        manifest_lib.verify_artifact(str(twin), "query_tokenizer")
    assert str(twin) in str(caught.value) and "\n" not in str(caught.value)
    assert manifest_lib.write_manifest(str(twin), "query_tokenizer")["content_version"] != written["content_version"]

    with pytest.raises(ArtifactIntegrityError, match="describes a query tokenizer, not a SID model"):
        manifest_lib.verify_artifact(str(artifact), "sid_model")
    truncate(artifact / "a.bin", 12)
    with pytest.raises(ArtifactIntegrityError, match="file a.bin is 12 bytes, manifest says 3000"):
        manifest_lib.verify_artifact(str(artifact), "query_tokenizer")
    (artifact / "a.bin").write_bytes(b"x" * 3000)
    (artifact / "stray.txt").write_text("?")
    with pytest.raises(ArtifactIntegrityError, match="file stray.txt is not in the manifest"):
        manifest_lib.verify_artifact(str(artifact), "query_tokenizer")
    (artifact / "stray.txt").unlink()
    shutil.rmtree(artifact / "sub")
    with pytest.raises(ArtifactIntegrityError, match=r"no sub/ directory"):
        manifest_lib.verify_artifact(str(artifact), "query_tokenizer")
    (artifact / manifest_lib.MANIFEST_FILENAME).unlink()
    with pytest.raises(ArtifactIntegrityError, match="has no _MANIFEST.json"):
        manifest_lib.verify_artifact(str(artifact), "query_tokenizer")


def test_staged_writes_replace_only_their_own_artifact_and_a_failure_keeps_the_old_one(tmp_path):
    final = tmp_path / "artifact"

    def write(content, fail=False):
        with manifest_lib.artifact_writer(str(final), "feature_transform") as staged:
            Path(str(staged.path), "data.txt").write_text(content)
            staged.extra["version"] = content
            if fail:
                raise RuntimeError("worker lost")

    write("one")
    assert manifest_lib.verify_artifact(str(final), "feature_transform")["extra"] == {"version": "one"}
    with pytest.raises(RuntimeError, match="worker lost"):
        write("two", fail=True)
    assert (final / "data.txt").read_text() == "one" and not staging_leftovers(tmp_path)
    write("three")
    assert (final / "data.txt").read_text() == "three" and not staging_leftovers(tmp_path)
    manifest_lib.verify_artifact(str(final), "feature_transform")

    # A writer killed mid-swap (old artifact renamed aside, new one not yet in place) and one killed while staging:
    # the next writer on this machine puts the old artifact back and removes the dead writer's staging directory.
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()

    def dead_writers(tag):
        return re.sub(r"\.\d+\.([0-9a-f]{8})$", rf".{dead_pid}.\1", manifest_lib._sibling(str(final), tag))

    os.rename(final, dead_writers("old"))
    os.makedirs(dead_writers("staging"))
    staged = manifest_lib.staged_artifact_dir(str(final), "feature_transform")
    assert (final / "data.txt").read_text() == "three" and staging_leftovers(tmp_path) == [Path(staged).name]
    manifest_lib.discard_staged(staged)
    assert not staging_leftovers(tmp_path)

    foreign = tmp_path / "someones_files"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        manifest_lib.staged_artifact_dir(str(foreign), "feature_transform")
    with pytest.raises(FileExistsError, match="a feature transform, not a SID model"):
        manifest_lib.staged_artifact_dir(str(final), "sid_model")
    assert (foreign / "thesis.tex").read_text() == "do not delete" and not staging_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Loaders refuse damaged artifacts, naming the file.
# ---------------------------------------------------------------------------------------------------------------
def test_every_artifact_records_its_own_version_in_its_manifest(daily_flow, flow_model):
    from tokenminds_model.checkpoints import read_sid_model_config
    from tokenminds_model.model_checkpoints import read_checkpoint_document
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from transforms import features

    out = f"{daily_flow['root']}/out"
    versions = {
        ("sid_model", f"{out}/sid_model"): read_sid_model_config(f"{out}/sid_model")["version"],
        ("query_tokenizer", f"{out}/query_tokenizer"): QueryTokenizer.load(f"{out}/query_tokenizer").version,
        ("feature_transform", f"{out}/feature_transform"): features.read_transform_metadata(
            f"{out}/feature_transform")["transform_fn_version"],
        ("user_model", flow_model): read_checkpoint_document(flow_model)["version"],
    }
    for (kind, directory), version in versions.items():
        manifest = manifest_lib.verify_artifact(directory, kind)
        assert manifest["kind"] == kind and manifest["extra"]["version"] == version
        listed = {entry["path"] for entry in manifest["files"]}
        on_disk = {p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file()}
        assert listed == on_disk - {manifest_lib.MANIFEST_FILENAME}


def test_a_descriptor_whose_version_was_edited_is_refused(daily_flow, tmp_path):
    from transforms import features

    transform = copy_artifact(daily_flow, "feature_transform", tmp_path)
    path = transform / features.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["transform_fn_version"] = "tft-0000000000000000"
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    with pytest.raises(ArtifactIntegrityError, match="recorded version 'tft-0000000000000000' does not match"):
        features.read_transform_metadata(str(transform))


def test_truncated_transform_vocabulary_is_refused_naming_the_file(daily_flow, tmp_path):
    from transforms import features

    transform = copy_artifact(daily_flow, "feature_transform", tmp_path)
    asset = surface_vocabulary(transform)
    truncate(asset)
    relative = asset.relative_to(transform).as_posix()
    expected = re.escape(f"file {relative} is 12 bytes, manifest says")
    with pytest.raises(ArtifactIntegrityError, match=expected) as caught:
        features.read_transform_metadata(str(transform))
    assert str(transform) in str(caught.value) and "refit" in str(caught.value)


def test_truncated_sid_model_file_is_refused_naming_the_file(daily_flow, tmp_path):
    from tokenminds_model.checkpoints import load_sid_model, read_sid_model_config

    model = copy_artifact(daily_flow, "sid_model", tmp_path)
    damaged = largest_file(model / "params")
    truncate(damaged, damaged.stat().st_size // 2)
    relative = damaged.relative_to(model).as_posix()
    for load in (read_sid_model_config, load_sid_model):
        with pytest.raises(ArtifactIntegrityError, match=re.escape(f"SID model {model}: file {relative} is")):
            load(model)


def test_flipped_byte_in_the_query_tokenizer_is_refused_naming_the_file(daily_flow, tmp_path):
    from tokenminds_model.query_tokenizer import MODEL_FILENAME, QueryTokenizer

    tokenizer = copy_artifact(daily_flow, "query_tokenizer", tmp_path)
    QueryTokenizer.load(str(tokenizer))
    data = bytearray((tokenizer / MODEL_FILENAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tokenizer / MODEL_FILENAME).write_bytes(bytes(data))
    expected = re.escape(f"query tokenizer {tokenizer}: file {MODEL_FILENAME} ")
    with pytest.raises(ArtifactIntegrityError, match=expected):
        QueryTokenizer.load(str(tokenizer))


def test_truncated_user_model_params_are_refused_naming_the_file(flow_model, tmp_path):
    from tokenminds_model.model_checkpoints import CheckpointError, load_model, read_checkpoint_document

    model = tmp_path / "model"
    shutil.copytree(flow_model, model)
    damaged = largest_file(model / "params")
    truncate(damaged, damaged.stat().st_size // 2)
    relative = damaged.relative_to(model).as_posix()
    for load in (read_checkpoint_document, load_model):
        with pytest.raises(ArtifactIntegrityError, match=re.escape(f"file {relative} is")) as caught:
            load(model)
        assert isinstance(caught.value, CheckpointError) and str(model) in str(caught.value)


def test_build_examples_stops_with_one_error_line_and_leaves_the_day_untouched(daily_flow, tmp_path):
    out = tmp_path / "out"
    source = Path(daily_flow["root"]) / "out"
    for name in ("sid_model", "query_tokenizer", "feature_transform", "histories", "examples"):
        shutil.copytree(source / name, out / name)
    day = daily_flow["dates"][1]
    examples = out / "examples" / f"date={day}"
    before = file_hashes(examples)
    asset = surface_vocabulary(out / "feature_transform")
    truncate(asset)
    result = subprocess.run([sys.executable, "-m", "pipelines.build_examples", f"--date={day}",
                             f"--output_root={out}", *FNAPI], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert asset.relative_to(out / "feature_transform").as_posix() in errors[0]
    assert str(out / "feature_transform") in errors[0]
    assert file_hashes(examples) == before


# ---------------------------------------------------------------------------------------------------------------
# Writers: refuse folders that are not theirs; replace their own; keep the old artifact when a rewrite fails.
# ---------------------------------------------------------------------------------------------------------------
def run_cli(main, argv, capsys):
    from pipelines.cli import run_main

    with pytest.raises(SystemExit) as caught:
        run_main(main, argv)
    return caught.value.code, capsys.readouterr().err


def test_train_sid_model_refuses_a_folder_with_unrelated_files(daily_flow, tmp_path, capsys):
    from pipelines import train_sid_model

    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    videos = f"--videos={daily_flow['root']}/out/validated/videos"
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(train_sid_model.main, [videos, f"--output={output}", *TINY_SID_MODEL, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and str(output) in err and "Traceback" not in err
        assert (output / "notes.txt").read_text() == "keep me"
        assert sorted(p.name for p in output.iterdir()) == ["notes.txt"] and not staging_leftovers(tmp_path)


def test_train_sid_model_rewrite_replaces_the_model_and_a_failed_one_keeps_it(daily_flow, tmp_path, capsys,
                                                                             monkeypatch):
    from pipelines import train_sid_model
    from tokenminds_model.checkpoints import load_sid_model, read_sid_model_config

    model = copy_artifact(daily_flow, "sid_model", tmp_path)
    old = read_sid_model_config(model)["version"]
    args = [f"--videos={daily_flow['root']}/out/validated/videos", f"--output={model}", *TINY_SID_MODEL]
    # Without --overwrite an existing model is kept (exit 2), before any training.
    code, err = run_cli(train_sid_model.main, args, capsys)
    assert code == 2 and "overwrite" in err and read_sid_model_config(model)["version"] == old

    # A rewrite that fails after the new model was written (here: its metrics) leaves the old one as it was.
    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_sid_model.outputs, "write_text_file", fail)
    with pytest.raises(OSError, match="disk full"):
        train_sid_model.train(train_sid_model.parse_args(args + ["--overwrite"]))
    monkeypatch.undo()
    assert load_sid_model(model).version == old and not staging_leftovers(tmp_path)

    metrics = train_sid_model.train(train_sid_model.parse_args(args + ["--overwrite"]))
    assert metrics["sid_model_version"] != old
    assert read_sid_model_config(model)["version"] == metrics["sid_model_version"]
    assert json.loads((model / "metrics.json").read_text()) == metrics
    assert manifest_lib.verify_artifact(str(model), "sid_model")["extra"]["version"] == metrics["sid_model_version"]
    assert not staging_leftovers(tmp_path)


def test_failed_user_model_rewrite_keeps_the_old_checkpoint(daily_flow, flow_model, tmp_path, monkeypatch):
    from tests.conftest import FLOW_MODEL
    from tokenminds_model import train as train_lib
    from tokenminds_model.model_checkpoints import load_model, read_checkpoint_document

    model = tmp_path / "model"
    shutil.copytree(flow_model, model)
    old = read_checkpoint_document(model)["version"]
    dirs = [f"{daily_flow['root']}/out/examples/date={day}" for day in sorted(daily_flow["stats"])]

    def broken_batches(*_args, **_kwargs):
        raise RuntimeError("preempted")
        yield  # pragma: no cover

    monkeypatch.setattr(train_lib, "training_batches", broken_batches)
    with pytest.raises(RuntimeError, match="preempted"):
        train_lib.train(dirs, str(model), steps=1, batch_size=16, progress=False, tensorboard=False, seed=3,
                        **FLOW_MODEL)
    monkeypatch.undo()
    assert read_checkpoint_document(model)["version"] == old and not staging_leftovers(tmp_path)
    load_model(model)

    result = train_lib.train(dirs, str(model), steps=1, batch_size=16, progress=False, tensorboard=False, seed=3,
                             **FLOW_MODEL)
    assert result.version != old and read_checkpoint_document(model)["version"] == result.version
    assert (model / "_SUCCESS").exists() and not staging_leftovers(tmp_path)


def test_a_transform_from_before_manifests_is_adopted_only_if_it_still_gives_its_version(daily_flow, tmp_path):
    from transforms import features

    legacy = copy_artifact(daily_flow, "feature_transform", tmp_path)
    (legacy / manifest_lib.MANIFEST_FILENAME).unlink()
    with pytest.raises(ArtifactIntegrityError, match="has no _MANIFEST.json.*manifest adopt"):
        features.read_transform_metadata(str(legacy))
    damaged = tmp_path / "damaged"
    shutil.copytree(legacy, damaged)
    truncate(surface_vocabulary(damaged))
    with pytest.raises(ValueError, match="changed after it was fitted"):
        manifest_lib.adopt_legacy_artifact(str(damaged), "feature_transform")
    assert not (damaged / manifest_lib.MANIFEST_FILENAME).exists()

    adopted = manifest_lib.adopt_legacy_artifact(str(legacy), "feature_transform")
    assert features.read_transform_metadata(str(legacy))["transform_fn_version"] == adopted["extra"]["version"]
