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
    # Day D-1 has a snapshot with the same shards and SID model: the shard-by-shard fold, no snapshot shuffle.
    assert any("FoldShards" in n for n in transform_names(translated_jobs[0]))
    assert any("Analyze" in n for n in transform_names(translated_jobs[1]))
    assert any("WriteTFRecords" in n for n in transform_names(translated_jobs[2]))
    # The three snapshots share one shard count: examples are built by a merge join per shard, no snapshot shuffle.
    assert any("BuildExamplesByShard" in n for n in transform_names(translated_jobs[2]))
    assert not any("JoinSnapshots" in n for n in transform_names(translated_jobs[2]))


GPU_ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
GPU_IMAGE = "us-central1-docker.pkg.dev/tokenminds-ci/workers/tokenminds-worker-gpu:ci"


def test_refresh_users_translates_for_dataflow_gpu_workers(daily_flow, flow_model, translated_jobs):
    """refresh_users on Dataflow GPU workers: the accelerator service option and the CUDA worker image
    (Dockerfile.gpu) reach the job, and --users_per_batch=auto is sized for the T4 on the driver."""
    from pipelines import refresh_users
    from tokenminds_model.inference import CPU_BATCH_SIZE, auto_batch_size, dataflow_accelerator
    from tokenminds_model.model import ModelConfig
    from tokenminds_model.model_checkpoints import read_checkpoint_document

    root, day = daily_flow["root"], daily_flow["dates"][-1]
    args = [f"--date={day}", f"--output_root={root}/out", f"--model={flow_model}", *dataflow_args(),
            f"--dataflow_service_options={GPU_ACCELERATOR}", f"--sdk_container_image={GPU_IMAGE}",
            "--experiments=no_use_multiple_sdk_containers"]
    refresh_users.run(args)
    assert_translated(translated_jobs, 1, "RunInference")
    job = translated_jobs[0]
    # The Environment the submission would send (a dry run stops before building it).
    from apache_beam.runners.dataflow.internal import apiclient

    environment = apiclient.Environment(packages=[], options=job.options, environment_version="8",
                                        proto_pipeline_staged_url="gs://tokenminds-ci-bucket/staging/pipeline.pb",
                                        proto_pipeline=job.proto_pipeline).proto
    assert GPU_ACCELERATOR in list(environment.service_options)
    images = [image.container_image for pool in environment.worker_pools
              for image in pool.sdk_harness_container_images]
    assert images and all(image == GPU_IMAGE for image in images)

    options = refresh_users.parse_job_options(args, refresh_users.JOB)
    config = ModelConfig.from_dict(read_checkpoint_document(flow_model)["config"])
    gpu_batch = refresh_users.users_per_batch(options, flow_model)
    assert dataflow_accelerator([GPU_ACCELERATOR]) == ("nvidia-tesla-t4", 1)
    assert gpu_batch == auto_batch_size(config, "gpu", 16 * 2 ** 30) and gpu_batch > CPU_BATCH_SIZE
    cpu_options = refresh_users.parse_job_options(args[:-3], refresh_users.JOB)  # CPU workers
    assert refresh_users.users_per_batch(cpu_options, flow_model) == CPU_BATCH_SIZE
    explicit = refresh_users.parse_job_options(args + ["--users_per_batch=48"], refresh_users.JOB)
    assert refresh_users.users_per_batch(explicit, flow_model) == 48
