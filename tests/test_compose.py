"""Static checks of deploy/compose (no Docker engine here): services, flags, ports, volumes, GPUs, variables.

Files are parsed with pyyaml, variables interpolated and overrides merged the way `docker compose` does, and
every flag is checked against the installed Flower's `--help`, so a flag renamed or dropped in a Flower
upgrade fails here instead of in a container.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from deploy.processes import BIN, OFFLINE, ROOT

HERE = ROOT / "deploy" / "compose"
FLWR = version("flwr")
BINARIES = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
            "lorm-flower-superexec": "flower-superexec"}
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(KeyError):
    pass


def interpolate(value, env):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op else ""

    return VAR.sub(sub, value)


class _Reset:
    """Compose's `!reset` tag: the key is removed from what earlier files set."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: _Reset())


def _target(entry):
    return entry.split(":")[1] if isinstance(entry, str) else entry


def merge(base, over, key=""):
    """Override semantics of `docker compose -f a -f b`: commands replace, volumes/ports merge by target."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in ("command", "entrypoint"):
        kept = [b for b in base if _target(b) not in {_target(o) for o in over}]
        return kept + over
    return over


def load(*names, env=None):
    env = {} if env is None else env
    doc = {}
    for name in names:
        doc = merge(doc, interpolate(yaml.load((HERE / name).read_text(), Loader=_Loader), env))
    return doc


def dotenv():
    lines = (HERE / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def opt(service, flag):
    """The value of --flag=value (or --flag value) in a service's command; None when absent."""
    cmd = service["command"]
    for i, arg in enumerate(cmd):
        if arg == flag:
            return cmd[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def flags(service):
    return {arg.split("=")[0] for arg in service.get("command", []) if arg.startswith("--")}


WARM_EXEC = ["python", "-m", "cli.warm_exec"]  # flower-superexec with another executor: the same flags


def binary(service):
    image = service["image"].split(":")[0]
    if "entrypoint" in service:
        return "flower-superexec" if service["entrypoint"] == WARM_EXEC else None
    return BINARIES[image]


@pytest.fixture(scope="module")
def help_flags():
    out = {}
    for exe in set(BINARIES.values()):
        text = subprocess.run([str(BIN / exe), "--help"], capture_output=True, text=True, timeout=120,
                              env=os.environ | OFFLINE).stdout
        out[exe] = set(re.findall(r"--[a-z][a-z0-9-]*", text))
        assert "--help" in out[exe], exe
    return out


SETUPS = {
    "single host": (("compose.yml",), {}),
    "single host + TLS/auth": (("compose.yml", "compose.tls.yml"), {}),
    "single host, no GPU": (("compose.yml", "compose.cpu.yml"), {}),
    "single host + TLS/auth, no GPU": (("compose.yml", "compose.tls.yml", "compose.cpu.yml"), {}),
    "server": (("compose.server.yml",), dotenv()),
    "client": (("compose.client.yml",), dotenv()),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_every_flag_exists_in_installed_flower(setup, help_flags):
    files, env = SETUPS[setup]
    checked = 0
    for name, service in load(*files, env=env)["services"].items():
        exe = binary(service)
        if exe is None:
            continue
        unknown = flags(service) - help_flags[exe]
        assert not unknown, f"{setup}: {name} passes {sorted(unknown)}, not in `{exe} --help` of flwr {FLWR}"
        assert service["image"].endswith(":0.1.0") or service["image"].endswith(f":{FLWR}"), service["image"]
        checked += 1
    assert checked >= 2


def _has_gpu(service):
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_single_host():
    doc = load("compose.yml")
    s = doc["services"]
    assert set(s) == {"superlink-state", "superlink", "superexec-serverapp", *(f"supernode-{i}" for i in (1, 2, 3)),
                      *(f"superexec-clientapp-{i}" for i in (1, 2, 3))}
    link = s["superlink"]
    assert "--insecure" in link["command"] and opt(link, "--isolation") == "process"
    assert opt(link, "--port") == "8000" and link["ports"] == ["8000:8000"]
    assert opt(link, "--database") == "/app/state/state.db" and "superlink-state:/app/state" in link["volumes"]
    assert "superlink-state" in doc["volumes"]
    # the state volume is handed to the image's user before the SuperLink opens its database there
    assert s["superlink-state"]["entrypoint"][:3] == ["chown", "-R", "app:app"]
    assert link["depends_on"]["superlink-state"]["condition"] == "service_completed_successfully"
    assert opt(s["superexec-serverapp"], "--runtime-api-address") == "superlink:8000"
    for i in (1, 2, 3):
        node, app = s[f"supernode-{i}"], s[f"superexec-clientapp-{i}"]
        assert app["entrypoint"] == WARM_EXEC
        assert opt(node, "--superlink") == "superlink:8000" and opt(node, "--isolation") == "process"
        assert opt(node, "--node-config") == f"partition-id={i - 1} num-partitions=3"
        assert opt(node, "--host") == "0.0.0.0"  # its SuperExec connects from another container
        assert opt(app, "--runtime-api-address") == f"supernode-{i}:{opt(node, '--port')}"
        assert app["depends_on"] == [f"supernode-{i}"]
    gpu = {name for name, service in s.items() if _has_gpu(service)}
    assert gpu == {"superexec-serverapp", *(f"superexec-clientapp-{i}" for i in (1, 2, 3))}
    for name in gpu:
        assert s[name]["build"]["dockerfile"] == "deploy/compose/Dockerfile"
        assert (HERE / s[name]["build"]["context"]).resolve() == ROOT
        assert s[name]["build"]["args"]["FLWR_VERSION"] == FLWR


def test_cpu_override_drops_every_gpu_reservation_and_nothing_else():
    for files in (("compose.yml",), ("compose.yml", "compose.tls.yml")):
        gpu, cpu = load(*files)["services"], load(*files, "compose.cpu.yml")["services"]
        assert set(cpu) == set(gpu)
        for name in gpu:
            assert not _has_gpu(cpu[name]) and "deploy" not in cpu[name], name
            assert cpu[name] == {k: v for k, v in gpu[name].items() if k != "deploy"}, name
    # an override naming a service compose.yml lacks would add a broken one
    assert set(load("compose.cpu.yml")["services"]) <= set(load("compose.yml")["services"])


def _mounts(service):
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def _check_tls_files(service, certs: Path):
    """Every /app/certificates path a flag names is mounted, from a file deploy/certs.sh wrote."""
    mounts = _mounts(service)
    paths = [a.split("=", 1)[1] for a in service["command"] if "=/app/certificates/" in a]
    assert paths
    for path in paths:
        assert path in mounts, path
        assert (HERE / mounts[path]).resolve().is_file(), mounts[path]
    return mounts


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), "-n", "3", str(out), "superlink", "203.0.113.10"],
                   check=True, capture_output=True)
    return out


def test_certs_script(certs):
    names = {p.name for p in certs.iterdir()}
    assert {"ca.crt", "server.pem", "server.key", "supernode-0", "supernode-2.pub"} <= names
    sans = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink", "IP Address:203.0.113.10"):
        assert san in sans
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (certs / "supernode-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (certs / "supernode-1").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_tls_and_auth_override(certs):
    s = load("compose.yml", "compose.tls.yml", env={"CERTS_DIR": str(certs)})["services"]
    link = s["superlink"]
    assert "--insecure" not in link["command"] and "--enable-supernode-auth" in link["command"]
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= flags(link)
    assert "superlink-state:/app/state" in link["volumes"] and opt(link, "--database") == "/app/state/state.db"
    assert link["ports"] == ["8000:8000"]
    _check_tls_files(link, certs)
    assert "--insecure" not in s["superexec-serverapp"]["command"]
    _check_tls_files(s["superexec-serverapp"], certs)
    for i in (1, 2, 3):
        node = s[f"supernode-{i}"]
        assert "--insecure" not in node["command"]
        assert opt(node, "--node-config") == f"partition-id={i - 1} num-partitions=3"
        mounts = _check_tls_files(node, certs)
        assert Path(mounts[opt(node, "--auth-supernode-private-key")]).name == f"supernode-{i - 1}"
        assert "server.key" not in " ".join(mounts.values())  # a SuperNode never sees the server's key
        assert _has_gpu(s[f"superexec-clientapp-{i}"])


def test_multi_host(certs):
    env = dotenv() | {"SUPERLINK_HOST": "link.example.org", "SUPERLINK_PORT": "9443", "PARTITION_ID": "2",
                      "NUM_PARTITIONS": "5", "SUPERNODE_KEY": "supernode-2", "CERTS_DIR": str(certs)}
    server = load("compose.server.yml", env=env)["services"]
    link = server["superlink"]
    assert link["ports"] == ["9443:8000"] and opt(link, "--host") == "0.0.0.0"
    assert "--enable-supernode-auth" in link["command"] and "--insecure" not in link["command"]
    _check_tls_files(link, certs)
    _check_tls_files(server["superexec-serverapp"], certs)
    assert _has_gpu(server["superexec-serverapp"])

    client = load("compose.client.yml", env=env)["services"]
    assert set(client) == {"supernode", "superexec-clientapp"}
    node = client["supernode"]
    assert opt(node, "--superlink") == "link.example.org:9443"
    assert opt(node, "--node-config") == "partition-id=2 num-partitions=5"
    assert "ports" not in node  # it only dials out
    mounts = _check_tls_files(node, certs)
    assert Path(mounts["/app/certificates/supernode.key"]).name == "supernode-2"
    assert opt(client["superexec-clientapp"], "--runtime-api-address") == f"supernode:{opt(node, '--port')}"
    assert _has_gpu(client["superexec-clientapp"])
    assert client["superexec-clientapp"]["entrypoint"] == WARM_EXEC

    with pytest.raises(MissingVariable, match="SUPERLINK_HOST"):
        load("compose.client.yml", env={k: v for k, v in env.items() if k != "SUPERLINK_HOST"})
    # every variable the multi-host files use is documented in .env.example
    used = set(re.findall(r"\$\{([A-Z_]+)", (HERE / "compose.server.yml").read_text()
                          + (HERE / "compose.client.yml").read_text()))
    assert used <= set(dotenv()), used - set(dotenv())


def test_dockerfile():
    text = (HERE / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR}" in text and "FROM flwr/superexec:${FLWR_VERSION}" in text
    pins = re.findall(r'"(torch(?:vision)?==[^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert len(pins) == 2 and all(f'"{pin}"' in text for pin in pins), pins  # same torch as scripts/setup.sh
    assert re.search(r"pip install .*-e \.", text)
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    copied = set()
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
            assert f"!{path}" in (HERE / "Dockerfile.dockerignore").read_text()  # not excluded from the context
            copied.add(path.rstrip("/"))
    # `pip install -e .` fails on a declared package whose folder the image lacks
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) <= copied, set(packages) - copied


def _has_compose():
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.containers
@pytest.mark.skipif(not _has_compose(), reason="no `docker compose` on this machine")
def test_docker_compose_config(certs):
    """Where Compose itself is installed, it must accept every file set (no engine needed for `config`)."""
    for files, env in SETUPS.values():
        args = [a for f in files for a in ("-f", str(HERE / f))]
        out = subprocess.run(["docker", "compose", *args, "config", "-q"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], **env, "CERTS_DIR": str(certs)})
        assert out.returncode == 0, out.stderr


@pytest.mark.containers
@pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman needs root (as the netns deployment test)")
def test_compose_brought_up_for_real(tmp_path):
    """tests/containers/compose_check.py: the project image built, compose.yml up with 3 SuperNodes and a job
    completed with its results on the volume, then TLS + SuperNode auth with an unregistered node refused."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "containers" / "compose_check.py"),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
    assert "all passed" in out.stdout, out.stdout
