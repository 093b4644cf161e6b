"""The Kubernetes manifests in k8s/: strictly valid against the vendored KubeRay CRDs, and wired
together (job file, Secret, ServiceAccount, GPUs, runtime env) the way the project needs."""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from shardtune.cluster.config import load_job_config

from tests import k8s_validate as validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
SECRET_NAMES = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIALS?)(_|$)", re.IGNORECASE
)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def the(name: str, kind: str) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind]
    return doc


def pod_specs(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def cluster_spec(name: str) -> dict:
    """The Ray cluster a manifest file describes: a RayCluster's spec, a RayJob's or a
    RayService's."""
    if name == "rayjob.yaml":
        return the(name, "RayJob")["spec"]["rayClusterSpec"]
    if name == "rayservice.yaml":
        return the(name, "RayService")["spec"]["rayClusterConfig"]
    return the(name, "RayCluster")["spec"]


each_cluster = pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
each_ray_manifest = pytest.mark.parametrize(
    "name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
)


def problems(doc: dict) -> dict[str, str]:
    return dict(validate.check_document(doc))


# ------------------------------------------------------------------------------ vendored CRDs
def test_vendored_crds_match_their_source_note() -> None:
    note = (K8S / "crds" / "SOURCE.md").read_text()
    digests = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", note, re.M)
    )
    assert set(digests) == {p.name for p in (K8S / "crds").glob("*.yaml")}
    for name, digest in digests.items():
        assert hashlib.sha256((K8S / "crds" / name).read_bytes()).hexdigest() == digest, name
    assert "v1.7.0" in note and "Apache License" in (K8S / "crds" / "LICENSE").read_text()


# ------------------------------------------------------------------------- the manifests as is
def test_k8s_holds_the_manifests() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "secret-s3.yaml",
            "secret-ray-token.yaml", "serviceaccount.yaml", "podmonitor.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_strictly_valid(path: Path) -> None:
    found = validate.check_file(path)
    assert not found, "\n".join(map(str, found))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_says_what_it_is_and_how_to_apply_it(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# ") and "kubectl" in text.split("\napiVersion:")[0]


# ------------------------------------------------------------------ the checker is strict
@pytest.fixture
def rayjob() -> dict:
    return copy.deepcopy(the("rayjob.yaml", "RayJob"))


def test_unknown_field_in_rayjob_spec_is_an_error_at_its_path(rayjob: dict) -> None:
    rayjob["spec"]["shutdownAfterJobFinish"] = True
    assert problems(rayjob) == {
        "spec.shutdownAfterJobFinish": "unknown field (did you mean 'shutdownAfterJobFinishes'?)"
    }


def test_unknown_field_deep_in_a_pod_template_is_an_error(rayjob: dict) -> None:
    container = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    container["resource"] = container.pop("resources")
    path = "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resource"
    assert problems(rayjob) == {path: "unknown field (did you mean 'resources'?)"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("replicas", "2", "'2' is not of type 'integer'"),
        ("replicas", 2**31, "is not a 'int32'"),
        ("rayStartParams", {"num-gpus": 8}, "8 is not of type 'string'"),
        ("groupName", ["gpu"], "is not of type 'string'"),
    ],
)
def test_wrong_type_is_an_error(rayjob: dict, field: str, value: object, message: str) -> None:
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][field] = value
    found = problems(rayjob)
    assert len(found) == 1 and message in next(iter(found.values())), found


@pytest.mark.parametrize(
    ("quantity", "ok"), [("500m", True), ("0.5", True), (8, True), (0.5, False), ("lots", False)]
)
def test_int_or_string_quantities(rayjob: dict, quantity: object, ok: bool) -> None:
    spec = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    spec["containers"][0]["resources"]["limits"]["cpu"] = quantity
    assert (problems(rayjob) == {}) is ok


def test_cel_rules_of_the_crd_are_checked(rayjob: dict) -> None:
    rayjob["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert (
        "requires either BOTH onSuccess and onFailure" in problems(rayjob)["spec.deletionStrategy"]
    )


def test_duplicate_list_map_keys_are_errors(rayjob: dict) -> None:
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "AWS_ACCESS_KEY_ID", "value": "x"})
    path = "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env"
    assert "duplicates" in problems(rayjob)[path]


def test_metadata_and_name_rules(rayjob: dict) -> None:
    rayjob["metadata"].update(name="Shardtune_Train", lables={"a": "b"})
    found = problems(rayjob)
    assert found.keys() == {"metadata.name", "metadata.lables"}


def test_deprecated_api_version_is_reported(rayjob: dict) -> None:
    rayjob["apiVersion"] = "ray.io/v1alpha1"
    assert "apiVersion" in problems(rayjob)


def test_core_kinds_are_strict() -> None:
    secret = copy.deepcopy(the("secret-s3.yaml", "Secret"))
    secret["strinData"] = secret.pop("stringData")
    assert problems(secret) == {"strinData": "unknown field (did you mean 'stringData'?)"}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x"},
        "data": {"n": 1},
    }
    assert list(problems(config_map)) == ["data.n"]


def test_unknown_kinds_are_not_passed_silently() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}}
    assert "no schema" in problems(doc)[""]


def test_duplicate_yaml_keys_are_errors() -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: '1'}\ndata: {b: '2'}\n"
    (problem,) = validate.check_text(text, "dup.yaml")
    assert "duplicate key 'data'" in str(problem)


def test_openapi_extensions(tmp_path: Path) -> None:
    """The extensions KubeRay's CRDs use (int-or-string, nullable) and the ones other CRDs use
    (preserve-unknown-fields, embedded resources), on a small CRD of our own."""
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "note": {"type": "string", "nullable": True},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "child": {"type": "object", "x-kubernetes-embedded-resource": True,
                              "properties": {"spec": {"type": "object"}}},
                },
            }
        },
    }  # fmt: skip
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }
    (tmp_path / "widget.yaml").write_text(yaml.safe_dump(crd))
    ok = {
        "port": "http",
        "note": None,
        "free": {"anything": {"goes": 1}},
        "child": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}},
    }

    def check(spec: dict) -> dict[str, str]:
        doc = {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": spec,
        }
        return dict(validate.check_document(doc, crd_dir=tmp_path))

    assert check(ok) == {}
    assert check({**ok, "port": 80}) == {}
    assert list(check({**ok, "port": 1.5})) == ["spec.port"]
    assert list(check({**ok, "child": {"kind": "Pod"}})) == ["spec.child"]  # apiVersion required
    assert list(check({**ok, "child": {**ok["child"], "extra": 1}})) == ["spec.child.extra"]


# ------------------------------------------------------------------------ wiring between them
def test_rayjob_runs_the_job_file_from_its_configmap(tmp_path: Path) -> None:
    job, config_map = the("rayjob.yaml", "RayJob"), the("rayjob.yaml", "ConfigMap")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "shardtune", "train"]  # the image's installed package
    config_path = Path(entry[entry.index("--config") + 1])

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [
        m
        for m in head["containers"][0]["volumeMounts"]
        if m["mountPath"] == str(config_path.parent)
    ]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(config_map["data"][config_path.name])

    shipped = load_job_config(job_file)
    assert shipped == load_job_config(ROOT / "configs" / "cluster-multinode-zero3.yaml")
    assert shipped.cluster.address == "auto"


def test_rayjob_frees_the_gpus_at_once_and_keeps_the_head_of_a_failed_job() -> None:
    spec = the("rayjob.yaml", "RayJob")["spec"]
    # KubeRay rejects deletionRules next to shutdownAfterJobFinishes or a global TTL.
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        condition = dict(rule["condition"])
        ttl = condition.pop("ttlSeconds", 0)
        rules.setdefault(next(iter(condition.values())), {})[rule["policy"]] = ttl
    for outcome in ("SUCCEEDED", "FAILED", "Failed"):  # Failed: the deployment (never ran)
        assert rules[outcome]["DeleteWorkers"] == 0, outcome
        assert rules[outcome]["DeleteCluster"] > 0, outcome  # the head outlives the workers
    assert rules["FAILED"]["DeleteCluster"] >= 3600  # time to read a failed job's logs
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["backoffLimit"] >= 0


def test_rayjob_shows_how_to_gang_schedule_with_kueue() -> None:
    text = (K8S / "rayjob.yaml").read_text()
    assert re.search(r"^\s*# kueue\.x-k8s\.io/queue-name: \S+$", text, re.M)


@each_ray_manifest
def test_every_ray_pod_reads_s3_credentials_from_the_secret(name: str) -> None:
    cluster = cluster_spec(name)
    secret = the("secret-s3.yaml", "Secret")
    for role, pod in pod_specs(cluster):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], (name, role, var)
            assert ref["key"] in secret["stringData"], (name, role, var)
        literal = [n for n, e in env.items() if SECRET_NAMES.search(n) and "value" in e]
        assert not literal, f"{name} {role}: credentials as literal values: {literal}"


@each_ray_manifest
def test_pods_run_as_the_service_account(name: str) -> None:
    cluster = cluster_spec(name)
    account = the("serviceaccount.yaml", "ServiceAccount")["metadata"]["name"]
    assert {pod.get("serviceAccountName") for _, pod in pod_specs(cluster)} == {account}


@each_cluster
def test_gpu_workers_request_gpus_and_the_head_none(name: str) -> None:
    cluster = cluster_spec(name)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {})
    for group in cluster["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


@each_ray_manifest
def test_images_run_the_declared_ray_version(name: str) -> None:
    cluster = cluster_spec(name)
    images = {c["image"] for _, pod in pod_specs(cluster) for c in pod["containers"]}
    assert {re.search(r":(\d+\.\d+\.\d+)", i)[1] for i in images} == {cluster["rayVersion"]}


def test_rayjob_gpus_match_the_job_files_workers() -> None:
    job = the("rayjob.yaml", "RayJob")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    config = load_job_config(ROOT / "configs" / "cluster-multinode-zero3.yaml")
    assert config.cluster.use_gpu and config.cluster.num_workers == gpus


# ----------------------------------------------------------------------------- runtime envs
RUNTIME_ENV = ROOT / "configs" / "runtime_env.yaml"


def check_runtime_env(env: dict) -> None:
    """Only keys Ray knows (RuntimeEnv keeps unknown ones as plugin fields instead of failing)."""
    from ray.runtime_env import RuntimeEnv

    public = RuntimeEnv.known_fields - RuntimeEnv.extensions_fields
    assert set(env) <= public, f"unknown runtime_env keys: {set(env) - public}"
    RuntimeEnv(**env)  # Ray's own validation: types of pip, env_vars, excludes, config
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    secrets = [k for k in env.get("env_vars", {}) if SECRET_NAMES.search(k) or k.startswith("AWS_")]
    assert not secrets, f"credentials do not belong in a runtime env: {secrets}"


def test_runtime_env_file_is_valid_for_ray() -> None:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    check_runtime_env(env)
    assert "working_dir" not in env  # `ray job submit --working-dir .` sets it


def test_runtime_env_pip_mirrors_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d for d in deps if not re.match(r"ray\b", d)]  # the cluster image provides Ray
    assert yaml.safe_load(RUNTIME_ENV.read_text())["pip"] == expected


def test_runtime_env_excludes_keep_the_code_and_drop_the_heavy_dirs() -> None:
    from ray._private.runtime_env.packaging import _get_excludes  # the matcher Ray uploads with

    excluded = _get_excludes(ROOT, yaml.safe_load(RUNTIME_ENV.read_text())["excludes"])
    for kept in [
        "launch.py",
        "data/storage.py",
        "training/loop.py",
        "cluster/job.py",
        "configs/demo.yaml",
    ]:
        assert not excluded(ROOT / kept), kept
    for dropped in [
        ".git/HEAD",
        "venv/bin/python",
        ".venv/lib/x.py",
        "runs/x/ckpt",
        "tests/unit/x.py",
        "cluster/__pycache__/job.pyc",
    ]:
        assert excluded(ROOT / dropped), dropped


def test_rayjob_runtime_env_matches_the_submit_runtime_env() -> None:
    env = yaml.safe_load(the("rayjob.yaml", "RayJob")["spec"]["runtimeEnvYAML"])
    check_runtime_env(env)
    assert env["env_vars"] == yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    # The image holds the code and the locked dependencies; pip/working_dir are the quick path.
    assert not {"pip", "working_dir", "py_modules"} & set(env)


# ------------------------------------------------------------------------------- RayService
def serve_config() -> dict:
    return yaml.safe_load(the("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_valid_for_ray_serve() -> None:
    from ray.serve.schema import ServeDeploySchema
    from shardtune.serving.app import ServeSettings

    config = ServeDeploySchema.model_validate(serve_config())  # Ray's own schema of the file
    (app,) = config.applications
    assert app.import_path == "shardtune.serving.app:build" and app.route_prefix == "/"
    settings = ServeSettings(**app.args)  # the builder's arguments, validated as `serve` does
    assert settings.model.startswith("s3://") and settings.endpoint_url is None
    (deployment,) = app.deployments
    assert deployment.name == "ShardtuneModel"
    scaling = deployment.autoscaling_config
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert deployment.max_queued_requests == settings.max_queued_requests
    assert deployment.max_ongoing_requests == settings.max_ongoing_requests  # as `serve` admits
    assert deployment.ray_actor_options.num_cpus == settings.num_cpus
    check_runtime_env(app.runtime_env)


def test_rayservice_takes_code_and_dependencies_from_the_image() -> None:
    (app,) = serve_config()["applications"]
    assert not {"pip", "working_dir", "py_modules"} & set(app["runtime_env"])
    assert "[serve]" in (ROOT / "Dockerfile").read_text()  # the image installs the serve extra


def test_rayservice_health_and_scaling() -> None:
    spec = the("rayservice.yaml", "RayService")["spec"]
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    (group,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    container = group["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}


# ------------------------------------------------------------------------- token auth
def test_ray_clusters_require_the_token_of_the_secret() -> None:
    secret = the("secret-ray-token.yaml", "Secret")
    assert set(secret["stringData"]) == {"auth_token"}  # the key KubeRay reads
    assert secret["stringData"]["auth_token"].startswith("REPLACE_")  # never a real token
    for name in ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]:
        auth = cluster_spec(name)["authOptions"]
        assert auth == {"mode": "token", "secretName": secret["metadata"]["name"]}, name


def test_rayjob_submitter_sends_the_token() -> None:
    (container,) = the("rayjob.yaml", "RayJob")["spec"]["submitterPodTemplate"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "shardtune-ray-token", "key": "auth_token"}


# ------------------------------------------------------------------------- hardening
def all_pods(name: str) -> Iterator[tuple[str, dict]]:
    yield from pod_specs(cluster_spec(name))
    if name == "rayjob.yaml":
        yield "submitter", the(name, "RayJob")["spec"]["submitterPodTemplate"]["spec"]


@each_ray_manifest
def test_pods_run_unprivileged(name: str) -> None:
    for role, pod in all_pods(name):
        assert pod["securityContext"]["runAsNonRoot"] is True, (name, role)
        assert pod["securityContext"]["runAsUser"] == 1000, (name, role)  # the image's `ray`
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, role)
            assert sc["capabilities"]["drop"] == ["ALL"], (name, role)
            assert not sc.get("privileged"), (name, role)


@each_ray_manifest
def test_scratch_space_is_an_emptydir_within_an_ephemeral_storage_budget(name: str) -> None:
    for role, pod in all_pods(name):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        scratch = ["/tmp"] if role == "submitter" else ["/tmp", "/tmp/ray"]  # Ray's temp dir
        for path in scratch:
            assert mounts[path]["emptyDir"]["sizeLimit"], (name, role, path)
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert requests["ephemeral-storage"] and limits["ephemeral-storage"], (name, role)


@each_ray_manifest
def test_ray_pods_export_metrics_on_the_port_the_podmonitor_scrapes(name: str) -> None:
    monitor = the("podmonitor.yaml", "PodMonitor")["spec"]
    ports = {e["port"] for e in monitor["podMetricsEndpoints"]}
    cluster = cluster_spec(name)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group, (role, pod) in zip(groups, pod_specs(cluster), strict=True):
        assert group["rayStartParams"]["metrics-export-port"] == "8080", (name, role)
        (c,) = pod["containers"]
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named["metrics"] == 8080 and "metrics" in ports, (name, role)
        labels = group["template"]["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items(), (name, role)


def test_podmonitor_is_checked_for_structure() -> None:
    monitor = copy.deepcopy(the("podmonitor.yaml", "PodMonitor"))
    assert problems(monitor) == {}
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    monitor["spec"]["selector"] = {"matchLabel": {"a": "b"}}
    assert set(problems(monitor)) == {
        "spec.podMetricsEndpoints[0].intervall",
        "spec.selector.matchLabel",
    }
    monitor = copy.deepcopy(the("podmonitor.yaml", "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "half a minute"
    assert list(problems(monitor)) == ["spec.podMetricsEndpoints[0].interval"]
