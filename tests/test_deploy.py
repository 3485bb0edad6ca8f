"""The deployment files, checked offline (fast; part of `make test`):

- the Kubernetes manifests of the core kinds against the Kubernetes API
  schemas that kubernetes-validate ships (strict: no unknown fields);
- the KEDA ScaledObject against KEDA's own CRD schema (vendored in
  tests/schemas/, see its README), strict the same way;
- compose.yaml against the Compose Specification's schema (vendored too);
- every keras-server command line and KERAS_SERVER_* variable in the
  manifests, compose.yaml and the Dockerfile: only flags and variables our
  settings table has, with values it accepts;
- probes, resource requests, grace periods that fit the drain, and the
  scaler's query on a metric we export;
- the nginx template: every placeholder filled by both its renderers
  (run_cluster.py and compose.yaml's sed), and compose's script run
  for real up to `nginx -t` (slow-marked).

The container itself is built and run in tests/test_container.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import system_tool

from keras_server.serving.models import Deployment
from keras_server.settings import KNOBS, Settings, load_settings
from keras_server.web.probes import RedisCollector
from run_cluster import render_nginx_conf

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KEDA_CRD = SCHEMAS / "keda.sh_scaledobjects.yaml"
COMPOSE_SPEC = SCHEMAS / "compose-spec.json"
KUBERNETES_VERSION = "1.37.0"
FLAGS = {knob.flag for knob in KNOBS}
VARIABLES = {knob.env for knob in KNOBS}
PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return found


def keras_containers() -> list[dict[str, Any]]:
    return [
        container
        for doc in of_kind("Deployment")
        for container in doc["spec"]["template"]["spec"]["containers"]
        if "keras-server" in container["image"]
    ]


def configmap() -> dict[str, str]:
    return named("ConfigMap", "keras-server")["data"]


def check_command(args: list[str], environ: dict[str, str]) -> Settings:
    """`args` uses only our flags, and with `environ` makes valid settings."""
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in FLAGS, f"{arg}: run_keras_server.py has no such flag"
    for name in environ:
        if name.startswith("KERAS_SERVER_"):
            assert name in VARIABLES, f"{name}: no such setting"
    return load_settings(args, environ=environ)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_core_kinds_are_valid_kubernetes() -> None:
    checked = set()
    for doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")
        checked.add(doc["kind"])
    assert checked == {
        "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "StatefulSet",
    }  # fmt: skip


def test_a_wrong_field_is_caught() -> None:
    """The validation above can fail: a misspelt field is refused."""
    web = named("Deployment", "keras-server-web")
    web["spec"]["template"]["spec"]["terminationGracePeriod"] = 50
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, KUBERNETES_VERSION, strict=True)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema with unknown fields made errors: where an object
    lists its properties and does not keep unknown fields, nothing else is
    allowed (the API server would prune them silently)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


def keda_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def test_scaled_object_matches_kedas_crd() -> None:
    validator = keda_validator()
    (scaled,) = of_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(scaled)]
    assert errors == []

    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = 1  # Deployment's word, not KEDA's
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 64  # must be a string
    assert len(list(validator.iter_errors(broken))) == 2


def test_workers_scale_on_the_queue_depth_of_every_shard(settings: Settings) -> None:
    (scaled,) = of_kind("ScaledObject")
    spec = scaled["spec"]
    worker = named("Deployment", "keras-server-worker")
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["minReplicaCount"] >= 1  # /readyz needs a live worker
    # One trigger over all shards: KEDA takes the max of several triggers.
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    # Every web server reports the same depths (max), summed over models,
    # shards and priority levels.
    expected = "sum(maxby(model,shard,level)(keras_server_queue_depth"
    assert query.replace(" ", "").startswith(expected)
    # The metric is ours, with those labels (read from a real Redis).
    collector = RedisCollector(Deployment.from_settings(settings))
    (depth,) = [f for f in collector.collect() if f.name == "keras_server_queue_depth"]
    assert {frozenset(sample.labels) for sample in depth.samples} == {
        frozenset({"model", "shard", "level"})
    }
    assert float(trigger["metadata"]["threshold"]) > 0


def test_probes_resources_and_drain() -> None:
    settings = load_settings([], environ=configmap())
    web = named("Deployment", "keras-server-web")["spec"]["template"]["spec"]
    (container,) = web["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # granian gives requests in flight --result-timeout + 5 s (web/front.py).
    assert web["terminationGracePeriodSeconds"] >= pause + settings.result_timeout + 5
    worker = named("Deployment", "keras-server-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= settings.result_timeout
    for doc in [*of_kind("Deployment"), *of_kind("StatefulSet")]:
        for each in doc["spec"]["template"]["spec"]["containers"]:
            requests = each["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), doc["metadata"]["name"]
    service = named("Service", "keras-server")
    assert (
        service["spec"]["selector"]
        == named("Deployment", "keras-server-web")["spec"]["selector"]["matchLabels"]
    )


def test_kubernetes_command_lines_use_real_flags() -> None:
    data = configmap()
    roles = set()
    for container in keras_containers():
        env = {**data, **{e["name"]: e["value"] for e in container.get("env", [])}}
        settings = check_command([*container.get("command", []), *container["args"]], env)
        roles.add(settings.role)
        if settings.role == "worker":
            port = container["ports"][0]["containerPort"]
            assert settings.metrics_port == port
            assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert roles == {"web", "worker"}
    assert (
        len(data["KERAS_SERVER_REDIS_URL"].split(","))
        == named("StatefulSet", "keras-redis")["spec"]["replicas"]
    )


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (512Mi, 4Gi, 8G, 1000000) in MiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}  # fmt: skip
    match = re.fullmatch(r"([\d.]+)([A-Za-z]*)", quantity)
    assert match, quantity
    number, unit = match.groups()
    return float(number) * units.get(unit, 1) / 2**20


def measured_cold_start() -> tuple[float, float]:
    """BENCHMARKS.md's cold start of ResNet50 (its one statement): the
    serving process's peak and the converter child's peak, in MiB."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = text.split("\n### Memory after a cold start\n", 1)[1].split("\n### ", 1)[0]
    (row,) = [line for line in section.splitlines() if line.startswith("| cold")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    serving, converter = (float(cell.removesuffix(" MiB")) for cell in cells[2:4])
    return serving, converter


def test_the_converting_container_has_room_for_the_measured_conversion_peak() -> None:
    """The worker pod's init container converts (keras-server convert, the
    worker's own settings) into the cache volume the worker mounts, with a
    memory limit above the converter's measured peak plus the process around
    it; the worker, starting from the cache, within its own limit."""
    serving, converter = measured_cold_start()
    assert converter > 7000  # ResNet50's 7.2 GiB: the table was read right
    pod = named("Deployment", "keras-server-worker")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (worker,) = pod["containers"]
    assert init["args"][0] == "convert"
    assert init["image"] == worker["image"]
    assert init["envFrom"] == worker["envFrom"]
    data = configmap()
    settings = check_command(init["args"][1:], data)
    assert check_command(worker["args"], data).cache_dir == settings.cache_dir
    for container in (init, worker):
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == settings.cache_dir
        assert mount["name"] == "conversion-cache"
    (volume,) = pod["volumes"]
    claim = named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker pod, any node
    assert mebibytes(init["resources"]["limits"]["memory"]) >= converter + serving
    assert mebibytes(worker["resources"]["limits"]["memory"]) >= serving


def test_memory_quantities_are_read_right() -> None:
    assert mebibytes("4Gi") == 4096
    assert mebibytes("512Mi") == 512
    assert mebibytes("8G") == pytest.approx(7629.39, abs=0.01)


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification() -> None:
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SPEC.read_text()))
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["web"]["stop_grace"] = "40s"  # not stop_grace_period
    assert list(validator.iter_errors(broken))


def test_compose_command_lines_use_real_flags() -> None:
    services = compose()["services"]
    assert {"redis", "web", "worker", "nginx"} <= set(services)
    for name in ("web", "worker"):
        service = services[name]
        assert service["deploy"]["replicas"] == 2
        settings = check_command(service["command"], service["environment"])
        assert settings.role == name
    assert services["worker"]["healthcheck"]["test"][-1].endswith(
        f"127.0.0.1:{load_settings(services['worker']['command'], environ={}).metrics_port}"
        "/metrics', timeout=4)"
    )


def test_the_web_role_runs_the_web_image() -> None:
    """Kubernetes and compose run --role web from the Dockerfile's web target
    (no TensorFlow), the worker from the full image."""
    data = configmap()
    for container in keras_containers():
        env = {**data, **{e["name"]: e["value"] for e in container.get("env", [])}}
        role = check_command([*container.get("command", []), *container["args"]], env).role
        repository = container["image"].rsplit(":", 1)[0]
        assert repository == ("keras-server-web" if role == "web" else "keras-server"), role
    services = compose()["services"]
    assert services["web"]["build"] == {"context": ".", "target": "web"}
    assert services["web"]["image"] == "localhost/keras-server-web:latest"
    assert services["worker"]["build"] == "."  # the default target: the full image
    assert services["worker"]["image"] == "localhost/keras-server:latest"


def dockerfile_instructions() -> list[tuple[str, str]]:
    # Comment lines go first, even inside a continued instruction (as Docker does).
    text = "\n".join(code((ROOT / "Dockerfile").read_text())).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_targets() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, after those of the stages it is built FROM
    (what its image inherits), by stage name; the last stage is the default target."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for op, arg in dockerfile_instructions():
        if op == "FROM":
            parent, _, name = arg.partition(" AS ")
            current = list(stages.get(parent.strip(), []))
            stages[name.strip()] = current
        elif current is not None:
            current.append((op, arg))
    return stages


@pytest.mark.parametrize(("target", "role"), [("full", "all"), ("web", "web")])
def test_dockerfile_command_line_and_variables(target: str, role: str) -> None:
    stages = dockerfile_targets()
    assert list(stages)[-1] == "full"  # `docker build .` builds every role and engine
    instructions = stages[target]
    entrypoints = [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"]
    assert entrypoints[-1] == ["keras-server"]
    cmd = [json.loads(arg) for op, arg in instructions if op == "CMD"][-1]
    environ = {}
    for op, arg in instructions:
        if op == "ENV":
            for pair in shlex.split(arg):
                key, _, value = pair.partition("=")
                environ[key] = value
    settings = check_command(cmd, environ)
    assert settings.role == role
    assert settings.host == "0.0.0.0"
    (healthcheck,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert [arg for op, arg in instructions if op == "USER"][-1] != "root"
    assert "ARG PIP_CERT" in (ROOT / "Dockerfile").read_text()


def test_the_web_image_installs_no_engine() -> None:
    """The web target installs the project with no extra but otel (tracing):
    no TensorFlow."""
    runs = [arg for op, arg in dockerfile_targets()["web"] if op == "RUN"]
    assert any("pip install" in run for run in runs)
    installed = [run.split("pip install", 1)[-1] for run in runs if "pip install" in run]
    assert {extra for run in installed for extra in re.findall(r"\[([^]]*)\]", run)} == {"otel"}
    full = [arg for op, arg in dockerfile_targets()["full"] if op == "RUN"]
    assert any('"/src[all]"' in run for run in full)


def code(text: str) -> list[str]:
    """The lines of a Dockerfile or nginx configuration that are not comments."""
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall("\n".join(code(text))))


def test_nginx_template_is_filled_by_both_renderers(tmp_path: Path) -> None:
    template = (ROOT / "deploy" / "nginx.conf.template").read_text()
    wanted = placeholders(template)
    assert {"@RATE_LIMIT_ZONE@", "@RATE_LIMIT@"} <= wanted
    for limit in ("", "10r/s"):
        text = render_nginx_conf(tmp_path, 8080, [5001, 5002], Settings(), rate_limit=limit)
        assert placeholders(text) == set()
        assert ("limit_req zone=per_client" in "\n".join(code(text))) == bool(limit)
    script = compose()["services"]["nginx"]["command"][-1]
    filled = set(re.findall(r"s\|(@[A-Z_]+@)\|", script))
    assert filled == wanted


@pytest.fixture(scope="module")
def nginx() -> str:
    return system_tool("/usr/sbin/nginx")


@pytest.mark.slow
def test_compose_nginx_script_makes_a_valid_configuration(nginx: str, tmp_path: Path) -> None:
    """compose.yaml's nginx command, run here as the container would run it
    (paths moved into tmp_path, `nginx -t` instead of starting): the filled-in
    template is a configuration nginx accepts."""
    script = compose()["services"]["nginx"]["command"][-1]
    script = script.replace("$$", "$")  # compose's escape for a literal $
    template = str(KUBERNETES.parent / "nginx.conf.template")
    script = script.replace("/etc/keras-server/nginx.conf.template", template)
    script = script.replace("/tmp/nginx", str(tmp_path / "nginx"))
    # No compose DNS here: the web service's name becomes loopback.
    script = script.replace("server web:5000", "server 127.0.0.1:5000")
    script = script.replace("exec nginx ", f"exec {nginx} -t ")
    done = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    conf = (tmp_path / "nginx" / "nginx.conf").read_text()
    assert "limit_req_zone $binary_remote_addr zone=per_client" in conf
    assert placeholders(conf) == set()
