"""Static checks of everything under cluster/ and the root Dockerfile: nothing here starts a cluster.

- Ray cluster launcher configs (cluster/*.yaml) go through the same steps as `ray up`: `prepare_config` (fill
  the provider's defaults, merge setup commands, check docker, per-type worker bounds) and `validate_config`
  (jsonschema against `ray/autoscaler/ray-schema.json`, then the head/worker-bound checks). AWS `node_config`s
  are also checked against botocore's EC2 RunInstances input shape, which is what Ray passes them to.
- KubeRay manifests (cluster/kuberay/*.yaml) are validated against the CRD OpenAPI schemas vendored in
  tests/cluster/schemas/ with jsonschema, plus a strict walk that rejects keys the schema does not declare (CRD
  schemas rarely set additionalProperties: false, so jsonschema alone lets typos through), plus the subset of
  the KubeRay operator's own spec validation (ray-operator/controllers/ray/utils/validation.go) that a file
  can violate.
- The RayService serveConfigV2 is parsed with Ray Serve's `ServeDeploySchema` and walked strictly the same way
  (Serve's pydantic models ignore unknown keys), and compared with serve/config.yaml when that exists.
- RayJob entrypoints use only the flags of their ray_jobs/ script and fit the GPUs of their cluster.

Every check is also shown to fail on a deliberately broken copy, so a green run means something.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

# Ray Serve's own models emit pydantic deprecation warnings on import; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
KUBERAY_VERSION = "v1.7.0"
SCHEMAS = Path(__file__).resolve().parent / "schemas" / f"kuberay-{KUBERAY_VERSION}"
RAY_VERSION = "2.60.0"

LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted(KUBERAY.glob("*.yaml"))
KIND_SCHEMA = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayService": "rayservice"}
# metadata is `type: object` with no properties in the CRD schemas (the API server checks ObjectMeta itself).
OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}
# KubeRay's limits on metadata.name (controllers/ray/utils/constant.go) and the DNS-1035 label it requires.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# The entrypoints the cluster runs: script -> (required flags, optional flags). Flags taking no value: --resume.
JOB_FLAGS = {
    "ray_jobs/build_dataset.py": (
        {"--out"},
        {"--num-objects", "--catalogue", "--workers", "--gpus-per-worker", "--resume", "--config", "--storage-options"},
    ),
    "ray_jobs/train_vae.py": (
        {"--data", "--out"},
        {"--workers", "--gpus-per-worker", "--resume", "--config", "--storage-options"},
    ),
    "ray_jobs/train_align.py": (
        {"--data", "--vae", "--out"},
        {"--workers", "--gpus-per-worker", "--resume", "--config", "--storage-options"},
    ),
    "ray_jobs/generate_batch.py": (
        {"--ckpt", "--prompts", "--out"},
        {"--workers", "--gpus-per-worker", "--batch-size", "--views", "--resume", "--config", "--storage-options"},
    ),
}
BOOLEAN_FLAGS = {"--resume"}
URI_FLAGS = {"--out", "--data", "--vae", "--catalogue", "--ckpt", "--prompts"}
SERVE_IMPORT_PATH = "serve.app:app"
SERVE_DEPLOYMENTS = {"Generator", "Renderer", "Refiner"}


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------------------------
def launcher_errors(config: dict[str, Any]) -> list[str]:
    """What `ray up` would reject in this config, checked offline; empty when it passes."""
    from click import ClickException  # Ray's cli_logger.abort raises it
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, KeyError, AssertionError, RuntimeError, ClickException) as e:
        return [f"{type(e).__name__}: {getattr(e, 'message', e)}"]
    errors = []
    if config["provider"]["type"] == "aws":
        for name, node_type in prepared["available_node_types"].items():
            errors += [f"{name}: {e}" for e in aws_node_config_errors(node_type["node_config"])]
    return errors


def aws_node_config_errors(node_config: dict[str, Any]) -> list[str]:
    """Check a node_config against EC2 RunInstances the way Ray's AWS provider sends it."""
    import botocore.session
    from botocore.validate import ParamValidator

    params = copy.deepcopy(node_config)
    # Ray resolves its own SubnetIds to one SubnetId and adds the counts before calling create_instances.
    if "SubnetIds" in params:
        params["SubnetId"] = params.pop("SubnetIds")[0]
    params.update(MinCount=1, MaxCount=1)
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate(params, shape)
    return [report.generate_report()] if report.has_errors() else []


def load_launcher(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_launcher_files_exist():
    names = {p.name for p in LAUNCHER_FILES}
    assert "aws.yaml" in names and ({"gcp.yaml", "local.yaml"} & names), names


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_validates(path: Path):
    config = load_launcher(path)
    assert launcher_errors(config) == []
    # The image every node runs is the one built from the repo's Dockerfile.
    assert config["docker"]["image"].endswith("/p2n:latest"), config["docker"]["image"]


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda c: c.update(idle_timeout_minute=c.pop("idle_timeout_minutes")), "top-level typo"),
        (lambda c: c["docker"].update(pull_befor_run=True), "docker typo"),
        (lambda c: c["docker"].pop("image"), "docker without image"),
        (lambda c: c.update(max_workers="24"), "wrong type"),
        (lambda c: c["available_node_types"]["gpu_1x"].update(min_worker=0), "node type typo"),
        (lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5), "fractional resource"),
        (lambda c: c["available_node_types"]["gpu_1x"].pop("resources"), "missing resources"),
        (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=30), "min_workers over global max_workers"),
        (lambda c: c["available_node_types"]["gpu_1x"]["node_config"].update(InstanceTyp="g5.xlarge"), "EC2 typo"),
        (lambda c: c["available_node_types"]["head"]["node_config"].update(IamInstanceProfile="p2n"), "EC2 type"),
        (lambda c: c.update(head_node_type="gpu_2x"), "unknown head type"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_launcher_check_rejects_broken_copy(mutate, why):
    config = load_launcher(CLUSTER / "aws.yaml")
    mutate(config)
    assert launcher_errors(config), f"a config with a {why} passed validation"


def test_launcher_local_config_rejects_typo():
    path = CLUSTER / "local.yaml"
    if not path.exists():
        pytest.skip("cluster/local.yaml not present")
    config = load_launcher(path)
    config["auth"]["ssh_privatekey"] = config["auth"].pop("ssh_private_key")
    assert any("ssh_privatekey" in e for e in launcher_errors(config))
    config = load_launcher(path)  # `provider` admits any key, so a typo there is caught by Ray's local setup
    config["provider"]["worker_ip"] = config["provider"].pop("worker_ips")
    assert any("worker_ips" in e for e in launcher_errors(config))


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------------------------
_SCHEMA_CACHE: dict[str, dict[str, Any]] = {}


def crd_schema(kind: str) -> dict[str, Any]:
    name = KIND_SCHEMA[kind]
    if name not in _SCHEMA_CACHE:
        _SCHEMA_CACHE[name] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return _SCHEMA_CACHE[name]


def undeclared_keys(value: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Keys of `value` that `schema` does not declare where it lists its properties and admits no others.

    An object schema with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` is closed: the API server prunes (or, with strict field validation,
    rejects) any other key, so a typo there silently loses the setting. Maps (`additionalProperties: {schema}`)
    are walked with that schema; open objects are not walked.
    """
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        closed = props is not None and extra is None and not schema.get("x-kubernetes-preserve-unknown-fields")
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                yield from undeclared_keys(sub, props[key], where)
            elif isinstance(extra, dict):
                yield from undeclared_keys(sub, extra, where)
            elif closed:
                yield where
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from undeclared_keys(item, schema["items"], f"{path}[{i}]")
    for combinator in ("allOf", "anyOf", "oneOf"):
        for sub_schema in schema.get(combinator, []):
            if "properties" in sub_schema or "items" in sub_schema:
                yield from undeclared_keys(value, sub_schema, path)


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    """Everything the API server (schema) and the KubeRay operator (spec validation) would reject."""
    kind = doc.get("kind")
    if kind not in KIND_SCHEMA:
        return [f"kind {kind!r} is not one of {sorted(KIND_SCHEMA)}"]
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: use ray.io/v1"]
    schema = crd_schema(kind)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    errors += [f"{k}: not declared by the {kind} CRD schema" for k in undeclared_keys(doc, schema)]
    meta = doc.get("metadata") or {}
    errors += [f"metadata.{k}: not an ObjectMeta field" for k in set(meta) - OBJECT_META_KEYS]
    if errors:  # the API server stops here; the operator only sees objects that passed the schema
        return errors
    name = meta.get("name", "")
    if not DNS1035.match(name) or len(name) > MAX_NAME_LENGTH[kind]:
        errors.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} chars")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        errors += rayjob_spec_errors(spec)
        cluster_spec = spec.get("rayClusterSpec")
    else:
        cluster_spec = spec if kind == "RayCluster" else spec.get("rayClusterConfig")
    if cluster_spec:
        errors += raycluster_spec_errors(cluster_spec)
    return errors


# Container resource names p2n's pods use; anything else is most likely a typo (`nvidia.com/gpus`) that leaves a
# pod unschedulable rather than failing validation.
KNOWN_RESOURCES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}


@functools.cache
def ray_start_options() -> frozenset[str]:
    """The long options of `ray start`: KubeRay turns each rayStartParams key into `--key=value`."""
    from ray.scripts.scripts import start

    return frozenset(opt[2:] for param in start.params for opt in param.opts if opt.startswith("--"))


def raycluster_spec_errors(spec: dict[str, Any]) -> list[str]:
    """The KubeRay operator's ValidateRayClusterSpec, for what a manifest can get wrong."""
    errors = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errors.append(f"{name}: the pod template needs at least one container")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            errors.append(f"{name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported; use the group's labels field")
        # p2n's own checks: a typo in either fails only when the pod starts (or never schedules).
        for key in set(params) - ray_start_options():
            errors.append(f"{name}: rayStartParams[{key!r}] is not a `ray start` option")
        for container in containers:
            for section in ("limits", "requests"):
                for key in set((container.get("resources") or {}).get(section) or {}) - KNOWN_RESOURCES:
                    errors.append(f"{name}: resources.{section}[{key!r}] is not a resource p2n expects")
        if name == "head":
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{name}: set minReplicas and maxReplicas when autoscaling is off")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        if n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            errors.append(f"{name}: replicas {n} outside [{lo}, {hi}]")
    return errors


def rayjob_spec_errors(spec: dict[str, Any]) -> list[str]:
    """The KubeRay operator's ValidateRayJobSpec, for what a manifest can get wrong."""
    errors = []
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(runtime_env, dict):
            errors.append(f"runtimeEnvYAML is not a mapping: {runtime_env!r}")
    except yaml.YAMLError as e:
        errors.append(f"runtimeEnvYAML is not YAML: {e}")
    return errors


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in KUBERAY_FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


MANIFESTS = load_manifests()


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in MANIFESTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return copy.deepcopy(found[0])


def cluster_spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


def all_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec_of(doc)
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def test_vendored_schemas_are_v1_openapi():
    for name in KIND_SCHEMA.values():
        schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        assert schema["type"] == "object" and {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
    assert KUBERAY_VERSION in (SCHEMAS.parent / "README.md").read_text()


def test_kuberay_manifest_set_is_complete():
    names = {p.name for p in KUBERAY_FILES}
    assert {
        "raycluster.yaml",
        "rayjob-build-dataset.yaml",
        "rayjob-train-vae.yaml",
        "rayjob-train-align.yaml",
        "rayjob-generate-batch.yaml",
        "rayservice.yaml",
    } <= names, names
    assert sorted(d["kind"] for _, d in MANIFESTS) == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayJob",
                                                        "RayService"]


@pytest.mark.parametrize("where, doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_kuberay_manifest_validates(where: str, doc: dict[str, Any]):
    assert kuberay_errors(doc) == [], where


BROKEN_MANIFESTS = [
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(rayStartParam=d["spec"]["headGroupSpec"].pop(
        "rayStartParams")), "headGroupSpec.rayStartParam:"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(replica=d["spec"]["workerGroupSpecs"][0].pop(
        "replicas")), "workerGroupSpecs[0].replica:"),
    ("RayCluster", lambda d: d["spec"].update(enableInTreeAutoscaler=True), "enableInTreeAutoscaler"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
        resource={}), "containers[0].resource:"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"].update(
        medum="Memory"), "medum"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update(
        {"object-store-memory": 4294967296}), "is not of type 'string'"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].update(memory="14 GB"), "does not match"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=20), "minReplicas 20"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update(
        {"object-store-memroy": "1"}), "not a `ray start` option"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].update({"nvidia.com/gpus": 1}), "nvidia.com/gpus"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    ("RayCluster", lambda d: d["metadata"].update(name="P2N_cluster"), "DNS-1035"),
    ("RayCluster", lambda d: d["metadata"].update(label={}), "ObjectMeta"),
    ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
    ("RayJob", lambda d: d["spec"].update(runtimeEnvYAML="working_dir: [/app"), "runtimeEnvYAML"),
    ("RayJob", lambda d: d["spec"].update(ttlSecondsAfterFinished="600"), "is not of type 'integer'"),
    ("RayService", lambda d: d["spec"].update(serveConfig=d["spec"].pop("serveConfigV2")), "spec.serveConfig:"),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"].update(rayVerison="2.60.0"), "rayVerison"),
]


@pytest.mark.parametrize("kind, mutate, expect", BROKEN_MANIFESTS, ids=[e for _, _, e in BROKEN_MANIFESTS])
def test_kuberay_check_rejects_broken_copy(kind, mutate, expect):
    doc = manifest(kind, "p2n-build-dataset" if kind == "RayJob" else None)
    assert kuberay_errors(doc) == []
    mutate(doc)
    errors = kuberay_errors(doc)
    assert any(expect in e for e in errors), errors


def test_strict_walk_alone_catches_what_jsonschema_misses():
    """jsonschema by itself accepts a typo'd key in a CRD (no additionalProperties: false): the walk does not."""
    doc = manifest("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["replica"] = doc["spec"]["workerGroupSpecs"][0].pop("replicas")
    schema = crd_schema("RayCluster")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc)) == []
    assert list(undeclared_keys(doc, schema)) == ["spec.workerGroupSpecs[0].replica"]


def test_every_pod_runs_the_same_image_and_ray_version():
    images, versions = set(), set()
    for _, doc in MANIFESTS:
        versions.add(cluster_spec_of(doc)["rayVersion"])
        for group in all_groups(doc):
            images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    launcher_images = {load_launcher(p)["docker"]["image"].rsplit("/", 1)[-1] for p in LAUNCHER_FILES}
    assert versions == {RAY_VERSION}
    assert len(images) == 1 and launcher_images == {next(iter(images)).rsplit("/", 1)[-1]}, (images, launcher_images)


def test_installed_ray_matches_manifests():
    import ray

    assert ray.__version__ == RAY_VERSION, f"ray {ray.__version__} installed; manifests say {RAY_VERSION}"


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    assert m, f"cannot read the quantity {quantity!r}"
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


@pytest.mark.parametrize("where, doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_object_store_fits_shm_and_memory(where: str, doc: dict[str, Any]):
    for group in all_groups(doc):
        name = group.get("groupName", "head")
        store = int(group["rayStartParams"]["object-store-memory"])
        pod = group["template"]["spec"]
        shm_volumes = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] ==
                       "/dev/shm"}
        shm = [v["emptyDir"] for v in pod.get("volumes", []) if v["name"] in shm_volumes]
        assert len(shm) == 1 and shm[0].get("medium") == "Memory", f"{where} {name}: no memory-backed /dev/shm"
        limit = _bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        assert store <= _bytes(shm[0]["sizeLimit"]) < limit, f"{where} {name}: object store, /dev/shm, memory limit"
        assert store <= 0.5 * limit, f"{where} {name}: object store over half the pod's memory"


@pytest.mark.parametrize("where, doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_s3_credentials_come_from_the_secret(where: str, doc: dict[str, Any]):
    for group in all_groups(doc):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key], f"{where}: {key} is written into the manifest"
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "p2n-s3", "key": key}


def test_raycluster_autoscales_gpu_groups():
    spec = manifest("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and group["minReplicas"] < group["maxReplicas"], group["groupName"]


# ---------------------------------------------------------------------------------------------------------------
# RayJob entrypoints
# ---------------------------------------------------------------------------------------------------------------
def parse_entrypoint(entrypoint: str) -> tuple[str, dict[str, str | bool]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", f"entrypoint should start with `python`: {entrypoint}"
    script, flags, i = argv[1], {}, 2
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"unexpected argument {flag!r} in {entrypoint}"
        if flag in BOOLEAN_FLAGS:
            flags[flag], i = True, i + 1
        else:
            flags[flag], i = argv[i + 1], i + 2
    return script, flags


def entrypoint_errors(entrypoint: str, cluster_spec: dict[str, Any]) -> list[str]:
    script, flags = parse_entrypoint(entrypoint)
    if script not in JOB_FLAGS:
        return [f"{script}: not one of {sorted(JOB_FLAGS)}"]
    required, optional = JOB_FLAGS[script]
    errors = [f"{script}: unknown flag {f}" for f in set(flags) - required - optional]
    errors += [f"{script}: missing {f}" for f in required - set(flags)]
    errors += [f"{f} {flags[f]}: not an s3:// URI" for f in URI_FLAGS & set(flags) if not str(flags[f]).startswith(
        "s3://")]
    if script.endswith("build_dataset.py") and ("--num-objects" in flags) == ("--catalogue" in flags):
        errors.append("build_dataset.py takes one of --num-objects and --catalogue")
    gpus_wanted = int(flags.get("--workers", 1)) * float(flags.get("--gpus-per-worker", 0))
    gpus_there = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in cluster_spec.get("workerGroupSpecs", [])
    )
    if gpus_wanted > gpus_there:
        errors.append(f"--workers x --gpus-per-worker = {gpus_wanted:g} GPUs > {gpus_there} in the job's cluster")
    return errors


JOBS = [(w, d) for w, d in MANIFESTS if d["kind"] == "RayJob"]


@pytest.mark.parametrize("where, doc", JOBS, ids=[w for w, _ in JOBS])
def test_rayjob_entrypoint_uses_the_script_flags(where: str, doc: dict[str, Any]):
    spec = doc["spec"]
    assert entrypoint_errors(spec["entrypoint"], spec["rayClusterSpec"]) == [], where
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/app"  # the code's place in the image


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ("--workers 16", "--workers 17", "GPUs >"),
        ("--num-objects 5000", "--num-object 5000", "unknown flag --num-object"),
        ("--num-objects 5000", "--num-objects 5000 --catalogue s3://b/c.json", "one of --num-objects"),
        ("--out s3://", "--out /tmp/", "not an s3:// URI"),
        ("build_dataset.py", "build_datasets.py", "not one of"),
    ],
)
def test_entrypoint_check_rejects_broken_copy(old: str, new: str, expect: str):
    spec = manifest("RayJob", "p2n-build-dataset")["spec"]
    assert old in spec["entrypoint"]
    errors = entrypoint_errors(spec["entrypoint"].replace(old, new), spec["rayClusterSpec"])
    assert any(expect in e for e in errors), errors


@pytest.mark.parametrize("script", sorted(JOB_FLAGS))
def test_job_scripts_define_the_flags_the_manifests_use(script: str):
    path = ROOT / script
    if not path.exists():
        pytest.skip(f"{script} does not exist yet; its flags are checked once it does")
    text = path.read_text()
    used = set()
    for _, doc in JOBS:
        s, flags = parse_entrypoint(doc["spec"]["entrypoint"])
        if s == script:
            used |= set(flags)
    for readme_script, flags in readme_job_commands():
        if readme_script == script:
            used |= set(flags)
    missing = sorted(f for f in used if f"'{f}'" not in text and f'"{f}"' not in text)
    if missing:  # flags may be generated (e.g. from config dataclasses): ask the script itself
        import subprocess
        import sys

        help_text = subprocess.run(
            [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
        missing = [f for f in missing if not re.search(rf"{re.escape(f)}(?![-\w])", help_text)]
    assert not missing, f"{script} does not define {missing}, which cluster/ uses"


def readme_job_commands() -> list[tuple[str, dict[str, str | bool]]]:
    """Every `python ray_jobs/...` command in cluster/README.md, parsed."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for m in re.finditer(r"python (ray_jobs/\S+\.py)([^\n`]*)", text):
        args = re.split(r"\s+(?=[A-Z_]+=|#|&&|\|)", m.group(2))[0]  # stop at a comment or a next command
        commands.append(parse_entrypoint(f"python {m.group(1)} {args}"))
    return commands


def test_readme_job_commands_use_known_flags():
    commands = readme_job_commands()
    assert {s for s, _ in commands} == set(JOB_FLAGS)
    for script, flags in commands:
        required, optional = JOB_FLAGS[script]
        assert required <= set(flags) <= required | optional, (script, sorted(flags))


# ---------------------------------------------------------------------------------------------------------------
# Ray Serve config (RayService serveConfigV2 and serve/config.yaml)
# ---------------------------------------------------------------------------------------------------------------
def _model_classes(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _model_classes(arg)]


def serve_unknown_keys(value: Any, model: type, path: str = "") -> Iterator[str]:
    """Keys Ray Serve's schema models do not define (they ignore unknown keys, so a typo is silently lost)."""
    if not isinstance(value, dict):
        return
    fields = model.model_fields
    names = {f.alias or n: f for n, f in fields.items()} | dict(fields)
    for key, sub in value.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            yield where
            continue
        annotation = names[key].annotation
        models = _model_classes(annotation)
        if len(models) != 1:
            continue
        if isinstance(sub, dict):
            yield from serve_unknown_keys(sub, models[0], where)
        elif isinstance(sub, list):
            for i, item in enumerate(sub):
                yield from serve_unknown_keys(item, models[0], f"{where}[{i}]")


def serve_config_errors(config: Any) -> list[str]:
    """What `serve deploy` would reject, and the keys it would silently drop."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [f"serve config is not a mapping: {config!r}"]
    try:
        parsed = ServeDeploySchema.model_validate(config)
        # DeploymentSchema keeps autoscaling_config as a plain dict; Serve builds the model when it deploys.
        for app in parsed.applications:
            for dep in app.deployments:
                if isinstance(dep.autoscaling_config, dict):
                    AutoscalingConfig.model_validate(dep.autoscaling_config)
    except ValidationError as e:
        return [str(e)]
    return [f"{k}: not a Ray Serve config field" for k in serve_unknown_keys(config, ServeDeploySchema)]


def rayservice_serve_config() -> dict[str, Any]:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for app in config["applications"] for d in app.get("deployments", [])}


def test_rayservice_serve_config_validates():
    config = rayservice_serve_config()
    assert serve_config_errors(config) == []
    (app,) = config["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert str(app["args"]["ckpt"]).startswith("s3://")
    assert set(deployments(config)) == SERVE_DEPLOYMENTS
    for name, dep in deployments(config).items():
        assert dep["ray_actor_options"]["num_gpus"] > 0 and "autoscaling_config" in dep, name


def _generator(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]["deployments"][0]


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda c: c["applications"][0].update(import_pth="serve.app:app"), "applications[0].import_pth"),
        (lambda c: _generator(c).update(num_replica=2), "deployments[0].num_replica"),
        (lambda c: _generator(c)["autoscaling_config"].update(max_replica=2), "max_replica"),
        (lambda c: _generator(c)["ray_actor_options"].update(num_gpu=1), "num_gpu"),
        (lambda c: _generator(c)["ray_actor_options"].update(num_gpus="one"), "num_gpus"),
        (lambda c: _generator(c)["autoscaling_config"].update(min_replicas=-1), "min_replicas"),
        (lambda c: _generator(c)["autoscaling_config"].update(min_replicas=9), "max_replicas (8)"),
        (lambda c: c.update(proxy_locaton="EveryNode"), "proxy_locaton"),
    ],
)
def test_serve_check_rejects_broken_copy(mutate, expect):
    config = rayservice_serve_config()
    mutate(config)
    errors = serve_config_errors(config)
    assert any(expect in e for e in errors), errors


def test_serve_replicas_fit_the_gpu_group():
    """Every replica fits on one pod, and all replicas at max_replicas fit in the worker groups at maxReplicas."""
    config = rayservice_serve_config()
    spec = manifest("RayService")["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = [
        (int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)), g["maxReplicas"])
        for g in spec["workerGroupSpecs"]
    ]
    per_replica = {name: d["ray_actor_options"]["num_gpus"] for name, d in deployments(config).items()}
    assert max(per_replica.values()) <= max(gpus for gpus, _ in groups), per_replica
    wanted = sum(d["autoscaling_config"]["max_replicas"] * per_replica[n] for n, d in deployments(config).items())
    assert wanted <= sum(gpus * pods for gpus, pods in groups), wanted


def test_rayservice_mirrors_serve_config_yaml():
    path = ROOT / "serve" / "config.yaml"
    if not path.exists():
        pytest.skip("serve/config.yaml does not exist yet; the RayService is checked against it once it does")
    local = yaml.safe_load(path.read_text())
    assert serve_config_errors(local) == [], "serve/config.yaml"
    ours = rayservice_serve_config()
    assert [a["import_path"] for a in local["applications"]] == [a["import_path"] for a in ours["applications"]]
    assert [a.get("name") for a in local["applications"]] == [a.get("name") for a in ours["applications"]]
    assert set(deployments(local)) == set(deployments(ours)), (sorted(deployments(local)), sorted(deployments(ours)))
    assert set(deployments(ours)) == SERVE_DEPLOYMENTS


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------------
def test_dockerfile_installs_in_the_documented_order():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-ubuntu", text, re.M)
    assert "python3.11" in text and "ARG TCNN_CUDA_ARCHITECTURES" in text
    torch_at = text.index('pip install "torch==${TORCH_VERSION}"')
    tcnn_at = text.index("pip install --no-build-isolation")
    p2n_at = text.index("pip install -c /opt/torch-constraints.txt -e '.[all]'")
    assert torch_at < tcnn_at and torch_at < p2n_at
    assert "ENV PYTHONPATH=/app" in text and "WORKDIR /app" in text  # serve.app:app and working_dir: /app
    # The launcher configs reinstall into the image with the same constraints file.
    for path in LAUNCHER_FILES:
        for command in load_launcher(path).get("head_setup_commands", []):
            if "pip install" in command:
                assert "-c /opt/torch-constraints.txt" in command, (path.name, command)


def test_dockerfile_extras_and_ray_pin_match_pyproject():
    import tomllib

    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("pyproject.toml does not exist yet")
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    assert "all" in extras, sorted(extras)
    ray_pins = [r for r in extras.get("ray", []) if r.replace(" ", "").startswith("ray[")]
    assert ray_pins and all(r.endswith(f"=={RAY_VERSION}") for r in ray_pins), ray_pins  # = the image's rayVersion
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
