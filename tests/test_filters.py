"""Filtered search: the filter language (against a row-by-row reference), and search inside the filter on every
index type (results match the filter, recall against exact search over the filtered subset, k answers however
selective, delta rows and deletions included)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_index import MODEL, clustered

from lens.errors import InvalidRequestError

DIM = 32
CATEGORIES = [f"c{i}" for i in range(100)]


def reference(meta: dict, id_: str, f: dict) -> bool:
    """The filter language, row by row, as the docs state it."""
    out = True
    for key, val in f.items():
        if key == "and":
            ok = all(reference(meta, id_, x) for x in val)
        elif key == "or":
            ok = any(reference(meta, id_, x) for x in val)
        elif key == "not":
            ok = not reference(meta, id_, val)
        else:
            have = id_ if key == "id" else meta.get(key)
            ok = True
            for op, v in (val.items() if isinstance(val, dict) else [("eq", val)]):
                if have is None:
                    ok = False
                elif isinstance(have, list):
                    ok = ok and (v in have if op == "eq" else bool(set(v) & set(have)))
                elif op == "eq":
                    ok = ok and have == v
                elif op == "ne":
                    ok = ok and have != v
                elif op == "in":
                    ok = ok and have in v
                elif op == "prefix":
                    ok = ok and have.startswith(v)
                else:
                    ok = ok and {"gt": have > v, "gte": have >= v, "lt": have < v, "lte": have <= v}[op]
        out = out and ok
    return out


def rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"s3://photos/{'2025' if i % 3 else '2026'}/{i}.jpg" for i in range(n)]
    meta = []
    for i in range(n):
        m = {"tags": [str(t) for t in rng.choice(["cat", "dog", "car", "cup", "sky"], 2, replace=False)],
             "indexed_at": float(1000 + i)}
        if i % 7:
            m["category"] = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        meta.append(m)
    return ids, meta


FILTERS = [
    {"tags": "cat"},
    {"tags": {"in": ["car", "sky"]}},
    {"category": "c3"},
    {"category": {"in": ["c1", "c2", "c3"]}},
    {"category": {"ne": "c1"}},
    {"indexed_at": {"gte": 1200, "lt": 1300}},
    {"id": {"prefix": "s3://photos/2026/"}},
    {"not": {"tags": "dog"}},
    {"or": [{"category": "c5"}, {"and": [{"tags": "cup"}, {"indexed_at": {"lte": 1050}}]}]},
    {"tags": "cat", "id": {"prefix": "s3://photos/2025/"}},
]


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: json.dumps(f)[:40])
def test_the_columnar_evaluation_matches_the_row_by_row_reference(f):
    from lens.index.filters import MetadataColumns, parse_filter

    ids, meta = rows(600)
    got = MetadataColumns(ids, [json.dumps(m) for m in meta]).mask(parse_filter(json.dumps(f)))
    want = np.array([reference(m, i, f) for i, m in zip(ids, meta)])
    assert got.tolist() == want.tolist() and 0 < want.sum() < len(ids)


@pytest.mark.parametrize("bad,why", [
    ("{", "not JSON"), ("[1]", "non-empty JSON object"), ('{"and": []}', "non-empty list"),
    ('{"tags": {"like": "x"}}', "unknown operator 'like'"), ('{"tags": {"gt": 1}}', "does not apply to a list"),
    ('{"colour": "red"}', "no item has the field 'colour'"), ('{"tags": {"in": "cat"}}', "'in' on 'tags' takes a list"),
    ('{"tags": {"prefix": 3}}', "takes a string"), ('{"indexed_at": {"gte": "x"}}', "numeric field takes a number"),
    (json.dumps({"or": [{"tags": "cat"}] * 100}), "more than 64 conditions"),
    ('{"not": ' * 12 + '{"tags": "cat"}' + "}" * 12, "nested deeper than 8"),
])
def test_a_bad_filter_is_a_400_naming_the_problem(bad, why):
    from lens.index.filters import MetadataColumns, parse_filter

    ids, meta = rows(50)
    cols = MetadataColumns(ids, [json.dumps(m) for m in meta])
    with pytest.raises(InvalidRequestError, match=why) as e:
        cols.mask(parse_filter(bad))
    assert e.value.http_status == 400 and e.value.code == "invalid_filter"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6,000 clustered vectors with metadata (a category of 100, two tags), 200 held-out queries."""
    tmp = tmp_path_factory.mktemp("filtered")
    x = clustered(6200, DIM, seed=11, clusters=60)
    x, held = x[:6000], x[6000:]
    ids, meta = rows(6000, seed=2)
    path = tmp / "emb" / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM),
                             "tags": [[{"label": t, "score": 0.5} for t in m["tags"]] for m in meta],
                             "category": [m.get("category") for m in meta],
                             "indexed_at": [m["indexed_at"] for m in meta]},
                            metadata={b"lens_model_identity": json.dumps(MODEL).encode()}), path)
    # as `lens embed --carry category` writes it: the manifest names the carried column
    (path.parent / "manifest.json").write_text(json.dumps({"files": ["part-0.parquet"], "model_identity": MODEL,
                                                           "carry_columns": ["category"]}))
    return tmp, ids, meta, x, held


@pytest.mark.parametrize("gather", [False, True], ids=["inside-the-index", "gathered-rows"])
@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "hnsw", "ivf-pq", "ivf-pq-refine"])
def test_filtered_search_returns_k_matching_items_at_every_selectivity_with_recall(tmp_path, corpus, kind, gather,
                                                                                   monkeypatch):
    """Both ways a filtered search runs: inside the index (an ID-selector bitmap, IVF's nprobe widened, HNSW's exact
    storage below 10 %) and, for selections small enough, over their rows gathered once."""
    import lens.index.search as search
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    monkeypatch.setattr(search, "GATHER_FLOATS", 10**9 if gather else 0)

    tmp, ids, meta, x, held = corpus
    (tmp_path / "emb").symlink_to(tmp / "emb")
    # ivf-pq: PQ's own scores; ivf-pq-refine: its candidates re-ranked with SQ8 codes (the selector goes to PQ)
    index, refine = ("ivf-pq", "sq8" if kind == "ivf-pq-refine" else "none") if kind.startswith("ivf-pq") else (kind,
                                                                                                              "auto")
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index=index,
                            refine=refine, queries=100, target_recall=0.8 if kind == "ivf-pq" else 0.95),
                log=lambda *a: None)
    svc = SearchService(str(tmp_path / "idx"))
    assert svc.version.manifest["type"] == index and svc.version.manifest["refine"] == (
        "sq8" if kind == "ivf-pq-refine" else None)
    for f in ({"tags": "cat"}, {"category": {"in": CATEGORIES[:10]}}, {"category": "c3"},
              {"indexed_at": {"lt": 1006}}):
        match = np.array([reference(m, i, f) for i, m in zip(ids, meta)])
        sel = np.flatnonzero(match)
        k = min(10, len(sel))
        truth = [set(np.asarray(ids)[sel[np.argsort(-(x[sel] @ q))[:k]]]) for q in held[:50]]
        _, hits = svc.search(held[:50], k, filter=f)
        assert all(len(hs) == k and all(match[ids.index(h.id)] for h in hs) for hs in hits), f
        recall = np.mean([len({h.id for h in hs} & t) / k for hs, t in zip(hits, truth)])
        floor = 0.75 if kind == "ivf-pq" else 0.9  # PQ's codes cap recall (its build targets 0.8)
        assert recall >= floor, (kind, f, recall, len(sel))


def test_the_filter_applies_to_the_delta_and_by_id_and_with_deletions(tmp_path, corpus):
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    tmp, ids, meta, x, held = corpus
    build_index(BuildConfig(embeddings=[str(tmp / "emb")], output=str(tmp_path / "idx"), index="ivf-flat",
                            queries=50), log=lambda *a: None)
    svc = SearchService(str(tmp_path / "idx"))
    svc.add_rows(["s3://photos/new/a.jpg", "s3://photos/new/b.jpg"], held[:2],
                 [json.dumps({"tags": ["zebra"], "sequencer": "0A"}), json.dumps({"tags": ["cat"]})])
    _, hits = svc.search(held[:2], 5, filter={"tags": "zebra"})  # a field value only the delta has
    assert [[h.id for h in hs] for hs in hits] == [["s3://photos/new/a.jpg"]] * 2
    _, hits = svc.search(held[1:2], 3, filter={"tags": "cat"})
    assert hits[0][0].id == "s3://photos/new/b.jpg"
    c3 = [i for i, m in zip(ids, meta) if m.get("category") == "c3"]
    _, near = svc.search_id(c3[0], 5, filter={"category": "c3"})
    assert c3[0] not in {h.id for h in near} and {h.id for h in near} <= set(c3)
    svc.delete([(h.id, 10) for h in near])
    _, again = svc.search_id(c3[0], 5, filter={"category": "c3"})
    assert not {h.id for h in again} & {h.id for h in near} and {h.id for h in again} <= set(c3)
    assert len(again) == min(5, len(c3) - 1 - len(near))
    with pytest.raises(InvalidRequestError, match="no item has the field"):
        svc.search(held[:1], 5, filter={"colour": "red"})


def test_custom_tags_from_lens_embed_and_the_event_path_are_filterable(tmp_path):
    """Custom classifiers' tags reach the index as ``custom_tags`` (every head's labels that passed their thresholds)
    from both writers: a lens embed part (a JSON column per row) and an event-path part written by ResultStore."""
    import io

    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService
    from lens.index.source import _chunk
    from lens.serve.events.results import Record, ResultStore
    from lens.serve.events.s3events import ObjectEvent

    x = clustered(120, DIM, seed=5)
    ids = [f"img-{i}" for i in range(120)]

    def heads(i: int) -> str | None:
        if i % 3 == 0:
            return json.dumps({"scenes": [{"label": "coffee", "score": 0.9}], "mood": [{"label": "calm", "score": 0.7}]})
        if i % 3 == 1:  # with custom_top_k: the best tag listed, below its threshold: not the row's tag
            return json.dumps({"scenes": [{"label": "coffee", "score": 0.2, "passed": False}]})
        return None

    path = tmp_path / "emb" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM),
                             "custom_tags": pa.array([heads(i) for i in range(120)], pa.string())},
                            metadata={b"lens_model_identity": json.dumps(MODEL).encode()}), path)
    (path.parent / "manifest.json").write_text(json.dumps({"files": ["part-0.parquet"], "model_identity": MODEL}))
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index="flat",
                            queries=20), log=lambda *a: None)
    svc = SearchService(str(tmp_path / "idx"))
    _, hits = svc.search(x[:5], 60, filter={"custom_tags": "coffee"})
    assert all(len(hs) == 40 and {int(h.id[4:]) % 3 for h in hs} == {0} for hs in hits)
    _, hits = svc.search(x[:1], 60, filter={"and": [{"custom_tags": "calm"}, {"id": {"prefix": "img-3"}}]})
    assert sorted(h.id for h in hits[0]) == sorted(i for i in ids if i.startswith("img-3") and int(i[4:]) % 3 == 0)
    assert hits[0][0].metadata["custom_tags"] == ["calm", "coffee"]

    # the event path's part: the same column, the same metadata
    class Capture:
        body = None

        def put_object(self, **kw):
            Capture.body = kw["Body"]

    ev = ObjectEvent(bucket="b", key="k.jpg", etag="e", version_id=None, size=1, sequencer="01",
                     event_name="ObjectCreated:Put")
    store = ResultStore(Capture(), "lens-tags/", "lens-embeddings/")
    store.write_embeddings([Record(ev, "tagged", tags=[{"label": "espresso", "score": 0.9}], embedding=x[0],
                                   custom_tags={"scenes": [{"label": "coffee", "score": 0.9}]})], MODEL, "b")
    rb = pq.read_table(io.BytesIO(Capture.body)).to_batches()[0]
    assert json.loads(_chunk(rb, DIM).metadata[0])["custom_tags"] == ["coffee"]


def test_lens_index_search_takes_a_filter(tmp_path, corpus, capsys, monkeypatch):
    """`lens index search --filter`: the same answers as the searcher's filtered search; a bad filter exits 2
    naming the problem."""
    from lens.cli.main import main
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService
    from lens.runtime.predictor import Predictor

    tmp, ids, meta, x, held = corpus
    build_index(BuildConfig(embeddings=[str(tmp / "emb")], output=str(tmp_path / "idx"), index="ivf-flat",
                            queries=50), log=lambda *a: None)
    c3 = [i for i, m in zip(ids, meta) if m.get("category") == "c3"]
    argv = ["index", "search", "--index", str(tmp_path / "idx"), "--id", c3[0], "-k", "5"]
    assert main(argv + ["--filter", '{"category": "c3"}']) == 0
    got = [h["id"] for h in json.loads(capsys.readouterr().out)["results"]]
    _, want = SearchService(str(tmp_path / "idx")).search_id(c3[0], 5, filter={"category": "c3"})
    assert got == [h.id for h in want] and len(got) == 5 and set(got) <= set(c3)
    assert main(argv + ["--filter", '{"colour": "red"}']) == 2
    assert "colour" in capsys.readouterr().err
    assert main(argv + ["--filter", "{oops"]) == 2
    assert "JSON" in capsys.readouterr().err
    # an image search: a filter of the wrong shape is refused before the index's model is loaded
    monkeypatch.setattr(Predictor, "from_config", classmethod(lambda cls, cfg: pytest.fail("a model was loaded")))
    image = ["index", "search", "--index", str(tmp_path / "idx"), "--image", str(tmp_path / "none.jpg")]
    assert main(image + ["--filter", '{"category": {"near": "c3"}}']) == 2
    assert "near" in capsys.readouterr().err
