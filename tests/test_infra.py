"""infra/: the compose stack, the Dockerfiles and the Kubernetes manifests, checked statically
with real validators (no Docker engine or cluster here): the compose specification's schema
(check-jsonschema), hadolint, the Kubernetes OpenAPI schemas (kubernetes-validate), Prefect's
own Kubernetes worker code, Kubeflow Trainer's TrainJob models (kubeflow-trainer-api) and the
legacy training operator's PyTorchJob model. And the environment-variable names they set are
the ones the pipeline reads."""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vae_pipeline.config import load_config
from vae_pipeline.config.environment import ENVIRONMENT, QUIET_OFFLINE, TORCHRUN_ENVIRONMENT

from .conftest import REPO

INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33"  # a Kubernetes release the manifests must be valid for
COMPOSE = INFRA / "compose.yaml"
BASE_JOB_TEMPLATE = INFRA / "k8s" / "prefect-base-job-template.json"
PYTORCHJOB = INFRA / "k8s" / "pytorchjob.yaml"
TRAINJOB = INFRA / "k8s" / "trainjob.yaml"
LOCAL_COMPOSE = INFRA / "podman" / "compose.local.yaml"
# Variables of Python and pip themselves, set in the images.
GENERIC = {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
PIPELINE_NAMES = set(ENVIRONMENT) | set(QUIET_OFFLINE)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


# --- compose ---------------------------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )


def test_compose_file_validates_against_the_compose_specification(tmp_path):
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator does reject what the specification forbids: a misspelt key, a wrong type.
    for break_it in (
        lambda d: d["services"]["worker"].update(depends_onn=["mlflow"]),
        lambda d: d["services"]["mlflow"].update(restart=5),
    ):
        broken = _compose()
        break_it(broken)
        (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
        assert _check_compose(tmp_path / "compose.yaml").returncode == 1


def test_compose_declares_health_checks_start_order_and_the_gpu_reservation():
    services = _compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow", "prefect", "worker"}
    for name in ("postgres", "minio", "mlflow", "prefect"):
        assert services[name]["healthcheck"]["test"], name
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "prefect": {"condition": "service_healthy"},
    }
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    # MLflow answers the Host headers it is reached by: the worker's and the published port's.
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    # with the default ports (${VAR:-default} is compose's interpolation)
    allowed = re.sub(
        r"\$\{[A-Z_]+:-([^}]*)\}",
        r"\1",
        services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"],
    ).split(",")
    worker_host = urlsplit(services["worker"]["environment"]["MLFLOW_TRACKING_URI"]).netloc
    for host in (worker_host, "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "elsewhere.example:5000")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Published ports listen on the loopback interface only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    # The worker polls the pool the deployments are created on, and versions data in the bucket.
    cfg = load_config(REPO / "params.yaml")
    command = " ".join(services["worker"]["command"])
    assert f"--pool {cfg.orchestration.work_pool} " in command
    assert "vae-pipeline deploy --workdir /var/lib/vae-pipeline" in command
    assert services["worker"]["volumes"] == ["worker:/var/lib/vae-pipeline"]
    # Files the services mount or build from exist.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), source
        if "build" in service:
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_credentials_come_from_the_git_ignored_env_file():
    text = COMPOSE.read_text() + LOCAL_COMPOSE.read_text()
    # ${VAR} is compose's interpolation; $${VAR} is left to the container's shell
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    with_default = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):-", text))
    example = _env_example()
    # every variable is in the example: set, or (those with a default) commented out
    commented = set(re.findall(r"^#([A-Z0-9_]+)=", (INFRA / ".env.example").read_text(), re.M))
    assert used == set(example) | (commented & with_default), used ^ (set(example) | commented)
    # Every password-like setting is interpolated, never a literal in the compose file.
    for service in _compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH_STRING", key):
                assert str(value).startswith("${"), key
    # The example holds placeholders only, and infra/.env is ignored by git.
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|AUTH_STRING", key):
            assert "change-me" in value, key
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "infra/.env"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


# --- Dockerfiles -----------------------------------------------------------------------------


def _hadolint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hadolint"), "--no-color", *map(str, paths)], capture_output=True, text=True
    )


def _dockerfiles() -> list[Path]:
    return sorted((INFRA / "docker").glob("*.Dockerfile")) + sorted(
        (INFRA / "podman").glob("*.Dockerfile")
    )


def test_dockerfiles_pass_hadolint(tmp_path):
    dockerfiles = _dockerfiles()
    assert [p.name for p in dockerfiles] == [
        "mlflow.Dockerfile",
        "worker.Dockerfile",
        "postgres.Dockerfile",
        "prefect.Dockerfile",
        "s3.Dockerfile",
    ]
    result = _hadolint(*dockerfiles)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y git\n")
    flagged = _hadolint(bad)
    assert flagged.returncode == 1 and "DL3007" in flagged.stdout  # the linter does look


def test_worker_image_copies_files_that_exist_and_are_not_docker_ignored():
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dockerfile in _dockerfiles():
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), (dockerfile.name, source)
                    top = source.split("/")[0]
                    assert top not in ignored and source not in ignored, (dockerfile.name, source)


# --- Kubernetes ------------------------------------------------------------------------------


def _validate_k8s(resource: dict) -> list[str]:
    """kubernetes-validate's strict errors for one resource ([] = valid)."""
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_plain_manifests_validate_against_the_kubernetes_schemas():
    for name in ("workdir-pvc.yaml", "secret.example.yaml"):
        doc = yaml.safe_load((INFRA / "k8s" / name).read_text())
        assert _validate_k8s(doc) == [], name
    secret = yaml.safe_load((INFRA / "k8s" / "secret.example.yaml").read_text())
    assert all(v.endswith("change-me") for v in secret["stringData"].values())


def _render_base_job_template(values: dict) -> dict:
    """What Prefect's Kubernetes worker submits for a flow run of a pool with this template."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(BASE_JOB_TEMPLATE.read_text())

    async def render():
        return await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)

    config = asyncio.run(render())
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="a-run", flow_id=uuid.uuid4()))
    return config.job_manifest


def test_prefect_kubernetes_base_job_template_renders_a_valid_gpu_job():
    from jsonschema import Draft202012Validator

    template = json.loads(BASE_JOB_TEMPLATE.read_text())
    Draft202012Validator.check_schema(template["variables"])
    job = _render_base_job_template({"gpus": 2, "image": "registry.example/vae:1"})
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/vae:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "vae-pipeline-credentials"}}]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert {"name": "work", "mountPath": "/var/lib/vae-pipeline"} in container["volumeMounts"]
    # Kubernetes' own schema, strict. prefect-kubernetes 0.8 requires `parallelism` and
    # `completions` inside the pod spec (its manifest check rejects a template without them),
    # where strict validation calls them unknown: those two findings, and only those, are
    # expected; anything else fails.
    assert "parallelism" in pod and "completions" in pod
    clean = copy.deepcopy(job)
    del clean["spec"]["template"]["spec"]["parallelism"]
    del clean["spec"]["template"]["spec"]["completions"]
    clean["metadata"]["name"] = "a-run"  # generateName is filled in by the API server
    assert _validate_k8s(clean) == []
    # The validator is strict: a misspelt field is reported.
    clean["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert _validate_k8s(clean) != []


def test_pytorchjob_matches_the_kubeflow_api_and_runs_the_rank_module():
    from kubeflow.training import ApiClient

    doc = yaml.safe_load(PYTORCHJOB.read_text())
    client = ApiClient()

    class Response:  # what the SDK deserializes from: an API response body
        data = json.dumps(doc)

    job = client.deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    # A round trip through the SDK's model keeps every field: none is unknown to the API.
    assert client.sanitize_for_serialization(job) == doc
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["elasticPolicy"]["maxReplica"] = 8
    Response.data = json.dumps(misspelt)
    assert (
        client.sanitize_for_serialization(client.deserialize(Response(), "KubeflowOrgV1PyTorchJob"))
        != misspelt
    )

    spec = doc["spec"]
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert spec["elasticPolicy"]["minReplicas"] <= spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] <= spec["elasticPolicy"]["maxReplicas"]
    template = spec["pytorchReplicaSpecs"]["Worker"]["template"]
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"}}
    assert _validate_k8s({**pod_template, "template": template}) == []
    (container,) = template["spec"]["containers"]
    assert container["name"] == "pytorch"
    # torchrun runs the rank module with arguments its own parser and the params accept.
    assert container["command"] == ["torchrun"] and container["args"][:2] == [
        "-m",
        "vae_pipeline.worker",
    ]
    from vae_pipeline.worker import parse_args

    args = parse_args(container["args"][2:])
    assert args.params == Path("/srv/vae-pipeline/params.yaml")
    load_config(REPO / "params.yaml", args.overrides)


def _trainjob_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(TRAINJOB.read_text())}


def _round_trip(model, doc: dict) -> dict:
    """`doc` read into a kubeflow-trainer-api model and written back (unknown fields drop out)."""
    return model.from_dict(doc).to_dict()


def test_trainjob_matches_the_kubeflow_trainer_api_and_runs_the_rank_module():
    from kubeflow_trainer_api.models import (
        TrainerV1alpha1TrainingRuntime,
        TrainerV1alpha1TrainJob,
    )

    docs = _trainjob_docs()
    assert set(docs) == {"TrainingRuntime", "TrainJob"}
    runtime, job = docs["TrainingRuntime"], docs["TrainJob"]
    # A round trip through the API's models keeps every field: none is unknown to the API.
    assert _round_trip(TrainerV1alpha1TrainingRuntime, runtime) == runtime
    assert _round_trip(TrainerV1alpha1TrainJob, job) == job
    for doc, model, path in (
        (job, TrainerV1alpha1TrainJob, ("spec", "trainer")),
        (runtime, TrainerV1alpha1TrainingRuntime, ("spec", "mlPolicy")),
    ):
        misspelt = copy.deepcopy(doc)
        misspelt[path[0]][path[1]]["numNode"] = 8
        assert _round_trip(model, misspelt) != misspelt, path
    for doc in docs.values():
        assert doc["apiVersion"] == "trainer.kubeflow.org/v1alpha1"

    # The job names this runtime, in its namespace.
    ref = job["spec"]["runtimeRef"]
    assert ref == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": runtime["metadata"]["name"],
    }
    assert job["metadata"]["namespace"] == runtime["metadata"]["namespace"]
    # torch policy: torchrun's PET_* variables go to the trainer's replicated job, "node"
    assert "torch" in runtime["spec"]["mlPolicy"]
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    # The pod template is a valid Kubernetes pod template (strict schema).
    template = node["template"]["spec"]["template"]
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "n"}}
    assert _validate_k8s({**pod_template, "template": template}) == []
    (container,) = template["spec"]["containers"]
    assert container["name"] == "node"
    # the shared claim and the Secret by reference, the names of the other manifests
    secret = yaml.safe_load((INFRA / "k8s" / "secret.example.yaml").read_text())
    claim = yaml.safe_load((INFRA / "k8s" / "workdir-pvc.yaml").read_text())
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["work"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"work": "/var/lib/vae-pipeline", "shm": "/dev/shm"}

    # GPUs stated per node, requested as limited; several nodes
    trainer = job["spec"]["trainer"]
    resources = trainer["resourcesPerNode"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and resources["requests"]["nvidia.com/gpu"] == gpus
    assert trainer["numNodes"] >= 2
    assert "numProcPerNode" not in trainer  # the torch runtime's auto: one rank per GPU
    # torchrun runs the rank module with arguments its own parser and the params accept.
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"][:2] == ["-m", "vae_pipeline.worker"]
    from vae_pipeline.worker import parse_args

    args = parse_args(trainer["args"][2:])
    assert args.params == Path("/srv/vae-pipeline/params.yaml")
    load_config(REPO / "params.yaml", args.overrides)
    # the same image and working folder as the legacy PyTorchJob's
    legacy = yaml.safe_load(PYTORCHJOB.read_text())["spec"]["pytorchReplicaSpecs"]["Worker"]
    (legacy_container,) = legacy["template"]["spec"]["containers"]
    assert trainer["image"] == container["image"] == legacy_container["image"]
    assert trainer["args"] == legacy_container["args"]


def test_prefect_base_job_template_uses_every_variable_it_declares():
    template = json.loads(BASE_JOB_TEMPLATE.read_text())
    declared = set(template["variables"]["properties"])
    text = json.dumps(template["job_configuration"])
    referenced = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", text))
    assert referenced == declared, {
        "unused": declared - referenced,
        "undeclared": referenced - declared,
    }
    # and Prefect's own parser finds the same placeholders
    from prefect.utilities.templating import find_placeholders

    found = {p.name for p in find_placeholders(template["job_configuration"])}
    assert found == declared


# --- environment variables -------------------------------------------------------------------


def _names_read_by_the_code() -> set[str]:
    """String constants passed to os.environ.get / os.environ[...] / os.getenv in the package."""
    names = set()
    for path in [*(REPO / "vae_pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "os.environ.setdefault"):
                    target = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                target = node.slice
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                names.add(target.value)
    return names


def _names_set_by_the_manifests() -> dict[str, set[str]]:
    services = _compose()["services"]
    template = json.loads(BASE_JOB_TEMPLATE.read_text())
    torch_container = yaml.safe_load(PYTORCHJOB.read_text())["spec"]["pytorchReplicaSpecs"][
        "Worker"
    ]["template"]["spec"]["containers"][0]
    runtime = _trainjob_docs()["TrainingRuntime"]["spec"]["template"]["spec"]
    trainjob_container = runtime["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    secret = yaml.safe_load((INFRA / "k8s" / "secret.example.yaml").read_text())
    # ENV NAME=value lines and their continuation lines
    dockerfile = (INFRA / "docker" / "worker.Dockerfile").read_text()
    dockerfile_env = set(re.findall(r"^(?:ENV |\s+)([A-Z][A-Z0-9_]+)=", dockerfile, re.M))
    spec = importlib.util.spec_from_file_location("local_stack", INFRA / "local_stack.py")
    local_stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_stack)
    stack_env = local_stack.stack_env({"s3": 1, "mlflow": 2, "prefect": 3})
    return {
        # VAE_PIPELINE_STACK_ARGS is `make run`'s, not the pipeline's
        "local stack (.stack/env)": set(stack_env) - {"VAE_PIPELINE_STACK_ARGS"},
        "compose worker": set(services["worker"]["environment"]),
        "k8s base job template": set(template["variables"]["properties"]["env"]["default"]),
        "PyTorchJob": {e["name"] for e in torch_container["env"]},
        "TrainJob's runtime": {e["name"] for e in trainjob_container["env"]},
        "k8s Secret": set(secret["stringData"]),
        "worker.Dockerfile": dockerfile_env - GENERIC,
    }


def test_the_code_reads_only_declared_environment_variables():
    read = _names_read_by_the_code()
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"} <= read
    undeclared = read - PIPELINE_NAMES - set(TORCHRUN_ENVIRONMENT)
    assert undeclared == set(), f"read but not in config.ENVIRONMENT: {undeclared}"


def test_manifests_set_only_variables_the_pipeline_reads():
    for where, names in _names_set_by_the_manifests().items():
        assert names, where
        unknown = names - PIPELINE_NAMES
        assert unknown == set(), f"{where} sets {unknown}, which nothing in the pipeline reads"
    # What a worker needs to reach the stack is set in compose, and credentials in the Secret.
    compose_worker = _names_set_by_the_manifests()["compose worker"]
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"} <= compose_worker  # fmt: skip


def test_declared_library_variables_are_ones_those_libraries_read():
    """ENVIRONMENT names read by MLflow, Prefect and botocore exist in those libraries."""
    import botocore.configprovider
    import botocore.credentials
    import mlflow.environment_variables
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    prefect_names = set(_get_settings_fields(Settings))

    def s3_endpoint_from(name: str) -> str | None:
        provider = botocore.configprovider.ConfiguredEndpointProvider(
            full_config={}, scoped_config={}, client_name="s3", environ={name: "http://s3.test"}
        )
        return provider.provide()

    aws = {botocore.credentials.EnvProvider.ACCESS_KEY, botocore.credentials.EnvProvider.SECRET_KEY}
    aws |= {n for n in ENVIRONMENT if n.startswith("AWS_ENDPOINT") and s3_endpoint_from(n)}
    assert s3_endpoint_from("AWS_ENDPOINT_URL_S4") is None
    for entry in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        aws.update([entry[1]] if isinstance(entry[1], str) else entry[1] or [])
    for name in ENVIRONMENT:
        if name.startswith("MLFLOW_"):
            assert hasattr(mlflow.environment_variables, name), name
        elif name.startswith("PREFECT_"):
            assert name in prefect_names, name
        elif name.startswith("AWS_"):
            assert name in aws, name
    # The servers' own variables in compose are ones those servers read.
    from mlflow.cli import server

    services = _compose()["services"]
    mlflow_server_env = {p.envvar for p in server.params if p.envvar}
    for name in services["mlflow"]["environment"]:
        assert (
            hasattr(mlflow.environment_variables, name) or name in mlflow_server_env or name in aws
        ), name
    for name in services["prefect"]["environment"]:
        assert name in prefect_names, name


# --- MLflow with authentication, as compose runs it ------------------------------------------


def test_the_pipeline_uses_an_mlflow_server_with_the_stacks_basic_auth(tmp_path, monkeypatch):
    """`mlflow server --app-name basic-auth` with infra/mlflow/basic_auth.ini (its user database
    moved into tmp_path): preflight refuses a missing or wrong password up front with the
    variables to set, and the pipeline's calls work as the admin from the env file's names."""
    from mlflow import MlflowClient

    from vae_pipeline import tracking

    from .server_helpers import free_port, stop, wait_http

    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert "database_uri = sqlite:////var/lib/mlflow/basic_auth.db" in ini
    (tmp_path / "basic_auth.ini").write_text(
        ini.replace("/var/lib/mlflow/basic_auth.db", str(tmp_path / "basic_auth.db"))
    )
    services = _compose()["services"]
    server_env = services["mlflow"]["environment"]
    password = "s3cret-" + uuid.uuid4().hex[:8]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")},
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    assert set(env) >= {k for k in server_env if k.startswith("MLFLOW_AUTH")}
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name=basic-auth",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"--artifacts-destination={tmp_path / 'artifacts'}",
        ],  # fmt: skip
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 120, proc)
        for user, secret in ((None, None), ("admin", "wrong")):
            for key, value in (("USERNAME", user), ("PASSWORD", secret)):
                if value is None:
                    monkeypatch.delenv(f"MLFLOW_TRACKING_{key}", raising=False)
                else:
                    monkeypatch.setenv(f"MLFLOW_TRACKING_{key}", value)
            with pytest.raises(tracking.TrackingAuthError) as refused:
                tracking.preflight(uri)
            assert "MLFLOW_TRACKING_USERNAME" in str(refused.value)
        # The compose worker's names for the same credentials.
        worker_env = services["worker"]["environment"]
        assert worker_env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_ADMIN_USERNAME}"
        assert worker_env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_ADMIN_PASSWORD}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracking.preflight(uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("auth-check")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "iw_nll", 1.5)
        assert client.get_run(run.info.run_id).data.metrics == {"iw_nll": 1.5}
    finally:
        stop(proc)
