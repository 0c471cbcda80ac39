"""pipelines.backfill: dependency order, skipping what is up to date (ledger + _SUCCESS), resuming after a crash.

One module fixture backfills the validated sample (300 users, 3 days) the way a backfill from scratch goes: SID model
and query tokenizer first, then validation, SIDs and histories, then the feature transform on the first day's
snapshot, then every step again (only the examples are left to build). Tests that change outputs work on a copy.
"""
import datetime as dt
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from pipelines import backfill
from tests.helpers import FNAPI

SEQUENTIAL_STEPS = "validate_inputs,assign_sids,update_histories"
ALL_STEPS = SEQUENTIAL_STEPS + ",build_examples"
CHEAP_SID_MODEL = ["--kind=rq_kmeans", "--levels=3", "--codebook_size=16"]


def _args(out, dates, raw, artifacts, *extra, steps=ALL_STEPS):
    return [f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--steps={steps}", f"--output_root={out}",
            f"--input_root={raw}", f"--sid_model={artifacts}/sid_model",
            f"--query_tokenizer={artifacts}/query_tokenizer", f"--feature_transform={artifacts}/feature_transform",
            "--backfill_days=1", *FNAPI, *extra]


def _markers(out):
    """Every _SUCCESS under ``out`` with its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in Path(out).rglob("_SUCCESS")}


@pytest.fixture(scope="module")
def backfilled(validated_sample, tmp_path_factory):
    from pipelines import fit_feature_transform, train_query_tokenizer, train_sid_model

    root = tmp_path_factory.mktemp("backfill")
    dates = [dt.date.fromisoformat(str(d)) for d in validated_sample["dates"]]
    validated = f"{validated_sample['root']}/out/validated"
    raw, artifacts, out = f"{validated_sample['root']}/raw", f"{root}/artifacts", f"{root}/out"
    # Artifacts trained before the backfill (the query tokenizer on validated searches of the whole range).
    train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={validated}/videos", f"--date={dates[0]}", f"--output={artifacts}/sid_model", *CHEAP_SID_MODEL]))
    train_query_tokenizer.run([f"--start_date={dates[0]}", f"--end_date={dates[-1]}", f"--output_root={root}/scratch",
                               f"--validated_root={validated}", f"--query_tokenizer={artifacts}/query_tokenizer",
                               "--query_vocab_size=200", *FNAPI])
    first = backfill.run(_args(out, dates, raw, artifacts, steps=SEQUENTIAL_STEPS))
    # The feature transform is fitted on the first day's snapshot, then the examples can be built.
    fit_feature_transform.run([f"--date={dates[0]}", f"--output_root={out}",
                               f"--feature_transform={artifacts}/feature_transform", *FNAPI])
    second = backfill.run(_args(out, dates, raw, artifacts))
    return {"out": out, "raw": raw, "artifacts": artifacts, "dates": dates, "first": first, "second": second}


def _copy(backfilled, tmp_path):
    """A private copy of the backfilled output tree (mtimes kept, so its ledgers stay valid)."""
    out = tmp_path / "out"
    shutil.copytree(backfilled["out"], out)
    return str(out)


def _run(backfilled, out, *extra, steps=ALL_STEPS):
    return backfill.run(_args(out, backfilled["dates"], backfilled["raw"], backfilled["artifacts"], *extra,
                              steps=steps))


# ---------------------------------------------------------------------------------------------------------------
# Planning, without running anything.
# ---------------------------------------------------------------------------------------------------------------
def test_options_are_sorted_to_their_steps(capsys):
    steps = backfill.load_steps(["update_histories", "build_examples"])
    common, runner = backfill.split_passthrough(
        ["--input_root=/raw", "--backfill_days", "1", "--max_targets=1", "--runner=FnApiRunner",
         "--direct_num_workers", "2"], steps)
    assert common == ["--input_root=/raw"]
    assert runner == ["--runner=FnApiRunner", "--direct_num_workers", "2"]
    assert steps["update_histories"].args == ["--backfill_days", "1"]
    assert steps["build_examples"].args == ["--max_targets=1"]
    for bad, message in [(["--max_target=1"], "did you mean --max_targets"),
                         (["--date=2026-01-01"], "--start_date/--end_date"),
                         (["--dry_run"], "--dry_plan")]:
        with pytest.raises(ValueError, match=message):
            backfill.split_passthrough(bad, backfill.load_steps(["build_examples"]))
    steps = backfill.load_steps(["update_histories"])
    assert backfill.split_passthrough(["--max_targets=1"], steps) == ([], [])  # another step's option: dropped
    assert steps["update_histories"].args == []
    warnings = capsys.readouterr().err
    assert "--max_targets is an option of build_examples and refresh_users, not among --steps" in warnings
    assert "--input_root is read by none of --steps; ignored" in warnings


def test_fingerprint_ignores_runner_options_spelling_and_location():
    steps = backfill.load_steps(["build_examples"])
    step = steps["build_examples"]

    def options(root, *argv):
        return backfill.fingerprint_options(step, ["--date=2026-01-02", f"--output_root={root}", *argv], root)

    assert options("/a") == options("/b/c", "--max_targets", "8")  # the default, spelt out; another root
    assert options("/a") != options("/a", "--max_targets=1")
    assert "seed" in options("/a") and "output_root" not in options("/a")
    assert options("/a", "--sid_model=/a/sid_model") == options("/a")  # artifacts count by version, not path


def test_planned_steps_without_a_module_yet_are_refused(tmp_path):
    from pipelines import daily_plan

    missing = [t.name for t in daily_plan.TASKS if importlib.util.find_spec(t.module) is None]
    if not missing:
        pytest.skip("every planned step has its module now")
    with pytest.raises(ValueError, match="not available"):
        backfill.run(["--start_date=2026-01-01", "--end_date=2026-01-02", f"--steps={missing[0]}",
                      f"--output_root={tmp_path}", "--dry_plan"])


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------
def test_backfill_runs_every_step_once_in_dependency_order(backfilled):
    d0, d1, d2 = backfilled["dates"]
    first, second = backfilled["first"], backfilled["second"]
    assert first.ran() == [("validate_inputs", d0), ("assign_sids", d0), ("update_histories", d0),
                           ("validate_inputs", d1), ("assign_sids", d1), ("update_histories", d1),
                           ("validate_inputs", d2), ("assign_sids", d2), ("update_histories", d2)]
    # The full backfill skips what the first one did; day D-1's examples follow day D's histories; the last day's
    # examples wait for a snapshot of the day after the range.
    assert second.ran() == [("build_examples", d0), ("build_examples", d1)]
    assert [item.key for item in second.items if item.action == backfill.SKIP] == first.ran()
    assert [item.key for item in second.items][6] == ("build_examples", d0)
    assert second.actions()[("build_examples", d2)] == backfill.DEFERRED
    out = Path(backfilled["out"])
    for step, day in first.ran() + second.ran():
        ledger = json.loads((out / "_backfill" / step / f"date={day}.json").read_text())
        assert ledger["step"] == step and ledger["date"] == str(day) and not ledger["adopted"]
    sid_version = json.loads((Path(backfilled["artifacts"]) / "sid_model" / "config.json").read_text())["version"]
    ledger = json.loads((out / "_backfill" / "build_examples" / f"date={d1}.json").read_text())
    assert ledger["versions"]["sid_model"] == sid_version and ledger["options"]["max_targets"] == 8
    assert (out / "examples" / f"date={d1}" / "_SUCCESS").exists()


def test_identical_backfill_skips_everything(backfilled, tmp_path, capsys):
    out = _copy(backfilled, tmp_path)  # another root: ledgers hold paths relative to it
    before = _markers(out)
    result = _run(backfilled, out, "--direct_num_workers=1")  # runner options are not fingerprinted
    assert result.ran() == []
    assert {item.action for item in result.items} == {backfill.SKIP, backfill.DEFERRED}
    assert _markers(out) == before
    assert "result: 11 skipped, 1 deferred" in capsys.readouterr().out


def test_changed_option_reruns_only_that_step(backfilled, tmp_path):
    d0, d1, _ = backfilled["dates"]
    out = _copy(backfilled, tmp_path)
    before = _markers(out)
    result = _run(backfilled, out, "--max_targets=1")
    assert result.ran() == [("build_examples", d0), ("build_examples", d1)]
    assert all("max_targets 8->1" in item.reason for item in result.items if item.action == backfill.RUN)
    after = _markers(out)
    assert {k for k in before if before[k] != after[k]} == {f"examples/date={d0}/_SUCCESS",
                                                            f"examples/date={d1}/_SUCCESS"}
    stats = json.loads((Path(out) / "examples" / f"date={d1}" / "stats.json").read_text())
    assert stats["examples"]["mean_targets_per_example"] <= 1.0
    assert _run(backfilled, out, "--max_targets=1").ran() == []


def test_deleted_success_plans_that_day_and_what_depends_on_it(backfilled, tmp_path):
    d0, d1, d2 = backfilled["dates"]
    out = _copy(backfilled, tmp_path)
    (Path(out) / "histories" / f"date={d1}" / "_SUCCESS").unlink()  # day d1's snapshot never finished
    planned = _run(backfilled, out, "--dry_plan")
    # The day itself, the next snapshot (folded from it), and the examples whose window holds either; no more.
    assert [(item.key, item.reason) for item in planned.items if item.action == backfill.RUN] == [
        (("update_histories", d1), "output incomplete (no _SUCCESS)"),
        (("build_examples", d0), f"input re-runs: update_histories {d1}"),
        (("update_histories", d2), f"input re-runs: update_histories {d1}"),
        (("build_examples", d1), f"input re-runs: update_histories {d1}, update_histories {d2}")]


def test_interruption_resumes_with_only_what_did_not_finish(backfilled, tmp_path, monkeypatch, capsys):
    from pipelines import build_examples

    _, d1, d2 = backfilled["dates"]
    out = _copy(backfilled, tmp_path)
    (Path(out) / "histories" / f"date={d2}" / "_SUCCESS").unlink()  # the last snapshot never finished
    real_run = build_examples.run

    def crash(argv):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(build_examples, "run", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        _run(backfilled, out)
    printed = capsys.readouterr().out
    assert "plan: 2 run, 9 skip, 1 deferred" in printed  # the snapshot and the examples that look into it
    assert "FAILED" in printed and "run the same command again to resume" in printed
    assert (Path(out) / "histories" / f"date={d2}" / "_SUCCESS").exists()  # redone before the crash

    monkeypatch.setattr(build_examples, "run", real_run)
    resumed = _run(backfilled, out)  # redoes only what did not finish
    assert resumed.ran() == [("build_examples", d1)]
    reasons = {item.key: item.reason for item in resumed.items}
    assert reasons[("build_examples", d1)] == f"input changed since its run: update_histories/{d2}"
    assert reasons[("update_histories", d2)].startswith("up to date")
    assert _run(backfilled, out, "--dry_plan").ran() == []
    assert all(item.action != backfill.RUN for item in _run(backfilled, out, "--dry_plan").items)


def test_dry_plan_prints_without_running(backfilled, capsys):
    out = backfilled["out"]
    ledgers = {p: p.read_text() for p in Path(out, "_backfill").rglob("*.json")}
    before = _markers(out)
    result = _run(backfilled, out, "--max_targets=2", "--dry_plan")
    printed = capsys.readouterr().out
    assert result.dry_plan and result.ran() == []
    assert "dry plan: nothing was run" in printed and "plan: 2 run, 9 skip, 1 deferred" in printed
    assert "fingerprint changed: --max_targets 8->2" in printed
    forced = _run(backfilled, out, "--force=build_examples", "--dry_plan")
    assert [i.key for i in forced.items if i.action == backfill.RUN] == [
        ("build_examples", d) for d in backfilled["dates"][:2]]
    assert _markers(out) == before
    assert {p: p.read_text() for p in Path(out, "_backfill").rglob("*.json")} == ledgers


def test_adopt_existing_records_outputs_written_elsewhere(backfilled, tmp_path):
    d0 = backfilled["dates"][0]
    out = _copy(backfilled, tmp_path)
    shutil.rmtree(Path(out) / "_backfill" / "validate_inputs")  # as if the daily DAG had validated the days
    plain = _run(backfilled, out, "--dry_plan")
    assert plain.actions()[("validate_inputs", d0)] == backfill.RUN
    assert plain.actions()[("build_examples", d0)] == backfill.RUN  # everything downstream would follow
    adopted = _run(backfilled, out, "--adopt_existing")
    assert adopted.ran() == []
    assert [i.key for i in adopted.items if i.status == "adopted"] == [
        ("validate_inputs", d) for d in backfilled["dates"]]
    assert all(a != backfill.RUN for a in _run(backfilled, out, "--dry_plan").actions().values())


def test_new_sid_model_reruns_sids_histories_and_examples(backfilled, tmp_path):
    from pipelines import train_sid_model

    dates = backfilled["dates"]
    validated = Path(backfilled["out"]) / "validated" / "videos"
    train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={validated}", f"--date={dates[0]}", f"--output={tmp_path}/sid_model", "--kind=rq_kmeans",
         "--levels=3", "--codebook_size=8"]))
    result = _run(backfilled, backfilled["out"], f"--sid_model={tmp_path}/sid_model", "--dry_plan")
    actions = result.actions()
    assert {actions[("validate_inputs", d)] for d in dates} == {backfill.SKIP}
    for step in ("assign_sids", "update_histories"):
        assert {actions[(step, d)] for d in dates} == {backfill.RUN}
    assert [actions[("build_examples", d)] for d in dates] == [backfill.RUN, backfill.RUN, backfill.DEFERRED]
    assert "sid_model version" in next(i.reason for i in result.items if i.key == ("assign_sids", dates[0]))


def test_training_is_planned_after_the_examples(backfilled, tmp_path):
    if importlib.util.find_spec("tokenminds_model.train") is None:
        pytest.skip("tokenminds_model.train does not exist yet")
    d0, d1, d2 = backfilled["dates"]
    out = backfilled["out"]
    result = _run(backfilled, out, "--dry_plan", steps="build_examples,train")
    items = {item.key: item for item in result.items}
    assert [item.key for item in result.items] == [("build_examples", d0), ("train", d0), ("build_examples", d1),
                                                   ("train", d1), ("build_examples", d2), ("train", d2)]
    # No checkpoint exists before the first day: it trains from scratch (no --init_from); the next day continues
    # from it; the last day's examples wait.
    assert items[("train", d0)].action == backfill.RUN and items[("train", d0)].first_day
    assert items[("train", d0)].argv == [f"--examples={out}/examples/date={d0}", f"--output={out}/models/date={d0}"]
    assert items[("train", d2)].action == backfill.DEFERRED
    assert items[("train", d1)].argv == [f"--examples={out}/examples/date={d1}", f"--init_from={out}/models/date={d0}",
                                         f"--output={out}/models/date={d1}"]
    # With a checkpoint of an earlier day, the range's first day is no first day: it needs the day before.
    copy = _copy(backfilled, tmp_path)
    earlier = Path(copy) / "models" / f"date={d0 - dt.timedelta(days=2)}"
    earlier.mkdir(parents=True)
    (earlier / "_SUCCESS").write_text("")
    blocked = {item.key: item for item in _run(backfilled, copy, "--dry_plan", steps="build_examples,train").items}
    assert blocked[("train", d0)].action == backfill.BLOCKED and not blocked[("train", d0)].first_day
    assert "needs train" in blocked[("train", d0)].reason
    with pytest.raises(ValueError, match="cannot run"):
        _run(backfilled, copy, steps="build_examples,train")
