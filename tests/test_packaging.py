"""The packaging files: the systemd unit, the container recipe, its catalog, the README sections.

Offline checks only: `systemd-analyze verify` on a copy of the unit (systemd
need not be PID 1), static checks of the Dockerfile and the compose file (no
Docker engine is needed), and `llmuxd --check` on the container's catalog.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from llmuxd.catalog import DaemonSettings, load_catalog, parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "llmuxd.service"
DOCKERFILE = ROOT / "packaging" / "container" / "Dockerfile"
COMPOSE = ROOT / "packaging" / "container" / "compose.yaml"
CONTAINER_CATALOG = ROOT / "packaging" / "container" / "llmux.toml"
SECTIONS = ROOT / "README.md"  # the "Run under systemd" and "Run in a container" sections
CRIU_PREFIX = "/opt/llmux-criu"
SMOKE = ROOT / "packaging" / "container" / "smoke.sh"
SMOKE_PROBE = ROOT / "packaging" / "container" / "smoke_probe.py"
KUBERNETES = sorted((ROOT / "packaging" / "kubernetes").glob("*.yaml"))


# ---------------------------------------------------------------- unit file parsing

def parse_unit(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """{section: [(key, value, comment block right above the key)]}, as systemd reads it.

    Handles comments (# and ;), blank lines and backslash continuations; the
    comment block is the run of comment lines directly above the assignment.
    """
    sections: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    comments: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line:
            comments = []
            continue
        if line[0] in "#;":
            comments.append(line[1:].strip())
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            comments = []
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        sections[current].append((key.strip(), value.strip(), " ".join(comments)))
        comments = []
    return sections


def unit() -> dict[str, list[tuple[str, str, str]]]:
    return parse_unit(UNIT.read_text())


def values(section: str, key: str) -> list[str]:
    return [v for k, v, _ in unit().get(section, []) if k == key]


def value(section: str, key: str) -> str:
    found = values(section, key)
    assert found, f"[{section}] {key}= is missing from {UNIT.name}"
    assert len(found) == 1, f"[{section}] {key}= is set {len(found)} times"
    return found[0]


def comment_of(section: str, key: str) -> str:
    return next(c for k, _, c in unit()[section] if k == key)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1,
               "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600,
               "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def timespan(text: str) -> float:
    """Seconds of a systemd time span ("35min", "5min 30s", "30"); unitless means seconds."""
    total, pos, text = 0.0, 0, text.strip()
    while pos < len(text):
        m = _SPAN.match(text, pos)
        assert m and m.end() > pos, f"not a time span: {text!r}"
        assert (m.group(2) or "s") in _SPAN_UNITS, f"unknown unit in {text!r}"
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2) or "s"]
        pos = m.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return total


def systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, f"cannot read the version of {analyze}: {out!r}"
    return int(m.group(1))


# ---------------------------------------------------------------- systemd unit

def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    # verify checks that ExecStart's program exists: point it at one that does,
    # keeping the arguments.
    exe = shutil.which("llmuxd") or os.path.realpath(sys.executable)
    text, n = re.subn(r"(?m)^ExecStart=/usr/local/bin/llmuxd ", f"ExecStart={exe} ", text)
    assert n == 1
    version = systemd_version(analyze)
    if version < 253:
        # Type=notify-reload is systemd 253's; an older parser can only check the
        # rest (test_unit_directives checks Type itself).
        text = text.replace("Type=notify-reload", "Type=notify")
    copy = tmp_path / "llmuxd.service"
    copy.write_text(text)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    proc = subprocess.run([analyze, "verify", "--man=no", "--generators=no", str(copy)],
                          capture_output=True, text=True, env=env, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"systemd-analyze verify (systemd {version}) failed:\n{output}"
    # Anything it says about our file (unknown keys, bad values, ...) is a defect;
    # lines about other units of the machine are not ours to judge.
    ours = [line for line in output.splitlines() if "llmuxd.service" in line or str(tmp_path) in line]
    assert not ours, f"systemd-analyze verify (systemd {version}) warns:\n" + "\n".join(ours)


def test_unit_directives():
    assert value("Service", "Type") == "notify-reload"
    assert value("Service", "NotifyAccess") == "main"
    argv = shlex.split(value("Service", "ExecStart"))
    assert argv == ["/usr/local/bin/llmuxd", "--config", "/etc/llmux/llmux.toml"]
    assert "pip" in comment_of("Service", "ExecStart")  # where pip may have put llmuxd
    assert 0 < timespan(value("Service", "WatchdogSec")) <= 120
    assert value("Service", "Restart") == "on-failure"
    assert timespan(value("Service", "RestartSec")) >= 1
    assert "4" in value("Service", "RestartPreventExitStatus").split()
    nofile = value("Service", "LimitNOFILE")
    assert nofile == "infinity" or int(nofile.split(":")[-1]) >= 65536
    assert value("Install", "WantedBy") == "multi-user.target"


def test_unit_timeouts_cover_llmuxd_defaults():
    d = DaemonSettings()
    start = timespan(value("Service", "TimeoutStartSec"))
    # READY=1 waits for default_model: its cold start may take startup_timeout.
    assert start > d.startup_timeout, "TimeoutStartSec must exceed the default startup_timeout"
    assert "startup_timeout" in comment_of("Service", "TimeoutStartSec")
    stop = timespan(value("Service", "TimeoutStopSec"))
    # Models are stopped one after the other, each up to stop_timeout.
    assert stop >= 4 * d.stop_timeout
    assert "stop_timeout" in comment_of("Service", "TimeoutStopSec")


def test_unit_killmode_is_explained():
    assert value("Service", "KillMode") == "mixed"
    why = comment_of("Service", "KillMode")
    for word in ("SIGTERM", "SIGKILL", "cgroup", "KillMode=process", "keep"):
        assert word in why, f"the comment above KillMode= should mention {word!r}"


def test_unit_directories_match_the_catalog_defaults():
    d = DaemonSettings()
    runtime = value("Service", "RuntimeDirectory")
    state = value("Service", "StateDirectory")
    assert runtime == "llmux" and state == "llmux"
    assert os.path.dirname(d.socket) == f"/run/{runtime}"
    assert d.state_dir == f"/var/lib/{state}"
    # The socket directory must let users reach the socket (its own mode guards it).
    assert int(value("Service", "RuntimeDirectoryMode"), 8) & 0o005 == 0o005


def test_unit_has_no_mount_namespace_sandboxing():
    """CRIU images name mount IDs: a per-start mount namespace breaks restores."""
    off = {"", "no", "false", "0", "off"}
    for key in ("PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome", "PrivateMounts",
                "ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "BindReadOnlyPaths",
                "TemporaryFileSystem", "ProtectKernelTunables", "MemoryDenyWriteExecute",
                "SystemCallFilter", "CapabilityBoundingSet", "DynamicUser"):
        for v in values("Service", key):
            assert v.lower() in off, f"{key}={v} would get in the way of CRIU or vLLM"
    assert set(values("Service", "User")) <= {"root", "0"}, "levels 3-4 need root"
    assert "PrivateTmp" in UNIT.read_text() and "mount" in comment_of("Service", "PrivateTmp")


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        line = pending + " " + line if pending else line
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        if not line:
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends with a continuation"
    return out


def test_dockerfile_has_no_init_in_front_of_llmuxd():
    for word, rest in dockerfile_instructions():
        text = rest.lower()
        for bad in ("tini", "dumb-init", "catatonit", "--init", "docker-init"):
            assert bad not in text, f"{word} {rest}: no init in front of llmuxd"


def test_dockerfile_entrypoint_is_llmuxd():
    ins = dockerfile_instructions()
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    assert json.loads(entry[-1]) == ["llmuxd", "--config", "/etc/llmux/llmux.toml"]
    # The base image's own CMD must not be appended to llmuxd's arguments.
    cmd = [rest for word, rest in ins if word == "CMD"]
    assert cmd and json.loads(cmd[-1]) == []


def test_dockerfile_builds_on_a_base_argument_with_criu_and_a_state_volume():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms[-1].split()[0] == "${BASE}"
    # users get a vLLM image; CI passes its debootstrap base (smoke.sh)
    assert ("ARG", "BASE=vllm/vllm-openai:latest") in ins[:3]
    volumes = [v for word, rest in ins if word == "VOLUME" for v in json.loads(rest)]
    assert "/var/lib/llmux" in volumes
    copies = [rest for word, rest in ins if word == "COPY"]
    assert any(f"--from=criu {CRIU_PREFIX} {CRIU_PREFIX}" in c for c in copies)
    # CRIU comes from the project's own installer, into the prefix the catalog names,
    # with the CUDA plugin where the catalog looks for it.
    runs = [rest for word, rest in ins if word == "RUN"]
    assert any("install-criu.sh" in r and CRIU_PREFIX in r and "cuda_plugin.so" in r for r in runs)
    ck = load_catalog(str(CONTAINER_CATALOG)).daemon.checkpoint
    assert ck.criu_path == f"{CRIU_PREFIX}/bin/criu" and ck.cuda_plugin_dir == f"{CRIU_PREFIX}/lib/criu"
    assert any("pip install" in r for r in runs)


def test_dockerfile_stop_signal_and_healthcheck():
    ins = dockerfile_instructions()
    assert [rest for word, rest in ins if word == "STOPSIGNAL"] == ["SIGTERM"]
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1
    assert json.loads(health[0].split("CMD", 1)[1]) == ["llmuxctl", "status"]


def test_dockerfile_is_plain_docker_syntax():
    """docker build and podman build alike: no BuildKit-only or podman-only syntax."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"(?m)^#\s*syntax\s*=", text)
    for word, rest in dockerfile_instructions():
        assert word in {"ARG", "FROM", "COPY", "RUN", "VOLUME", "WORKDIR", "STOPSIGNAL",
                        "HEALTHCHECK", "ENTRYPOINT", "CMD", "ENV", "LABEL"}, word
        assert not rest.startswith(("--mount", "--security", "--network")), f"{word} {rest}"


def test_dockerfile_copies_only_what_the_build_context_has():
    """The context is the repository root: every COPY source must exist there."""
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_packaging_names_no_host():
    for path in (DOCKERFILE, COMPOSE, CONTAINER_CATALOG, UNIT, SECTIONS, SMOKE, SMOKE_PROBE,
                 *KUBERNETES):
        text = path.read_text()
        assert not re.search(r"\b(?:https?|ftp)://", text), f"{path.name} names a host"


def test_wheel_holds_every_package():
    """A non-editable install must carry every package of the source tree."""
    config = tomlkit.parse((ROOT / "pyproject.toml").read_text()).unwrap()
    setuptools_cfg = config.get("tool", {}).get("setuptools", {})
    packages = setuptools_cfg.get("packages")
    if not isinstance(packages, list):
        return  # automatic discovery (packages.find) finds subpackages itself
    on_disk = sorted(".".join(p.parent.relative_to(ROOT).parts)
                     for top in ("llmuxd", "llmuxctl") for p in (ROOT / top).rglob("__init__.py"))
    missing = [name for name in on_disk if name not in packages]
    assert not missing, f"pyproject.toml does not package {missing}"


# ---------------------------------------------------------------- compose

def compose_service() -> dict:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(COMPOSE.read_text())
    return doc["services"]["llmux"]


def test_compose_settings_text():
    """Line checks that need no YAML parser."""
    text = COMPOSE.read_text()
    for pattern in (r"privileged:\s*true\b", r"pid:\s*[\"']?host\b", r"ipc:\s*[\"']?host\b",
                    r"init:\s*false\b", r"stop_grace_period:\s*\S+",
                    r"-\s*\S+:/var/lib/llmux\b", r"-\s*\S+:/etc/llmux/llmux\.toml:ro\b",
                    r"-\s*/run/llmux:/run/llmux\b", r"capabilities:\s*\[gpu\]"):
        assert re.search(rf"(?m)^\s*{pattern}", text), f"compose.yaml lacks {pattern!r}"
    assert not re.search(r"(?m)^\s*init:\s*true", text)


def test_compose_settings_yaml():
    svc = compose_service()
    assert svc["privileged"] is True
    assert svc["pid"] == "host"
    assert svc["ipc"] == "host"
    assert svc["init"] is False
    grace = parse_duration(svc["stop_grace_period"], "stop_grace_period")
    assert grace >= timespan(value("Service", "TimeoutStopSec"))
    targets = {str(v).split(":")[1] for v in svc["volumes"]}
    assert {"/var/lib/llmux", "/root/.cache/huggingface", "/etc/llmux/llmux.toml",
            "/run/llmux"} <= targets
    catalog = next(v for v in svc["volumes"] if ":/etc/llmux/llmux.toml" in v)
    assert catalog.endswith(":ro")
    assert (COMPOSE.parent / catalog.split(":")[0]).resolve() == CONTAINER_CATALOG
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    build = svc["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE


# ---------------------------------------------------------------- container catalog

def test_container_catalog_passes_check():
    proc = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(CONTAINER_CATALOG),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_container_catalog_models():
    cat = load_catalog(str(CONTAINER_CATALOG))
    levels = sorted(m.sleep_level for m in cat.models.values())
    assert levels == [1, 4]
    assert all("/" in m.model for m in cat.models.values())  # hub ids of real models
    assert os.path.dirname(cat.daemon.socket) == "/run/llmux"  # the directory compose shares
    assert cat.daemon.state_dir == "/var/lib/llmux"            # the image's volume


# ---------------------------------------------------------------- README sections

def test_readme_sections():
    text = SECTIONS.read_text()
    assert re.search(r"(?m)^## Run under systemd$", text)
    assert re.search(r"(?m)^## Run in a container$", text)
    for needle in ("systemctl daemon-reload", "systemctl enable --now llmuxd",
                   "systemctl reload llmuxd", "journalctl -u llmuxd", "/run/llmux/llmux.sock",
                   "docker build -f packaging/container/Dockerfile",
                   "docker compose -f packaging/container/compose.yaml up"):
        assert needle in text, f"README sections lack {needle!r}"


def test_documented_docker_run_flags_agree():
    """The README's and the Dockerfile's `docker run` lines carry the same flags."""
    def run_flags(text: str) -> list[str]:
        joined = re.sub(r"\\\n\s*(?:#\s*)?", " ", text)
        line = next(ln for ln in joined.splitlines() if "docker run -d" in ln)
        return shlex.split(line.split("docker run", 1)[1].lstrip("# "))
    readme = run_flags(SECTIONS.read_text())
    docker = run_flags(DOCKERFILE.read_text())
    assert readme == docker
    for flag in ("--init=false", "--privileged", "--pid=host", "--ipc=host", "--gpus"):
        assert flag in readme
    assert "--init" not in readme


# ---------------------------------------------------------------- Kubernetes

def test_kubernetes_manifests_validate():
    """kubernetes-validate --strict: every manifest against the API's schemas (unknown
    or misspelt fields fail). CI sets LLMUX_REQUIRE_KUBERNETES_VALIDATE=1: there a
    missing validator is a failure, not a skip."""
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        if os.environ.get("LLMUX_REQUIRE_KUBERNETES_VALIDATE"):
            pytest.fail("kubernetes-validate is not installed (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    assert KUBERNETES, "no manifests in packaging/kubernetes"
    proc = subprocess.run([tool, "--strict", *map(str, KUBERNETES)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(KUBERNETES), proc.stdout


def kubernetes_docs() -> dict[str, dict]:
    yaml = pytest.importorskip("yaml")
    docs = {}
    for path in KUBERNETES:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_daemonset_has_what_criu_needs(tmp_path):
    docs = kubernetes_docs()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostIPC"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert "command" not in container and "args" not in container  # the image's llmuxd, PID 1
    assert not pod.get("initContainers") and not pod.get("shareProcessNamespace")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The ConfigMap is the catalog directory, without subPath (which never updates).
    catalog = mounts["/etc/llmux"]
    assert "subPath" not in catalog and "configMap" in volumes[catalog["name"]]
    assert volumes[catalog["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    text = docs["ConfigMap"]["data"]["llmux.toml"]
    (tmp_path / "llmux.toml").write_text(text)
    cat = load_catalog(str(tmp_path / "llmux.toml"))
    # State and checkpoints on the node's disk, where the catalog puts them.
    state = volumes[mounts[cat.daemon.state_dir]["name"]]
    assert state["hostPath"]["path"] == cat.daemon.state_dir
    assert cat.daemon.checkpoint.images_dir.startswith(cat.daemon.state_dir + "/")
    assert cat.daemon.checkpoint.criu_path == f"{CRIU_PREFIX}/bin/criu"
    assert any(m.sleep_level == 4 for m in cat.models.values())
    # Ready when the front answers /health on the port the catalog gives it.
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert probe["port"] == int(cat.daemon.front.listen.rsplit(":", 1)[1])
    # Stopping checkpoints then stops every model: the grace covers stop_timeout.
    assert pod["terminationGracePeriodSeconds"] >= 4 * cat.daemon.stop_timeout
    proc = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(tmp_path / "llmux.toml"),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: the gateway sees every node
    assert service["selector"] == docs["DaemonSet"]["spec"]["selector"]["matchLabels"]


def test_readme_beyond_one_machine():
    text = SECTIONS.read_text()
    section = text.split("## Beyond one machine", 1)[1].split("\n## ", 1)[0]
    for needle in ("packaging/kubernetes", "/v1/models", "LiteLLM", "kubernetes-validate"):
        assert needle in section, f"README's 'Beyond one machine' lacks {needle!r}"


def test_smoke_runs_the_seed_flags_without_init():
    """packaging/container/smoke.sh (run by .ci/run) starts its containers with the
    seed's flags and never an init; bash can parse it."""
    text = SMOKE.read_text()
    subprocess.run(["bash", "-n", str(SMOKE)], check=True, timeout=30)
    run = re.sub(r"\\\n\s*", " ", text).split("pm run -d", 1)[1].split("\n", 1)[0]
    for flag in ("--privileged", "--ipc=host", "--init=false", "-v \"$state:/var/lib/llmux\""):
        assert flag in run, f"smoke.sh's podman run lacks {flag}"
    assert re.search(r"(?m)^start llmux-smoke-1 .* --pid=host$", text)
    assert not re.search(r"(?m)^start llmux-smoke-3 .*--pid", text)  # its own PID namespace
    assert "catatonit" not in text and "tini" not in text
    assert "bash packaging/container/smoke.sh" in (ROOT / ".ci" / "run").read_text()
