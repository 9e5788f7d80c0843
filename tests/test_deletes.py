"""Deletions: tombstones in the searcher (main index, delta, lookups), in builds, from ``lens index delete``, under
concurrent queries, and in every order of events and builds."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens.errors import NotFoundError

from test_index import MODEL, clustered

DIM = 32


def write_event_part(path, ids, vectors, sequencers) -> None:
    """An event-path embedding part as lens.serve.events.results writes one: ids, vectors and the events'
    sequencers (hex)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(ids), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
                      "top1": ["x"] * len(ids), "sequencer": pa.array(sequencers, pa.string())},
                     metadata={b"lens_model_identity": json.dumps(MODEL).encode()})
    pq.write_table(table, path)


def seq(n: int) -> str:
    return f"{n:016X}"


@pytest.fixture
def setup(tmp_path):
    """An index over 3,000 event-path rows (sequencer 100 each) of 30 clusters, and its searcher."""
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    x = clustered(3000, DIM, seed=4, clusters=30)
    ids = [f"s3://photos/{i}.jpg" for i in range(len(x))]
    write_event_part(tmp_path / "events" / "part-a.parquet", ids, x, [seq(100)] * len(x))
    cfg = BuildConfig(embeddings=[str(tmp_path / "events")], output=str(tmp_path / "idx"), index="ivf-flat",
                      queries=50)
    build_index(cfg, log=lambda *a: None)
    return tmp_path, ids, x, SearchService(str(tmp_path / "idx")), cfg


def answered(svc, q, k=10) -> list[list[str]]:
    return [[h.id for h in hs] for hs in svc.search(q, k)[1]]


def test_a_deleted_id_leaves_answers_lookups_and_thumbnails_and_k_answers_still_come(setup):
    tmp_path, ids, x, svc, _ = setup
    # delete each query's whole top 10: post-filtering would leave nothing; the ID selector still gives 10
    before = answered(svc, x[:5])
    doomed = sorted({i for row in before for i in row})
    assert svc.delete([(i, 200) for i in doomed]) == len(doomed)
    after = answered(svc, x[:5])
    assert all(len(row) == 10 and not set(row) & set(doomed) for row in after), after
    for i in doomed[:3]:
        for call in (svc.vector_of, svc.metadata_of, svc.location_of, lambda i: svc.search_id(i, 3)):
            with pytest.raises(NotFoundError):
                call(i)
    assert svc.info()["tombstones"] == len(doomed)
    # an upload after the deletion (a newer sequencer) is searchable again; a late copy of an older one is not
    svc.add_rows([doomed[0], doomed[1]], x[[ids.index(doomed[0]), ids.index(doomed[1])]],
                 [json.dumps({"sequencer": seq(300)}), json.dumps({"sequencer": seq(150)})])
    row = answered(svc, x[[ids.index(doomed[0])]], 3)[0]
    assert row[0] == doomed[0] and doomed[1] not in answered(svc, x[[ids.index(doomed[1])]], 3)[0]
    assert svc.metadata_of(doomed[0])["sequencer"] == seq(300)


def test_an_overwrite_in_the_delta_replaces_the_main_row_once(setup):
    _, ids, x, svc, _ = setup
    target = ids[7]
    other = clustered(1, DIM, seed=99)[0]  # the object now holds a different image
    svc.add_rows([target], other[None], [json.dumps({"sequencer": seq(200)})])
    hits = svc.search(x[7][None], 10)[1][0]
    assert target not in [h.id for h in hits]  # its old vector no longer answers for it
    hits = svc.search(other[None], 10)[1][0]
    assert hits[0].id == target and [h.id for h in hits].count(target) == 1
    np.testing.assert_allclose(svc.vector_of(target), other / np.linalg.norm(other), atol=1e-6)
    # an older event's row never replaces it
    svc.add_rows([target], x[7][None], [json.dumps({"sequencer": seq(150)})])
    np.testing.assert_allclose(svc.vector_of(target), other / np.linalg.norm(other), atol=1e-6)


def test_a_build_drops_deleted_rows_counts_them_and_keeps_a_newer_upload(setup):
    from lens.index.build import build_index
    from lens.tombstones import write_tombstones

    tmp_path, ids, x, svc, cfg = setup
    # event deletions beside the parts (one then re-uploaded with a newer sequencer), and a manual erasure
    write_tombstones(str(tmp_path / "events"), ids[:3], source="s3-event", sequencers=[seq(200)] * 3)
    write_event_part(tmp_path / "events" / "part-b.parquet", [ids[2]], x[2][None], [seq(300)])
    write_tombstones(str(tmp_path / "idx" / "tombstones"), [ids[10]], source="lens index delete")
    m = build_index(cfg, log=lambda *a: None)
    assert m["count"] == len(ids) - 3 and m["deleted_dropped"] == 3 and m["tombstones"] == 4
    assert svc.refresh()
    for i in (ids[0], ids[1], ids[10]):
        with pytest.raises(NotFoundError):
            svc.metadata_of(i)
    assert svc.metadata_of(ids[2])["sequencer"] == seq(300)


def test_a_build_that_started_before_a_delete_cannot_bring_the_row_back(setup):
    """The race "rebuild during a delete": the build read the parts before the tombstone was written, so its
    version holds the row; the searcher's tombstones (never pruned) still hide it after the swap."""
    from lens.index.build import build_index

    tmp_path, ids, x, svc, cfg = setup
    build_index(cfg, log=lambda *a: None)  # the build ... (it read every row)
    svc.delete([(ids[5], 200)])  # ... while the deletion arrived
    assert svc.refresh()
    assert ids[5] in svc.version.row_of  # the new version still holds the row ...
    assert ids[5] not in {i for row in answered(svc, x[[5]], 10) for i in row}  # ... and it is never returned
    with pytest.raises(NotFoundError):
        svc.vector_of(ids[5])


def test_deletions_while_queries_run_from_several_threads(setup):
    """SearchService shared by query threads and the thread adding deletions: every answer has k hits, none
    hides a row deleted before its query began, and when all is done the answers equal a sequential run's."""
    _, ids, x, svc, _ = setup
    queries = x[:40]
    doomed = sorted({i for row in answered(svc, queries, 5) for i in row})
    bad: list = []
    stop = threading.Event()

    def query(t: int) -> None:
        rng = np.random.default_rng(t)
        while not stop.is_set():
            gone = set(deleted)  # deletions finished before this query starts
            qi = int(rng.integers(len(queries)))
            row = answered(svc, queries[[qi]], 10)[0]
            if len(row) != 10 or set(row) & gone:
                bad.append((qi, row, gone & set(row)))

    deleted: list[str] = []
    threads = [threading.Thread(target=query, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for i in doomed:
        svc.delete([(i, 200)])
        deleted.append(i)
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    from lens.index.search import SearchService

    fresh = SearchService(svc.root)  # sequential: a new service told the same deletions at once
    fresh.delete([(i, 200) for i in doomed])
    assert answered(svc, queries, 10) == answered(fresh, queries, 10)


def test_lens_index_delete_erases_ids_from_the_cli(setup, capsys):
    from lens.cli.main import main
    from lens.index.search import SearchService

    tmp_path, ids, x, svc, _ = setup
    (tmp_path / "erase.txt").write_text(f"{ids[1]}\n\n{ids[2]}\n")
    assert main(["index", "delete", "--index", str(tmp_path / "idx"), ids[0], "--ids-file",
                 str(tmp_path / "erase.txt"), "--reason", "ticket-42"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"] == 3 and "/tombstones/tombstone-" in out["tombstones"]
    again = SearchService(str(tmp_path / "idx"))  # a restarted searcher reads them
    for i in ids[:3]:
        with pytest.raises(NotFoundError):
            again.metadata_of(i)
    t = pq.read_table(out["tombstones"])
    assert t.column("reason").to_pylist() == ["ticket-42"] * 3 and t.column("sequencer").null_count == 3
    # a later event row of an erased id stays erased
    again.add_rows([ids[0]], x[:1], [json.dumps({"sequencer": seq(10**6)})])
    with pytest.raises(NotFoundError):
        again.metadata_of(ids[0])
    assert main(["index", "delete", "--index", str(tmp_path / "idx")]) == 2  # nothing named: a usage error
    assert main(["index", "delete", "--index", str(tmp_path / "nothing"), "x"]) == 2
