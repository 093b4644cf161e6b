"""The image and the lock agree: the Dockerfile, constraints.txt, the KubeRay manifests' image
tags and rayVersion, and the Ray this environment runs all name one Ray version, and the
environment `make test` built is the one constraints.txt pins (that is how the lock is tested:
no image can be built on these machines)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(
        line.split("==", 1) for line in lines if line and not line.startswith("#") and "==" in line
    )


def test_dockerfile_constraints_manifests_and_ray_name_one_version() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (docker_ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert docker_ray == pins()["ray"] == ray.__version__
    assert "-c /home/ray/constraints.txt" in dockerfile  # installs from the lock
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r" AS (base-\w+)", dockerfile))
    for path in sorted((ROOT / "k8s").glob("ray*.yaml")):
        text = path.read_text()
        tags = set(re.findall(r"image:\s*\S+?:(\d+\.\d+\.\d+)", text))
        assert tags == {docker_ray}, (path.name, tags)
        for doc in yaml.safe_load_all(text):
            spec = (doc or {}).get("spec", {})
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
            if "rayVersion" in cluster:
                assert cluster["rayVersion"] == docker_ray, path.name


def test_this_environment_is_the_locked_one() -> None:
    """`make setup` installs with `-c constraints.txt`: what is pinned is what the tests ran."""
    wrong = {}
    for name, pinned in pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue  # pinned for an extra this environment did not install
        if got != pinned:
            wrong[name] = (pinned, got)
    assert not wrong, f"constraints.txt vs installed (pinned, installed): {wrong}"
    assert "torch" not in pins()  # the installer picks the CPU or the CUDA build


def test_manifests_run_the_project_image_cpu_head_and_submitter_cuda_gpu_workers() -> None:
    """The Dockerfile's image everywhere: its slim CPU variant on the CPU-only head, the submitter
    and the serve pods, the CUDA variant only where GPUs are requested."""
    ray_version = pins()["ray"]
    for path in sorted((ROOT / "k8s").glob("ray*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
            if "headGroupSpec" not in cluster:
                continue
            pods = [cluster["headGroupSpec"]["template"]["spec"]]
            pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
            if "submitterPodTemplate" in spec:
                pods.append(spec["submitterPodTemplate"]["spec"])
            for pod in pods:
                for c in pod["containers"]:
                    repo, tag = c["image"].rsplit(":", 1)
                    gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
                    assert repo.endswith("/shardtune"), (path.name, c["image"])
                    assert tag == f"{ray_version}-{'cuda' if gpu else 'cpu'}", (
                        path.name,
                        c["image"],
                    )
