"""A sharded index on a 2-node local Ray cluster: shards filled by Ray tasks, one Serve deployment per shard (one per
node), the searcher's scatter-gather answering exactly what one unsharded index over the same data answers, and a
new version swapped in for every shard at once, with queries running through the swap."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from conftest import free_port, wait_for
from test_index import clustered, write_part

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}


@pytest.fixture(scope="module")
def two_nodes(lens_cache):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"index_node": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"index_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR",
             runtime_env={"env_vars": {"LENS_CACHE_DIR": str(lens_cache)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_shards_on_two_nodes_answer_as_one_index_and_swap_together(two_nodes, tmp_path):
    import ray
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService
    from lens.serve.run import deploy
    from ray import serve

    x = clustered(4200, 32, seed=3)
    x, held = x[:4000], x[4000:]
    ids = [f"img-{i}" for i in range(len(x))]
    write_part(tmp_path / "emb" / "part-0.parquet", ids, x)
    m1 = build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index="ivf-flat",
                                 shards=2, queries=50), log=lambda *a: None)
    assert m1["count"] == 4000

    port = int(two_nodes.rsplit(":", 1)[1])
    args = {"pools": [{"name": "Tagger", "model": TINY, "num_cpus": 0.5}],
            "search": {"index": str(tmp_path / "idx"), "shard_deployments": True, "shard_resources": {"index_node": 1},
                       "shard_num_cpus": 0.25, "num_cpus": 0.25, "refresh_s": 0.5}}
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "sharded", "route_prefix": "/sharded", "import_path": "lens.serve.app:build_app",
                             "args": args, "deployments": [{"name": "Tagger"}]}]}
    deploy(doc, where="test sharded app", timeout_s=300)
    url = f"{two_nodes}/sharded"

    # one shard replica per node
    nodes = {i: serve.get_deployment_handle(f"IndexShard{i}", "sharded").node_id.remote().result() for i in (0, 1)}
    assert len(set(nodes.values())) == 2 and set(nodes.values()) <= {n["NodeID"] for n in ray.nodes()}, nodes

    # the same answers as ONE unsharded index over the same data: the shards' trained quantizer, every vector in
    # it, searched with the same nprobe (sharding must change nothing but where the lists live)
    import faiss
    from lens.index.store import load_version, write_version

    sharded = load_version(tmp_path / "idx")
    shard0 = load_version(sharded.path / sharded.manifest["shards"][0], mmap=False)  # in memory: cloneable
    one = faiss.clone_index(shard0.index)
    one.reset()  # trained and empty
    one.add(x)
    meta_of = dict(zip(sharded.ids, sharded.metadata))
    write_version(tmp_path / "one", one, ids, [meta_of[i] for i in ids],
                  {k: v for k, v in sharded.manifest.items() if k not in ("shards", "files", "version", "count", "format")})
    local = SearchService(str(tmp_path / "one"))
    assert local.version.index.ntotal == 4000 and not hasattr(local.version.index, "shards")
    r = requests.post(f"{url}/v1/search:vector?k=10", json={"vectors": held[:20].tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()
    _, expected = local.search(held[:20], 10)
    assert served["index_version"] == m1["version"]
    for got, want in zip(served["results"], expected):
        assert [h["id"] for h in got] == [h.id for h in want]
        assert np.allclose([h["score"] for h in got], [h.score for h in want], atol=1e-5)
    r = requests.get(f"{url}/v1/search/img-7?k=5", timeout=60)  # the vector comes from the shard holding img-7
    assert r.status_code == 200 and "img-7" not in [h["id"] for h in r.json()["results"]], r.text
    assert requests.get(f"{url}/v1/search/nope?k=5", timeout=60).status_code == 404
    # a filter is evaluated by each shard on its own rows: the same answers as the one index's
    flt = {"id": {"prefix": "img-1"}}
    r = requests.post(f"{url}/v1/search:vector?k=10", json={"vectors": held[:5].tolist(), "filter": flt}, timeout=60)
    assert r.status_code == 200, r.text
    _, expected = local.search(held[:5], 10, filter=flt)
    assert [[h["id"] for h in got] for got in r.json()["results"]] == [[h.id for h in w] for w in expected]
    assert all(h["id"].startswith("img-1") for got in r.json()["results"] for h in got)

    # a new version: every shard loads it, then the searcher switches at once; a client queries all along, and
    # every answer is one version's whole answer (never shard 0 of one and shard 1 of the other)
    import threading

    more = clustered(300, 32, seed=4)
    answers: list = []
    stop = threading.Event()

    def query() -> None:
        s = requests.Session()
        while not stop.is_set():
            r = s.post(f"{url}/v1/search:vector?k=50", json={"vector": more[5].tolist()}, timeout=60)
            answers.append((r.status_code, r.json()))

    client = threading.Thread(target=query, daemon=True)
    client.start()
    try:
        wait_for(lambda: len(answers) >= 5, "answers before the new version")
        write_part(tmp_path / "emb" / "part-1.parquet", [f"new-{i}" for i in range(300)], more)
        m2 = build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"),
                                     index="ivf-flat", shards=2, queries=50), log=lambda *a: None)
        searcher = serve.get_deployment_handle("IndexSearcher", "sharded")
        wait_for(lambda: searcher.refresh.remote().result()["index_version"] == m2["version"], "the new version",
                 timeout_s=180)
        n = len(answers)
        wait_for(lambda: len(answers) >= n + 5, "answers after the swap")
    finally:
        stop.set()
        client.join(timeout=60)
    assert {code for code, _ in answers} == {200}
    order = [b["index_version"] for _, b in answers]
    assert order[0] == m1["version"] and order[-1] == m2["version"], order
    assert set(order[order.index(m2["version"]):]) == {m2["version"]}, "an answer went back to the old version"
    # each answer is exactly the first answer of its version: a shard of one version merged with a shard of the
    # other would differ (new-* ids come from both shards)
    whole = {}
    for _, b in answers:
        got = [(h["id"], round(h["score"], 5)) for h in b["results"]]
        assert whole.setdefault(b["index_version"], got) == got, "an answer mixed two versions"
    assert not any(i.startswith("new-") for i, _ in whole[m1["version"]])
    new_ids = [i for i, _ in whole[m2["version"]] if i.startswith("new-")]
    from lens.index.shards import shard_of

    assert new_ids[0] == "new-5" and set(shard_of(new_ids, 2).tolist()) == {0, 1}, new_ids  # both shards' new rows
    info = searcher.info.remote().result()
    assert info["count"] == 4300 and info["shards"] == 2
