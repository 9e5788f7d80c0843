"""Serve configs: the shipped profiles validate against Ray's own schema; bad ones fail before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from lens.serve.run import check_serve_config, load_serve_config

from lens.errors import ConfigError

INFRA = Path(__file__).parents[1] / "infra"


@pytest.mark.parametrize("name", ["serve-cpu.yaml", "serve-gpu.yaml"])
def test_shipped_profiles_validate(name):
    schema = check_serve_config(load_serve_config(str(INFRA / name)), name)
    (app,) = schema.applications
    assert app.import_path == "lens.serve.app:build_app"


@pytest.mark.parametrize("name", ["serve-cpu.yaml", "events.yaml"])
def test_shipped_cpu_configs_fit_two_cores_with_search_enabled(name):
    """A laptop VM or a small cloud instance: the shipped CPU configs, with the search section the comments
    describe, fit 2 cores (tests/test_serve_cli.py and tests/test_events_cli.py start them on this machine)."""
    from lens.serve.run import check_resources, resource_demand

    doc = load_serve_config(str(INFRA / name))
    doc["applications"][0]["args"]["search"] = {"index": "some-index", "num_cpus": 0.5}
    check_serve_config(doc, name)
    two_cores = {"total": {"CPU": 2.0}, "nodes": [{"CPU": 2.0}]}
    check_resources(doc, two_cores)  # raises with the arithmetic if it does not fit
    assert sum(d.replicas * d.cpus for d in resource_demand(doc)) == 2.0


def test_gpu_profile_requests_gpus_and_runs_cpu_beside_it():
    from lens.serve.config import AppArgs

    doc = load_serve_config(str(INFRA / "serve-gpu.yaml"))
    args = AppArgs.model_validate(doc["applications"][0]["args"])
    gpu, cpu = args.pools
    assert gpu.model.device == "cuda" and gpu.model.backend == "torch" and 0 < gpu.num_gpus < 1
    assert cpu.model.device == "cpu" and cpu.model.backend == "onnx" and cpu.num_gpus == 0


def test_a_replica_runs_concurrent_batches_each_on_its_share_of_the_cpus():
    """A CPU replica of 2+ CPUs runs two batches at once by default, each on half its CPUs (OpenVINO: a stream
    each); one CPU, a GPU or a pool's own setting decide otherwise; a pool's own num_threads is kept."""
    from lens.serve.config import PoolConfig

    def lanes(cpus, **pool):
        m = PoolConfig(**pool).model_for(cpus)
        return m.streams, m.num_threads

    assert lanes(2) == (2, 1) and lanes(8) == (2, 4) and lanes(1) == (1, 1)
    assert lanes(8, concurrent_batches=4) == (4, 2) and lanes(2, concurrent_batches=1) == (1, 2)
    assert lanes(2, model={"num_threads": 3}) == (2, 3)
    assert lanes(4, num_gpus=0.5, model={"device": "cuda"}) == (1, 4)
    with pytest.raises(ConfigError, match="concurrent_batches"):
        check_serve_config(_doc({"pools": [{"concurrent_batches": 9}]}))
    # two batches of 64 do not fit 64 requests in a replica (Serve's batch queue would warn on every batch)
    big = {"max_batch_size": 64, "max_pending": 128}
    with pytest.raises(ConfigError, match="runs 2 batches at once .* set concurrent_batches: 1"):
        check_serve_config(_doc({"pools": [{"num_cpus": 2}]}, max_ongoing_requests=64, user_config=big))
    check_serve_config(_doc({"pools": [{"num_cpus": 2, "concurrent_batches": 1}]}, max_ongoing_requests=64,
                            user_config=big))


def test_a_batch_closes_once_it_holds_what_the_replica_has_spread_over_the_free_lanes():
    """Serve's batch queue closes a batch at its size limit or its wait timeout; the replica sets the limit from
    the images that can still join (queued + decoding), so eight closed-loop clients never wait out the timeout
    for images that are not coming, two free lanes take half each, and a loaded replica fills max_batch_size."""
    from lens.serve.core import batch_limit

    assert batch_limit(16, lanes=1, running=0, coming=1) == 1  # a lone request: at once
    assert batch_limit(16, lanes=1, running=0, coming=8) == 8  # eight clients: the batch of eight, no timeout
    assert batch_limit(16, lanes=2, running=0, coming=8) == 4  # two free lanes: four each, side by side
    assert batch_limit(16, lanes=2, running=1, coming=8) == 8  # one lane busy: the free one takes all
    assert batch_limit(16, lanes=2, running=2, coming=9) == 9  # both busy: it waits, holding what there is
    assert batch_limit(16, lanes=2, running=0, coming=100) == 16  # under load: full batches


def _doc(args=None, **deployment):
    return {"applications": [{"name": "lens", "route_prefix": "/", "import_path": "lens.serve.app:build_app",
                              "args": args or {}, "deployments": [{"name": "Tagger"} | deployment]}]}


def test_batch_larger_than_ongoing_is_refused():
    with pytest.raises(ConfigError, match="batches could never fill"):
        check_serve_config(_doc(max_ongoing_requests=8, user_config={"max_batch_size": 16, "max_pending": 32}))


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="matches no deployment"):
        check_serve_config({"applications": [{"name": "a", "import_path": "lens.serve.app:build_app",
                                              "deployments": [{"name": "Taggr"}]}]})
    with pytest.raises(ConfigError, match="num_gpus"):
        check_serve_config(_doc({"pools": [{"model": {"device": "cuda"}}]}))
    with pytest.raises(ConfigError, match="unknown_knob|Extra inputs"):
        check_serve_config(_doc({"api": {"unknown_knob": 1}}))
    with pytest.raises(ConfigError, match="not a valid Serve config"):
        check_serve_config({"applications": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="max_batch_size"):
        check_serve_config(_doc(user_config={"max_batch_size": 0}))


def test_api_keys_are_checked_in_constant_time_against_all(tmp_path, monkeypatch):
    from lens.serve.auth import ApiKeys

    monkeypatch.setenv("LENS_TEST_KEYS", "key-aaaaaaaaaaaaaaaa, key-bbbbbbbbbbbbbbbb")
    keys = ApiKeys.load("LENS_TEST_KEYS", None)
    assert keys.enabled and keys.check("key-bbbbbbbbbbbbbbbb") and not keys.check("key-bbbbbbbbbbbbbbbc")
    assert not keys.check(None) and not keys.check("")
    assert not ApiKeys.load("LENS_UNSET_VAR", None).enabled
    monkeypatch.setenv("LENS_TEST_KEYS", "short")
    with pytest.raises(ConfigError, match="16 characters"):
        ApiKeys.load("LENS_TEST_KEYS", None)


def test_batch_size_bounds_are_config_errors_before_any_model_loads(monkeypatch):
    from lens.serve.config import MODEL_MAX_ONGOING_REQUESTS, BatchingConfig

    import lens.runtime.loading
    from lens.runtime.config import validate

    monkeypatch.setattr(lens.runtime.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"max_batch_size \(32\) must be <= max_pending \(16\)"):
        validate(BatchingConfig, {"max_batch_size": 32, "max_pending": 16}, where="test")
    doc = load_serve_config(str(INFRA / "serve-cpu.yaml"))
    doc["applications"][0]["deployments"][0]["user_config"] = {"max_batch_size": 32, "max_pending": 16}
    with pytest.raises(ConfigError, match="max_pending"):
        check_serve_config(doc, "test")
    # the other bound uses the deployments' own default when the config does not override it
    doc["applications"][0]["deployments"][0]["user_config"] = {"max_batch_size": 200, "max_pending": 400}
    doc["applications"][0]["deployments"][0].pop("max_ongoing_requests", None)
    with pytest.raises(ConfigError, match=f"max_ongoing_requests {MODEL_MAX_ONGOING_REQUESTS}"):
        check_serve_config(doc, "test")


def test_lens_log_lines_go_through_serves_replica_handlers_once_and_only_inside_a_replica():
    """Serve writes a replica's log file through the ``ray.serve`` logger's handlers only; Lens's INFO lines must
    reach them (once), and outside a replica (no handler there) logging is left as it was."""
    import logging

    from lens.serve.logs import LOGGERS, to_replica_log

    serve_logger = logging.getLogger("ray.serve")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate, list(logging.getLogger(n).handlers))
             for n in ("ray.serve", *LOGGERS)}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    try:
        serve_logger.handlers = []
        before = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate, list(logging.getLogger(n).handlers))
                  for n in LOGGERS}
        to_replica_log()  # not in a replica: nothing changes
        assert before == {n: (logging.getLogger(n).level, logging.getLogger(n).propagate,
                              list(logging.getLogger(n).handlers)) for n in LOGGERS}
        serve_logger.handlers = [Keep()]
        to_replica_log()
        to_replica_log()  # idempotent: still one handler each
        logging.getLogger("lens.serve").info("client left")
        logging.getLogger("lens.index.search").info("index swapped")
        assert [r.getMessage() for r in records] == ["client left", "index swapped"]
    finally:
        for n, (level, propagate, handlers) in saved.items():
            lg = logging.getLogger(n)
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers


def test_the_events_pool_is_a_deployment_of_its_own_at_the_bulk_niceness_and_counted_and_checked():
    """`lens events run`'s default and infra/events.yaml: events tag through a pool of the events application's
    own (never queued in front of HTTP requests), started at CPU niceness 19 unless it says otherwise, while the
    HTTP pool asks for 0; the pool's CPUs count in the fit check, its batching is checked, and `lens events backfill`
    embeds with its model."""
    import copy

    from lens.cli.events import DEFAULT_EVENTS_CONFIG, events_args, pool_model
    from lens.serve.app import pool_options
    from lens.serve.config import PoolConfig
    from lens.serve.events.app import BULK_NICE
    from lens.serve.run import resource_demand

    for doc in (DEFAULT_EVENTS_CONFIG, load_serve_config(str(INFRA / "events.yaml"))):
        args = events_args(doc)
        assert args.pool is not None and args.pool.name == "TaggerBulk" and args.pool.nice is None
        assert pool_options(args.pool, nice=BULK_NICE)["ray_actor_options"]["runtime_env"] == {
            "env_vars": {"RAY_worker_niceness": "19"}}
        (http_pool,) = doc["applications"][0]["args"]["pools"]
        assert http_pool["nice"] == 0
        assert pool_options(PoolConfig.model_validate(http_pool))["ray_actor_options"]["runtime_env"] == {
            "env_vars": {"RAY_worker_niceness": "0"}}
        assert [d.name for d in resource_demand(doc)] == ["Tagger", "TaggerBulk"]
        assert pool_model(doc) == args.pool.model
    # a pool without nice keeps Ray's worker niceness (no runtime_env of Lens's)
    assert "runtime_env" not in pool_options(PoolConfig())["ray_actor_options"]
    with pytest.raises(ValueError, match="less than or equal to 19"):
        PoolConfig(nice=20)
    # without a pool of its own, the event path embeds with the pool it names
    doc = copy.deepcopy(DEFAULT_EVENTS_CONFIG)
    doc["applications"][0]["args"]["pools"] = [{"name": "Gpu", "model": {"name": "efficientnet_b0"}},
                                               {"name": "Cpu", "model": {"name": "tf_efficientnet_lite0"}}]
    del doc["applications"][1]["args"]["pool"]
    doc["applications"][1]["args"]["tagger_deployment"] = "Cpu"
    assert pool_model(doc).name == "tf_efficientnet_lite0"
    assert [d.name for d in resource_demand(doc)] == ["Gpu", "Cpu"]
    # the events pool's batching is checked against its own deployments: override
    doc = copy.deepcopy(DEFAULT_EVENTS_CONFIG)
    doc["applications"][1]["deployments"] = [{"name": "TaggerBulk", "max_ongoing_requests": 4}]
    with pytest.raises(ConfigError, match="TaggerBulk has max_batch_size 16 > max_ongoing_requests 4"):
        check_serve_config(doc)
