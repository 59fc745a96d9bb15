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


def k8s_env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = "<secret>"
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = "<pod name>"
        else:
            raise AssertionError(f"unexpected env entry {item}")
    return env


def k8s_launches() -> list[Launch]:
    out = []
    for doc in k8s_docs():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        probe = container["livenessProbe"]
        out.append(Launch(f"k8s:{doc['metadata']['name']}", [*container["command"], *container.get("args", [])],
                          k8s_env(container), float(pod["terminationGracePeriodSeconds"]),
                          list(probe["exec"]["command"]), float(probe["timeoutSeconds"])))
    return out


def migrate_commands() -> list[tuple[str, list[str], dict]]:
    out = []
    for doc in k8s_docs():
        if doc["kind"] == "Job":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            out.append((f"k8s:{doc['metadata']['name']}", [*container["command"], *container.get("args", [])],
                        k8s_env(container)))
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


def run(argv: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(local_argv(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class Running:
    """A deployment's long-running command, started for real, its output in a log file."""

    def __init__(self, launch: Launch, env: dict, log_path: Path):
        self.launch, self.env, self.log_path = launch, env, log_path
        self.log_file = open(log_path, "w")
        self.popen = subprocess.Popen(local_argv(launch.argv), cwd=ROOT, env=env, stdout=self.log_file,
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


def probe(argv: list[str], env: dict, timeout: float, tries: int = 3) -> tuple[subprocess.CompletedProcess, float]:
    """Run a liveness probe like the kubelet: a timeout per try, failureThreshold tries in a row."""
    last = None
    for _ in range(tries):
        started = time.monotonic()
        result = run(argv, env, timeout=30)
        took = time.monotonic() - started
        if result.returncode == 0 and took <= timeout:
            return result, took
        last = (result, took)
    return last


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
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "Job", "ScaledObject"], kinds

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
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"ductwork-advancer", "ductwork-worker"}
    for name, dep in deployments.items():
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
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a KEDA custom resource: the core API schema does not describe it
        for version in ("1.27.0", kv.latest_version()):
            kv.validate(doc, version, strict=True)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


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
        key = (tuple(launch.argv), tuple(sorted((k, v) for k, v in launch.env.items()
                                                 if k not in ("DATABASE_URL", "DUCTWORK_MACHINE_ID"))))
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
