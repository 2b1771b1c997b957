"""Docker Compose brought up for real: build, start, run a job, check its results, tear down.

    sudo .venv/bin/python tests/containers/compose_check.py [--workdir DIR] [--remove-images]

On a machine with podman (rootful) or without any engine (Debian: it runs tests/containers/podman_setup.sh,
which installs podman and builds stand-ins for the flwr/* images). Two passes over deploy/compose, each with
compose.cpu.yml since no GPU is assumed:

1. compose.yml: SuperLink, the ServerApp's SuperExec, 3 SuperNodes with their warm ClientApp SuperExecs; a tiny
   job submitted from this host with `flwr run`, which must end `finished:completed` with its metrics.json on
   the `results` volume.
2. + compose.tls.yml: TLS and SuperNode authentication; the keys of supernode-1 and -2 registered, supernode-3's
   not. The job must complete on the two registered nodes, and the SuperLink must refuse supernode-3.

Every container, network and volume of the project is removed at the end, also on failure; the images stay
(the project image takes minutes to build) unless --remove-images. Each step prints its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from deploy.processes import BIN, OFFLINE, flwr_run, nodes_online, run_status  # noqa: E402

COMPOSE_DIR = ROOT / "deploy" / "compose"
PROJECT = "lorm-flower-check"
APP_UID = 49999  # the user the flwr images run as: it must read the mounted certificates
TINY_JOB = ("backbone='vit_tiny_test' img-size=32 num-tasks=1 rounds-per-task=1 local-epochs=1 "
            "max-train-per-class=6 max-test-per-class=4")
# The pip configuration of these machines: torch 2.14.1 and friends lie in local wheel folders, which the
# project image's build reads through bind mounts (everything else comes from PyPI).
LOCAL_WHEELS = [Path("/opt/pypi"), Path("/opt/pypi-more"), Path("/opt/wheels")]


def step(msg: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {out.returncode}:\n{(out.stdout + out.stderr)[-4000:]}")
    return out


class Compose:
    """`podman-compose -p PROJECT -f ... ` over a list of compose files in deploy/compose."""

    def __init__(self, files: list[str], env: dict):
        self.files = files
        self.env = env

    def __call__(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        fargs = [a for f in self.files for a in ("-f", str(COMPOSE_DIR / f))]
        return sh("podman-compose", "-p", PROJECT, *fargs, *args, check=check, timeout=timeout, env=self.env)

    def logs(self, service: str) -> str:
        out = sh("podman", "logs", f"{PROJECT}_{service}_1", check=False)
        return out.stdout + out.stderr


class Cli:
    """The `flwr` CLI of this checkout, on a Flower home of its own with one connection, `compose`."""

    def __init__(self, home: Path, ca: Path | None):
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{ca}"' if ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "compose"\n\n[superlink.compose]\naddress = "127.0.0.1:8000"\n{security}\n')
        self.env = os.environ | OFFLINE | {"FLWR_HOME": str(home)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=120)

    def nodes_online(self) -> int:
        return nodes_online(self.env, "compose")

    def wait_until_up(self, k: int, compose: Compose, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while (online := self.nodes_online()) < k:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online} of {k} SuperNodes online after {timeout:.0f} s; SuperLink log:\n"
                                   f"{compose.logs('superlink')[-3000:]}")
            time.sleep(2)

    def run_job(self, k: int, log: Path) -> str:
        with log.open("w") as stream:
            run_id = flwr_run(self.env, "compose", ROOT, f"{TINY_JOB} min-clients={k} run-name='compose-check'",
                              [], stream_to=stream)
        return run_status(self.env, "compose", run_id)


def results_metrics(volume: str) -> dict:
    mount = sh("podman", "volume", "inspect", volume, "--format", "{{.Mountpoint}}").stdout.strip()
    found = sorted(Path(mount).rglob("metrics.json"))
    if len(found) != 1:
        raise AssertionError(f"expected one metrics.json on volume {volume} ({mount}), found {found}")
    return json.loads(found[0].read_text())


def build_args(workdir: Path) -> str:
    """--podman-build-args: the image's build sees the local wheel folders and a pip.conf naming them."""
    mounts = [p for p in LOCAL_WHEELS if p.is_dir()]
    conf = workdir / "pip.conf"
    indexes = " ".join(f"file://{p}/simple" for p in mounts if (p / "simple").is_dir())
    links = [str(p) for p in mounts if not (p / "simple").is_dir()]
    conf.write_text("[global]\n" + (f"extra-index-url = {indexes}\n" if indexes else "")
                    + (f"find-links = {' '.join(links)}\n" if links else ""))
    volumes = [f"-v {p}:{p}:ro" for p in mounts] + [f"-v {conf}:/etc/pip.conf:ro"]
    # podman 4.3 does not read the Dockerfile's own .dockerignore: name it, or the whole checkout (.venv) is sent.
    return " ".join([*volumes, f"--ignorefile {COMPOSE_DIR / 'Dockerfile.dockerignore'}"])


@contextmanager
def brought_up(compose: Compose, *services: str):
    try:
        compose("up", "-d", *services, timeout=600)
        yield
    finally:
        compose("down", "-v", "-t", "10", check=False, timeout=600)


def completed_job(name: str, cli: Cli, compose: Compose, k: int, workdir: Path) -> None:
    """The tiny job on k SuperNodes, which must complete with its metrics.json on the results volume."""
    t = time.monotonic()
    status = cli.run_job(k, workdir / f"{name}-run.log")
    step(f"{name}: run {status} ({time.monotonic() - t:.0f} s)")
    if not status.startswith("finished:completed"):
        raise AssertionError(f"{name} run ended {status}; serverapp log:\n"
                             f"{compose.logs('superexec-serverapp')[-4000:]}")
    metrics = results_metrics(f"{PROJECT}_results")
    step(f"{name}: metrics.json on the results volume: FAA {metrics['faa']:.2f}, accuracy matrix "
         f"{metrics['acc_matrix']}")


def plain_pass(workdir: Path, env: dict) -> None:
    compose = Compose(["compose.yml", "compose.cpu.yml"], env)
    cli = Cli(workdir / "cli-plain", ca=None)
    t = time.monotonic()
    with brought_up(compose):
        cli.wait_until_up(3, compose)
        step(f"plain: SuperLink + 3 SuperNodes online ({time.monotonic() - t:.0f} s)")
        completed_job("plain", cli, compose, 3, workdir)


def tls_pass(workdir: Path, env: dict) -> None:
    certs = workdir / "certs"
    sh("bash", str(ROOT / "deploy" / "certs.sh"), "-n", "3", str(certs), "superlink")
    for path in [certs, *certs.iterdir()]:
        os.chown(path, APP_UID, APP_UID)
    compose = Compose(["compose.yml", "compose.tls.yml", "compose.cpu.yml"], env | {"CERTS_DIR": str(certs)})
    cli = Cli(workdir / "cli-tls", ca=certs / "ca.crt")
    t = time.monotonic()
    with brought_up(compose, "superlink", "superexec-serverapp"):
        deadline = time.monotonic() + 120
        while (out := cli("supernode", "register", str(certs / "supernode-0.pub"), "compose")).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not register supernode-0 over TLS:\n{out.stdout}{out.stderr}")
            time.sleep(2)
        if (out := cli("supernode", "register", str(certs / "supernode-1.pub"), "compose")).returncode != 0:
            raise RuntimeError(f"could not register supernode-1:\n{out.stdout}{out.stderr}")
        compose("up", "-d", timeout=600)  # every service: supernode-3's key (supernode-2) is not registered
        cli.wait_until_up(2, compose)
        step(f"tls: SuperLink with TLS + SuperNode auth, 2 registered SuperNodes online ({time.monotonic() - t:.0f} s)")
        completed_job("tls", cli, compose, 2, workdir)
        online = cli.nodes_online()
        node_log, link_log = compose.logs("supernode-3"), compose.logs("superlink")
        # the two sides of a refusal, as tests/test_deploy_local.py checks them without containers
        if online != 2 or "Failed to activate SuperNode" not in node_log or (
                "No SuperNode found with the given public key" not in link_log):
            raise AssertionError(f"the unregistered supernode-3 was not refused ({online} online); its log:\n"
                                 f"{node_log[-3000:]}\nSuperLink log:\n{link_log[-3000:]}")
        step("tls: unregistered supernode-3 refused (its log: 'Failed to activate SuperNode'; the SuperLink's: "
             "'No SuperNode found with the given public key')")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="certificates, CLI homes and run logs (default: a temp dir)")
    p.add_argument("--remove-images", action="store_true", help="also remove the project image at the end")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: rootful podman (sudo)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compose-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    t = time.monotonic()
    if shutil.which("podman") is None or shutil.which("podman-compose") is None or sh(
            "podman", "image", "exists", "flwr/superexec:1.42.0", check=False).returncode != 0:
        subprocess.run(["bash", str(ROOT / "tests" / "containers" / "podman_setup.sh")], check=True)
    step(f"engine and flwr images ready ({time.monotonic() - t:.0f} s)")

    env = os.environ | {"PODMAN_COMPOSE_WARNING_LOGS": "false"}
    t = time.monotonic()
    # --podman-build-args is a global option of podman-compose: before the command. One service: the four
    # SuperExecs share the image, and podman-compose would build it four times at once.
    Compose(["compose.yml", "compose.cpu.yml"], env)(f"--podman-build-args={build_args(workdir)}", "build",
                                                     "superexec-serverapp", timeout=3600)
    size = sh("podman", "image", "inspect", "lorm-flower-superexec:0.1.0", "--format", "{{.Size}}").stdout.strip()
    step(f"project image built: {int(size) / 1e9:.1f} GB ({time.monotonic() - t:.0f} s)")
    try:
        plain_pass(workdir, env)
        tls_pass(workdir, env)
    finally:
        if args.remove_images:
            sh("podman", "rmi", "-f", "lorm-flower-superexec:0.1.0", check=False)
    step(f"all passed in {time.monotonic() - start:.0f} s; logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
