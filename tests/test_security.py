"""Nothing a client sends chooses what the server reads, writes or loads; Lens deletes only what it wrote; concurrent
registry writers never lose each other's work. Attacks as a key holder would craft them: packages on moto's S3
named in the per-request head header, manifests naming files outside their package, a huge package."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import requests
from conftest import at_once, write_head_package

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    import boto3

    client = boto3.client("s3")
    for bucket in ("lens-models", "attacker", "victim-private"):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket="victim-private", Key="creds.txt", Body=b"aws_secret_access_key=do-not-leak")
    return client


def _evil_manifest(files: dict[str, bytes], kind: str = "head") -> bytes:
    """A manifest as an attacker writes it: every entry's digest correct, the names pointing outside."""
    return json.dumps({"format": "lens-package/1", "kind": kind, "name": "evil", "labels": ["a"],
                       "thresholds": [0.0], "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}
                      ).encode()


def test_a_manifest_cannot_name_files_outside_its_package(s3, tmp_path):
    from lens.package import PackageError, open_package

    pwned = tmp_path / "site-packages" / "evil.pth"
    victim = b"aws_secret_access_key=do-not-leak"
    for name in (str(pwned), "../../victim-private/creds.txt", "..\\\\x", "a/../../b", ".hidden", "s3://victim/x"):
        s3.put_object(Bucket="attacker", Key="evilpkg/lens-package.json", Body=_evil_manifest({name: victim}))
        with pytest.raises(PackageError, match="lists file names outside the package") as e:
            open_package("s3://attacker/evilpkg", cache_dir=tmp_path / "cache")
        assert e.value.http_status == 400 and hashlib.sha256(victim).hexdigest()[:12] not in e.value.message
    assert not pwned.exists() and not pwned.parent.exists()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] if (tmp_path / "cache").exists() else []
    assert not any(victim in p.read_bytes() for p in cached)  # nothing of the victim's was copied in
    # and a local package likewise
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "lens-package.json").write_bytes(_evil_manifest({"/etc/passwd": b"x"}))
    with pytest.raises(PackageError, match="outside the package"):
        open_package(str(tmp_path / "local"))


def test_downloads_are_capped_checked_before_the_first_byte_and_never_cached_unverified(s3, tmp_path):
    from lens.package import PackageError, open_package

    big = os.urandom(3 << 20)
    s3.put_object(Bucket="attacker", Key="bigpkg/head.safetensors", Body=big)
    s3.put_object(Bucket="attacker", Key="bigpkg/lens-package.json", Body=_evil_manifest({"head.safetensors": big}))
    with pytest.raises(PackageError, match="holds 3,145,728 bytes; the limit is 1,048,576") as e:
        open_package("s3://attacker/bigpkg", cache_dir=tmp_path / "cache", max_bytes=1 << 20)
    assert e.value.http_status == 413
    # a file that does not match its digest is never renamed into the cache
    # (the last byte flipped: a random file can already end in any fixed byte, 1 run in 256 did)
    s3.put_object(Bucket="attacker", Key="bigpkg/head.safetensors", Body=big[:-1] + bytes([big[-1] ^ 0xFF]))
    with pytest.raises(PackageError, match="does not match its checksum"):
        open_package("s3://attacker/bigpkg", cache_dir=tmp_path / "cache")
    packages = tmp_path / "cache" / "packages"
    assert not packages.exists() or not [p for p in packages.rglob("*") if p.is_file()]


def test_overwrite_replaces_only_a_package_lens_wrote(tmp_path, tiny):
    from lens.package import PackageError, write_package

    precious = tmp_path / "photos"
    (precious / "sub").mkdir(parents=True)
    (precious / "precious.txt").write_text("keep me")
    files = {"head.safetensors": b"x"}
    manifest = {"kind": "head", "name": "h", "labels": ["a"], "thresholds": [0.0], "identity": tiny.identity().to_dict()}
    for overwrite in (False, True):
        with pytest.raises(PackageError, match="does not hold a Lens package"):
            write_package(str(precious), files, manifest, overwrite=overwrite)
    assert (precious / "precious.txt").read_text() == "keep me" and (precious / "sub").is_dir()
    # the package's own source (the data it is made from) is never replaced, nor a folder above it
    pkg = write_package(str(tmp_path / "pkg"), files, manifest)
    (tmp_path / "pkg" / "data").mkdir()
    with pytest.raises(PackageError, match="which the package is made from"):
        write_package(pkg, files, manifest, overwrite=True, keep=(str(tmp_path / "pkg" / "data"),))
    assert (tmp_path / "pkg" / "data").is_dir()
    # a package Lens wrote is replaced with --overwrite
    assert write_package(pkg, {"head.safetensors": b"y"}, manifest, overwrite=True) == pkg
    assert (tmp_path / "pkg" / "head.safetensors").read_bytes() == b"y"


def test_lens_train_never_writes_over_its_data(tmp_path):
    import numpy as np
    from lens.cli import main as cli
    from test_train import write_images

    write_images(tmp_path / "data", {"a": 6, "b": 6}, np.random.default_rng(0), size=(16, 16))
    for output in (tmp_path / "data", tmp_path):
        assert cli.main(["train", "--data", str(tmp_path / "data"), "--output", str(output), "--overwrite",
                         "--model", "test_efficientnet", "--weights", "random"]) == 2
    assert len(list((tmp_path / "data").rglob("*.png"))) == 12


def test_training_data_never_follows_a_link_out_of_its_folder_or_into_a_loop(tmp_path):
    from lens.train.config import TrainConfig
    from lens.train.dataset import discover
    from PIL import Image

    for cls in ("flowers", "cats"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 20)).save(tmp_path / "data" / cls / f"{i}.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "secret.png")
    (tmp_path / "data" / "flowers" / "loop").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "flowers" / "out").symlink_to(outside)
    (tmp_path / "data" / "flowers" / "secret.png").symlink_to(outside / "secret.png")
    (tmp_path / "data" / "flowers" / "alias.png").symlink_to(tmp_path / "data" / "cats" / "0.png")  # inside: kept
    ds = discover(TrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "o")))
    assert ds.counts() == {"cats": 5, "flowers": 6} and len(ds.examples) == 11


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_registry_is_safe_under_concurrent_writers(where, tmp_path, tiny, s3):
    """10 pushes at once: 10 distinct versions, each its own package; 10 alias sets at once: every one in the
    history and in the pointer's previous versions; a corrupted version cannot be made an alias."""
    from lens.package import PackageError
    from lens.registry.store import Registry

    root = str(tmp_path / "models") if where == "local" else f"s3://lens-models/race-{os.getpid()}"
    pkgs = [write_head_package(tmp_path / f"h{i}", tiny.identity(), ["a", "b"], [0.0, 0.0], seed=i) for i in range(10)]
    results = at_once(10, lambda i: Registry(root).push(pkgs[i], name="race", cache_dir=tmp_path / "cache"))
    reg = Registry(root)
    assert sorted(r.version for r in results) == sorted(f"v{i}" for i in range(1, 11)) == sorted(reg.versions("race"))
    for i, r in enumerate(results):  # each version is the package that claimed it
        want = hashlib.sha256(Path(pkgs[i], "head.safetensors").read_bytes()).hexdigest()
        assert reg.manifest("race", r.version)["files"]["head.safetensors"] == want

    at_once(10, lambda i: Registry(root).set_alias("race", "stable", f"v{i + 1}", why=f"set {i}",
                                                   cache_dir=tmp_path / "cache"))
    ptr = reg.alias("race", "stable")
    assert sorted([ptr["version"], *ptr["previous"]]) == sorted(f"v{i}" for i in range(1, 11))  # none lost
    assert len([h for h in reg.history("race") if h["action"] == "alias"]) == 10
    # a corrupted version is refused by alias set
    bad = reg.loc.path("race", "v3", "head.safetensors")
    reg.loc.write_bytes(bad, b"corrupted")
    with pytest.raises(PackageError, match="does not match its checksum"):
        reg.set_alias("race", "canary", "v3", cache_dir=tmp_path / "cache-fresh")
    assert reg.alias("race", "canary") is None


# -- end to end through HTTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(s3, serve_cluster, tiny, tiny_head, tmp_path_factory):
    from lens.serve.run import deploy
    from ray import serve

    from lens.registry.store import Registry

    reg = Registry("s3://lens-models/models")
    reg.push(tiny_head, name="colours", cache_dir=tmp_path_factory.mktemp("push-cache"))
    reg.set_alias("colours", "stable", "v1")
    port = int(serve_cluster.rsplit(":", 1)[1])  # the session's shared Serve cluster (conftest)
    pool = {"name": "Tagger", "model": TINY, "num_cpus": 1, "head_registry": reg.root,
            "heads_allowed": {"local-colours": tiny_head}, "max_head_bytes": 1 << 20}
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "sec", "route_prefix": "/sec", "import_path": "lens.serve.app:build_app",
                             "args": {"pools": [pool]}, "deployments": [{"name": "Tagger"}]}]}
    deploy(doc, where="security test app", timeout_s=300)
    yield f"{serve_cluster}/sec", reg
    serve.delete("sec")


def _tag(url: str, head: str, image: bytes) -> requests.Response:
    return requests.post(f"{url}/v1/tag", data=image, timeout=120,
                         headers={"Content-Type": "image/jpeg", "serve_multiplexed_model_id": head})


def test_a_request_names_a_head_only_by_name_never_by_path_or_uri(app, s3, tmp_path, photos, lens_cache):
    url, reg = app
    image = photos["rocket.jpg"]
    pwned = tmp_path / "pwned.pth"
    # an attacker's package: a manifest entry with an absolute path (a .pth in site-packages would run code)
    s3.put_object(Bucket="attacker", Key="evilpkg/lens-package.json", Body=_evil_manifest({str(pwned): b"import os"}))
    for head in ("s3://attacker/evilpkg", str(tmp_path), "/any/dir/evilhead", "./evilhead", "colours/../../x",
                 "x" * 100, "colours@v1/x"):
        r = _tag(url, head, image)
        assert r.status_code == 400 and r.json()["error"] == "bad_head_id", (head, r.text)
    assert not pwned.exists()
    assert not list(Path(lens_cache).glob("packages/*/" + pwned.name))
    # by name: the operator's allow-list, the operator's registry (stable, or a version)
    for head in ("local-colours", "colours", "colours@v1", "colours@stable"):
        r = _tag(url, head, image)
        assert r.status_code == 200 and r.json()["head"]["id"] == head, r.text
        assert set(r.json()["custom_tags"]) == {"colours"}
    r = _tag(url, "nosuch", image)
    assert r.status_code == 404 and r.json()["error"] == "unknown_head"


def test_a_registry_package_naming_files_outside_itself_or_too_big_is_refused_without_leaks(app, s3, photos,
                                                                                            lens_cache):
    url, reg = app
    victim = b"aws_secret_access_key=do-not-leak"
    # a registry writer's (or package author's) bad version: its manifest names another bucket's object
    prefix = reg.loc.path("stolen", "v1").split("/", 1)[1]  # the key under the registry's bucket
    s3.put_object(Bucket="lens-models", Key=f"{prefix}/lens-package.json",
                  Body=_evil_manifest({"../../../victim-private/creds.txt": victim}))
    r = _tag(url, "stolen@v1", photos["rocket.jpg"])
    assert r.status_code == 404 and r.json()["error"] == "unknown_head", r.text
    assert hashlib.sha256(victim).hexdigest()[:12] not in r.text and "lens-models" not in r.text
    assert not any(victim in p.read_bytes() for p in Path(lens_cache).glob("packages/**/*") if p.is_file())
    # a package over the pool's max_head_bytes (1 MiB here): refused before a byte is fetched
    big = os.urandom(2 << 20)
    prefix = reg.loc.path("huge", "v1").split("/", 1)[1]
    s3.put_object(Bucket="lens-models", Key=f"{prefix}/head.safetensors", Body=big)
    s3.put_object(Bucket="lens-models", Key=f"{prefix}/lens-package.json",
                  Body=_evil_manifest({"head.safetensors": big}))
    r = _tag(url, "huge@v1", photos["rocket.jpg"])
    assert r.status_code == 413 and r.json()["error"] == "unknown_head", r.text


def test_feedback_metric_labels_stay_within_the_served_vocabulary():
    """Labels and versions in feedback are client strings: 10,000 distinct ones make no more series than the
    served classes and versions allow (the rest count as `other`)."""
    from lens.serve.metrics import OTHER, FeedbackMetrics

    class Recorder:
        def __init__(self):
            self.series = set()

        def inc(self, value=1, tags=None):
            self.series.add(tuple(sorted((tags or {}).items())))

        def observe(self, value, tags=None):
            pass

    m = FeedbackMetrics.__new__(FeedbackMetrics)
    m.items, m.classes, m.lag = Recorder(), Recorder(), Recorder()
    vocab = {"labels": {"cat", "dog"}, "versions": {"tagger@v1"}}
    rows = [{"version": f"evil@{i}", "predicted": [f"junk-{i}"], "labels": [f"junk-{i}-x", "cat"],
             "predicted_at": None} for i in range(10_000)]
    rows.append({"version": "tagger@v1", "predicted": ["cat"], "labels": ["dog"], "predicted_at": None})
    m.count(rows, vocab)
    labels = {dict(t)["label"] for t in m.classes.series}
    versions = {dict(t)["version"] for t in m.items.series}
    assert labels <= {"cat", "dog", OTHER} and versions <= {"tagger@v1", OTHER}
    assert len(m.classes.series) <= 3 * 2 * 3  # labels x versions x kinds


def test_current_never_leads_out_of_the_index_root(tmp_path):
    from lens.index.build import BuildConfig, build_index
    from lens.index.store import IndexCorruptError, load_version, use_version
    from test_index import clustered, write_part

    write_part(tmp_path / "emb" / "part-0.parquet", [f"i{n}" for n in range(20)], clustered(20, 8, seed=1))
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index="flat"),
                log=lambda *a: None)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "idx" / "CURRENT").write_text("../elsewhere\n")
    with pytest.raises(IndexCorruptError, match="not a version directory of this index"):
        load_version(tmp_path / "idx")
    with pytest.raises(IndexCorruptError, match="not a version name"):
        use_version(tmp_path / "idx", "../elsewhere")
    assert not elsewhere.exists()


def test_named_cli_failures_are_one_line_exit_2(tmp_path, capsys):
    import subprocess
    import sys

    from lens.cli import main as cli

    (tmp_path / "models" / "x" / "v1").mkdir(parents=True)
    (tmp_path / "models" / "x" / "v1" / "lens-package.json").write_text("{garbage")
    assert cli.main(["models", "list", "--registry", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "lens-package.json is not valid JSON" in err and "internal error" not in err
    assert cli.main(["drift", "report", "--reference", str(tmp_path / "nope"), "--current", str(tmp_path)]) == 2
    assert "no embedding parts under" in capsys.readouterr().err
    env = os.environ | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                        "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([sys.executable, "-m", "lens.cli.main", "models", "list", "--registry", "s3://unreachable/m"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "lens models: error: S3:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
