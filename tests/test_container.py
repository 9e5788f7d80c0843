"""The container image: the Dockerfile, the Ray version pyproject.toml pins, and the images the KubeRay manifests
name all agree (no docker here: what can be checked without building)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> tuple[dict, list[str]]:
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines() if l.strip() and
             not l.strip().startswith("#")]
    args = {}
    for line in lines:
        m = re.fullmatch(r"ARG (\w+)=(\S+)", line)
        if m:
            args.setdefault(m.group(1), m.group(2))
    return args, lines


def test_the_dockerfile_builds_on_the_pinned_ray_as_a_non_root_user():
    import ray

    args, lines = _dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    low, high = re.search(r">=([\d.]+),<([\d.]+)", pin).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(args["RAY_VERSION"]) < as_tuple(high), (pin, args)
    assert args["RAY_VERSION"] == ray.__version__  # the image's Ray is the one the tests ran on
    froms = [l for l in lines if l.startswith("FROM ")]
    assert froms == ["FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${DEVICE}"]
    assert args["DEVICE"] == "cpu" and args["PYTHON"] == "py311"
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    copied = {l.split()[-2] for l in lines if l.startswith("COPY ")}
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"lens"} | set(setuptools["package-dir"].values())  # every source folder the wheel is built from
    assert folders <= copied and "pyproject.toml" in " ".join(lines) and "LICENSE" in " ".join(lines)
    install = next(l for l in lines if l.startswith("RUN pip install"))
    extras = re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "${RAY_VERSION}" in install


def test_the_manifests_run_the_images_make_image_builds():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tags = set(re.findall(r"-t (\S+)", built))
    assert tags == {f"ghcr.io/your-org/lens:{version}-cpu", f"ghcr.io/your-org/lens:{version}-gpu"}, built
    for path in sorted((ROOT / "infra" / "kuberay").glob("*.yaml")):
        text = path.read_text()
        if yaml.safe_load(text)["kind"] not in ("RayService", "RayJob", "RayCluster"):
            continue  # the NetworkPolicy runs no image
        images = re.findall(r"image:\s*(\S+)", text)
        assert images and set(images) <= tags, (path.name, images)
        doc = yaml.safe_load(text)
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        assert spec["workerGroupSpecs"], path.name
        for group in spec.get("workerGroupSpecs", []):
            for c in group["template"]["spec"]["containers"]:
                wants_gpu = "nvidia.com/gpu" in str(c.get("resources", {}))
                assert c["image"].endswith("-gpu" if wants_gpu else "-cpu"), (path.name, group["groupName"])
