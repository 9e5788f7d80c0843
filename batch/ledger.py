"""What an output directory of ``lens embed`` has committed: the job's identity, one marker per completed input
shard, and the manifest written last.

Layout::

    OUTPUT/embeddings/<shard>/part-*.parquet   id, embedding fixed_size_list<float32>[dim], tags, carried columns
    OUTPUT/errors/<shard>/part-*.parquet       id, error, message, carried columns
    OUTPUT/_lens/job.json                      model, weights checksum, preprocessing: a resume must match
    OUTPUT/_lens/shards/<shard>.json           committed shard: its counts and part files
    OUTPUT/manifest.json                       written last; present only when every shard is committed

A shard's marker is written (atomically) only after all its rows are in part files, so a killed job loses at
most the shards in flight; a re-run deletes their partial parts and does them again.
"""

from __future__ import annotations

import time

from lens.errors import ConfigError
from lens.identity import ModelIdentity
from lens.storage import Location

__all__ = ["Ledger", "MANIFEST", "FORMAT"]

MANIFEST = "manifest.json"
FORMAT = "lens-embeddings/1"


class Ledger:
    def __init__(self, out: Location) -> None:
        self.out = out

    def _marker(self, key: str) -> str:
        return self.out.path("_lens", "shards", f"{key}.json")

    # -- identity --------------------------------------------------------------------------------
    def claim(self, identity: dict) -> None:
        """Record the job's identity, or check it against the one already there (a resume)."""
        path = self.out.path("_lens", "job.json")
        existing = self.out.read_json(path)
        if existing is None:
            self.out.write_json(path, identity)
            return
        details = _ran_differently(existing, identity)
        existing, identity = _comparable(existing), _comparable(identity)
        details += [f"{k}: {existing.get(k)!r} there, {identity.get(k)!r} now"
                    for k in sorted(set(existing) | set(identity)) if existing.get(k) != identity.get(k)]
        if details:
            details = "; ".join(details)
            raise ConfigError(f"{self.out.uri} holds embeddings from a different job ({details}); "
                              "use a new --output, or delete it to start over")

    # -- shards ----------------------------------------------------------------------------------
    def completed(self) -> dict[str, dict]:
        prefix = self.out.path("_lens", "shards")
        done = {}
        for path in self.out.list_files(prefix):
            if path.endswith(".json"):
                marker = self.out.read_json(path)
                if marker is not None:
                    done[marker["key"]] = marker
        return done

    def reset(self, key: str) -> None:
        """Forget a shard's partial outputs (from an interrupted run) before it is done again."""
        for kind in ("embeddings", "errors"):
            self.out.delete_dir(self.out.path(kind, key))

    def commit(self, key: str, source: str, rows: int, parts: list[dict]) -> dict:
        """Write the shard's marker after removing any file in its directories that is not one of ``parts``."""
        keep = {p["path"] for p in parts}
        for kind in ("embeddings", "errors"):
            for f in self.out.list_files(self.out.path(kind, key)):
                if f not in keep:
                    self.out.delete_file(f)
        marker = {
            "key": key,
            "input": source,
            "rows": rows,
            "embedded": sum(p["rows"] for p in parts if p["kind"] == "embeddings"),
            "errors": sum(p["rows"] for p in parts if p["kind"] == "errors"),
            "files": sorted(self.out.relative(p["path"]) for p in parts if p["kind"] == "embeddings"),
            "error_files": sorted(self.out.relative(p["path"]) for p in parts if p["kind"] == "errors"),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if marker["embedded"] + marker["errors"] != rows:
            raise RuntimeError(f"shard {key}: {marker['embedded']} embedded + {marker['errors']} errors "
                               f"!= {rows} input rows")
        self.out.write_json(self._marker(key), marker)
        return marker

    # -- manifest --------------------------------------------------------------------------------
    def drop_manifest(self) -> None:
        self.out.delete_file(self.out.path(MANIFEST))

    def write_manifest(self, manifest: dict) -> None:
        self.out.write_json(self.out.path(MANIFEST), manifest)


_IDENTITY_KEYS = ("model_identity", "model", "weights_sha256", "num_classes", "embed_dim", "dim", "preprocess")


def _ran_differently(a: dict, b: dict) -> list[str]:
    """``backend``/``precision`` where both job files record them and they differ: a resume on another backend or
    precision would mix its vectors with the first run's under one manifest."""
    try:
        ia, ib = ModelIdentity.from_dict(a), ModelIdentity.from_dict(b)
    except ValueError:
        return []
    return [f"{k}: {getattr(ia, k)!r} there, {getattr(ib, k)!r} now" for k in ("backend", "precision")
            if getattr(ia, k) and getattr(ib, k) and getattr(ia, k) != getattr(ib, k)]


def _comparable(job: dict) -> dict:
    """A job file's fields that must match on resume, its model identity reduced to what makes embeddings
    comparable: a job file written by an earlier version (flat model fields) compares equal to today's."""
    try:
        ident = ModelIdentity.from_dict(job).comparable()
    except ValueError:
        return job
    return {k: v for k, v in job.items() if k not in _IDENTITY_KEYS} | {"model_identity": ident}
