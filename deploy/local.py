"""Run the app as a real deployment on this machine: one SuperLink and K SuperNodes as separate processes.

    python -m deploy.local [--supernodes 3] [--run-config "rank=8 beta=0.1"] [--tls | --auth] [--netns]

Not the simulation engine: the SuperLink (`flower-superlink`, no --simulation) serves the Fleet, Control and
Runtime APIs over HTTP on one port; each SuperNode (`flower-supernode`) connects to it and serves its own
Runtime API on a port of its own; `flwr run` submits the app through the Control API. Every process runs with
its own FLWR_HOME under the workdir (default outputs/.deploy) and logs to <name>.log there; all of them are
stopped by PID when the run ends, fails or is interrupted. Exits non-zero unless the run finished as completed.

--tls makes a CA and server certificate with deploy/certs.sh (or uses --certs DIR); --auth adds SuperNode
authentication (registers each SuperNode's public key with `flwr supernode register` before it starts);
--netns puts the SuperLink and each SuperNode in a network namespace of its own (root only, see deploy/netns.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cli.warm_exec import POLL_ENV
from deploy.hosts import Host, Hosts, loopback
from deploy.netns import namespaces
from deploy.processes import BIN, OFFLINE, ROOT, Processes, flwr_run, free_port, nodes_online, run_status, wait_for_port

CONNECTION = "deploy"
LINK_PORT = 8000  # Flower's default; used as is only where the SuperLink has a network namespace of its own
# Flower fails a run whose SuperLink restarts; the run's own checkpoint survives it (and any failed round).
RESUME = ("[deploy] to continue the run, submit it again with the same run-name (the ServerApp's first log line "
          "names it): it resumes from its last checkpoint")


@dataclass
class Deployment:
    """A running SuperLink (+ SuperNodes); `env` points the `flwr` CLI at it through the `deploy` connection."""

    workdir: Path
    env: dict
    address: str
    procs: Processes
    certs: Path | None
    base_env: dict = field(repr=False)
    link: Host = field(default_factory=Host)
    link_cmd: list[str] = field(default_factory=list)  # how the SuperLink was started, to start it again
    connection: str = CONNECTION

    def start_superlink(self) -> subprocess.Popen:
        """Start the SuperLink on its port and database. Started again after it died, it finds the federation in
        the database; Flower marks the runs it had in flight as failed (the app's checkpoint lets them resume)."""
        env = self.base_env | {"FLWR_HOME": str(self.workdir / "superlink")}
        proc = self.procs.start("superlink", self.link_cmd, env, self.link.prefix)
        # imports alone take 20 s on a busy 2-core box
        wait_for_port(self.link.address, int(self.address.rpartition(":")[2]), proc, timeout=120)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path) -> None:
        out = self.flwr("supernode", "register", str(public_key), self.connection)
        if out.returncode != 0:
            raise RuntimeError(f"`flwr supernode register {public_key.name}` failed:\n{out.stdout}{out.stderr}")

    def start_supernode(self, name: str, host: Host, node_config: str, key: Path | None = None,
                        extra: tuple[str, ...] = ()) -> subprocess.Popen:
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        # The Runtime API only serves this node's own SuperExec, so it stays on the node's loopback.
        port = 9094 if host.own_network else free_port()
        tls = ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(key)] if key else []
        # flower-supernode, polling the SuperLink every 0.2 s when idle instead of 3 s (cli/supernode.py)
        cmd = [sys.executable, "-m", "cli.supernode", "--idle-poll", "0.2", *tls, *auth, "--superlink",
               self.address, "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config,
               "--isolation", "process", *extra]
        env = self.base_env | {"FLWR_HOME": str(home), "PYTHONPATH": str(ROOT)}
        node = self.procs.start(name, cmd, env, host.prefix)
        # The node's SuperExec, warm: its ClientApp runs in one long-lived process (cli/warm_exec.py), not a
        # fresh one per message. It leaves with the node (--parent-pid).
        self.procs.start(f"{name}-exec", [sys.executable, "-m", "cli.warm_exec", "--insecure",
                                          "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(node.pid)],
                         env, host.prefix)
        return node

    def nodes_online(self) -> int:
        return nodes_online(self.env, self.connection)

    def wait_for_nodes(self, k: int, nodes: list[subprocess.Popen], timeout: float = 180.0) -> None:
        """Until k SuperNodes are online: a run started earlier would wait for them a round timeout long."""
        deadline = time.monotonic() + timeout
        while (online := self.nodes_online()) < k:
            dead = [p for p in nodes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SuperNode exited with code {dead[0].returncode}: see {self.workdir}/*.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online} of {k} SuperNodes online after {timeout:.0f} s")
            time.sleep(0.5)


def _fresh(workdir: Path) -> None:
    """Remove what an earlier deployment left in workdir (state, homes, logs), and only that."""
    workdir.mkdir(parents=True, exist_ok=True)
    for path in workdir.iterdir():
        if path.name in ("cli", "superlink") or path.name.startswith(("supernode-", "superlink.")) or (
            path.suffix == ".log"
        ):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextmanager
def local_deployment(workdir: Path, k: int, *, tls: Path | None = None, auth: bool = False,
                     hosts: Hosts | None = None, node_config: str = ""):
    """Start a SuperLink and k SuperNodes (partition-id=i num-partitions=k); yield the Deployment.

    tls: a folder made by deploy/certs.sh (ca.crt, server.pem, server.key and, with auth, supernode-<i>[.pub]).
    hosts: where each process runs (default: all on loopback, every port picked free).
    """
    if auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS: pass tls=<folder from deploy/certs.sh>")
    hosts = hosts or loopback(k)
    if len(hosts.nodes) != k:
        raise ValueError(f"{len(hosts.nodes)} SuperNode hosts for {k} SuperNodes")
    workdir, tls = workdir.resolve(), tls.resolve() if tls else None
    _fresh(workdir)
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL: the SuperLink's own SuperExec asks for a run's ServerApp every 0.1 s, not 1 s
    base_env = os.environ | OFFLINE | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                       POLL_ENV: os.environ.get(POLL_ENV, "0.1")}
    procs = Processes(workdir)
    try:
        link = hosts.link
        port = LINK_PORT if link.own_network else free_port()
        (workdir / "superlink").mkdir()
        tls_args = (["--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem"),
                     "--ssl-keyfile", str(tls / "server.key")] if tls else ["--insecure"])
        address = f"{link.address}:{port}"
        cli = workdir / "cli"
        cli.mkdir()
        security = f'root-certificates = "{tls / "ca.crt"}"' if tls else "insecure = true"
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
        )
        link_cmd = [str(BIN / "flower-superlink"), *tls_args, *(["--enable-supernode-auth"] if auth else []),
                    "--host", link.address, "--port", str(port), "--database", str(workdir / "superlink.db"),
                    "--disable-runtime-dependency-installation"]
        dep = Deployment(workdir, base_env | {"FLWR_HOME": str(cli)}, address, procs, tls, base_env, link, link_cmd)
        superlink = dep.start_superlink()
        print(f"[deploy] SuperLink pid {superlink.pid} on {address}"
              f"{' (TLS' + (' + SuperNode auth)' if auth else ')') if tls else ''}", flush=True)

        nodes = []
        for i, host in enumerate(hosts.nodes):
            key = tls / f"supernode-{i}" if auth else None
            if key:
                dep.register(key.with_suffix(".pub"))
            config = f"partition-id={i} num-partitions={k} {node_config}".strip()
            nodes.append(dep.start_supernode(f"supernode-{i}", host, config, key))
            print(f"[deploy] SuperNode {i} pid {nodes[-1].pid}{' on ' + host.address if host.own_network else ''}",
                  flush=True)
        dep.wait_for_nodes(k, nodes)
        print(f"[deploy] {k} SuperNodes online", flush=True)
        yield dep
    finally:
        procs.stop_all()
        print(f"[deploy] stopped {len(procs.procs)} processes; logs in {workdir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=3, help="SuperNodes (clients) to start")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "rank=8 beta=0.1"')
    parser.add_argument("--node-config", default="", help='added to every SuperNode, e.g. "data-dir=/data"')
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / ".deploy")
    parser.add_argument("--tls", action="store_true", help="TLS between every process and the SuperLink")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--certs", type=Path, help="a folder from deploy/certs.sh (default: made in the workdir)")
    parser.add_argument("--netns", action="store_true", help="one network namespace per process (root only)")
    args = parser.parse_args(argv)
    # A plain SIGTERM would skip the finally blocks that stop the processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Every client must take part in every round: the ServerApp starts once min-clients SuperNodes are connected.
    run_config = f"min-clients={args.supernodes} {args.run_config}".strip()
    node_config = args.node_config
    if "num-threads" not in node_config:
        # K ClientApps train at once on one machine: torch's default (every core each) oversubscribes the CPU,
        # which measured 4x slower here.
        node_config += f" num-threads={max(1, (os.cpu_count() or 1) // args.supernodes)}"
    started = time.perf_counter()
    with ExitStack() as stack:
        hosts = None
        if args.netns:
            hosts = stack.enter_context(namespaces(args.supernodes))
        certs = args.certs
        if (args.tls or args.auth) and certs is None:
            certs = args.workdir.resolve() / "certs"
            names = [hosts.link.address] if hosts else []
            subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), "-n", str(args.supernodes), str(certs), *names],
                           check=True)
        try:
            dep = stack.enter_context(local_deployment(args.workdir, args.supernodes, tls=certs, auth=args.auth,
                                                       hosts=hosts, node_config=node_config.strip()))
            run_id = flwr_run(dep.env, dep.connection, ROOT, run_config, [])
            status = run_status(dep.env, dep.connection, run_id)
        except (RuntimeError, TimeoutError) as err:
            print(f"[deploy] failed: {err}\n{RESUME}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("[deploy] interrupted", file=sys.stderr)
            return 130
    print(f"[deploy] run {run_id}: {status} in {time.perf_counter() - started:.0f} s")
    if not status.startswith("finished:completed"):
        print(RESUME, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
