"""Jobs not covered elsewhere also run with worker processes (closures and state must survive pickling) and give
the same artifacts as in one process."""
from pipelines import fit_feature_transform, train_query_tokenizer
from tests.helpers import MULTIPROCESS
from tokenminds_model.query_tokenizer import QueryTokenizer


def test_query_tokenizer_and_feature_transform_with_worker_processes(daily_flow, tmp_path):
    root, days = daily_flow["root"], daily_flow["dates"]
    out = f"--output_root={root}/out"
    meta = train_query_tokenizer.run([f"--start_date={days[0]}", f"--end_date={days[-1]}", out,
                                      "--query_vocab_size=200", f"--query_tokenizer={tmp_path}/tok", *MULTIPROCESS])
    assert meta["version"] == QueryTokenizer.load(f"{root}/out/query_tokenizer").version
    transform = fit_feature_transform.run([f"--date={days[0]}", out, f"--feature_transform={tmp_path}/ft",
                                           *MULTIPROCESS])
    single = fit_feature_transform.features.read_transform_metadata(f"{root}/out/feature_transform")
    assert transform["transform_fn_version"] == single["transform_fn_version"]
    assert transform["num_reference_watches"] == single["num_reference_watches"] > 0
