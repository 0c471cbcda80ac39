"""Every pipeline translates into a Dataflow job (Beam's --dry_run: built and translated, nothing submitted).

Inputs are the local outputs of the daily-flow fixture: the drivers read summaries and list partitions before
building a job, and this machine cannot reach GCS. Paths are the only difference from a production job.
"""
from pipelines import (assign_sids, build_examples, fit_feature_transform, train_query_tokenizer,
                       update_histories, validate_inputs)
from tests.helpers import assert_translated, dataflow_args, transform_names


def test_validate_inputs_translates_for_parquet_and_bigquery(daily_flow, translated_jobs):
    root, day = daily_flow["root"], daily_flow["dates"][0]
    assert validate_inputs.run([f"--date={day}", f"--input_root={root}/raw", f"--output_root={root}/dry",
                                *dataflow_args()]) == []
    validate_inputs.run([f"--date={day}", "--source=bigquery", "--bq_project=tokenminds-ci", "--bq_dataset=events",
                         f"--output_root={root}/dry", *dataflow_args()])
    assert_translated(translated_jobs, 2, "Validate watch_events", "WriteSummary")
    assert any("RunParameterizedQuery" in n for n in transform_names(translated_jobs[1]))


def test_sid_and_tokenizer_jobs_translate(daily_flow, translated_jobs):
    root, days = daily_flow["root"], daily_flow["dates"]
    out = f"--output_root={root}/out"
    assign_sids.run([f"--date={days[1]}", out, *dataflow_args()])
    train_query_tokenizer.run([f"--date={days[0]}", out, f"--query_tokenizer={root}/dry/tok", *dataflow_args()])
    assert_translated(translated_jobs, 2)
    assert any("RunInference" in n for n in transform_names(translated_jobs[0]))
    assert any("TrainAndSave" in n for n in transform_names(translated_jobs[1]))


def test_history_feature_and_example_jobs_translate(daily_flow, translated_jobs):
    root, days = daily_flow["root"], daily_flow["dates"]
    out = f"--output_root={root}/out"
    update_histories.run([f"--date={days[1]}", out, *dataflow_args()])
    fit_feature_transform.run([f"--date={days[0]}", out, f"--feature_transform={root}/dry/ft", *dataflow_args()])
    build_examples.run([f"--date={days[1]}", out, *dataflow_args()])
    assert_translated(translated_jobs, 3)
    assert any("FoldHistories" in n for n in transform_names(translated_jobs[0]))
    assert any("Analyze" in n for n in transform_names(translated_jobs[1]))
    assert any("WriteTFRecords" in n for n in transform_names(translated_jobs[2]))
