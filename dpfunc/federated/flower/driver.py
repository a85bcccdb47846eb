"""Run a federated job on Flower's Deployment Engine: one SuperLink, one SuperNode per site, on localhost.

What :func:`run_flower` does (each step with its own timeout; nothing waits forever)::

    RUN/flower/app/pyproject.toml   generated: components → dpfunc.federated.flower.apps, config → request file
    RUN/flower/home/config.toml     FLWR_HOME of this run: the [superlink] connection the flwr CLI uses
    flower-superlink  --insecure --port P                     (new process group; health polled)
    flower-supernode  --superlink 127.0.0.1:P --node-config "partition-id=s ..."   × S
    flwr run RUN/flower/app local --format json   → run id
    poll RUN/flower_status.json (written by the ServerApp) and `flwr ls --run-id` until done or timeout
    finally: SIGTERM, then SIGKILL, every process group started here

With ``supernode_auth=True`` the same run uses TLS and Flower's SuperNode authentication: a throw-away CA,
a server certificate for 127.0.0.1 and one P-384 key pair per site are written to ``RUN/flower/credentials``
(:func:`make_credentials`); the SuperLink runs with ``--ssl-* --enable-supernode-auth``, each site's public
key is registered with ``flwr supernode register``, and each SuperNode proves its identity with
``--auth-supernode-private-key`` (a node whose key is not registered is refused: exit code 305).

Flower reports a failed run as success (``flwr run`` exits 0; ``flwr ls`` may say ``finished:completed``),
so the result is read from the run folder: ``flower_status.json`` must say ok and ``metrics.json`` must
hold all rounds. Every process gets ``FLWR_HOME`` (run-local), ``FLWR_DISABLE_UPDATE_CHECK=1``,
``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise the SuperLink
runs ``uv sync`` and installs the app's dependencies, a CUDA torch among them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from dpfunc.federated.job import FederatedConfig
from dpfunc.federated.rounds import RoundFailedError

__all__ = ["run_flower", "write_app", "FlowerRunError", "flower_env", "app_pyproject", "Credentials", "make_credentials",
           "launch_commands"]


class FlowerRunError(RuntimeError):
    """The Flower run did not produce a complete result (startup failure, timeout, server error)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process of a run."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
                "PYTHONUNBUFFERED": "1", "DPFUNC_PROGRESS": "0"})
    return env


def app_pyproject(request: Path) -> str:
    """The app's pyproject.toml (generated: ``flwr new`` needs the internet)."""
    from dpfunc._version import __version__

    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dpfunc-federated"
version = "{__version__}"
dependencies = []

[tool.flwr.app]
publisher = "dpfunc"

[tool.flwr.app.components]
serverapp = "dpfunc.federated.flower.apps:server_app"
clientapp = "dpfunc.federated.flower.apps:client_app"

[tool.flwr.app.config]
request = {json.dumps(str(request))}
"""


def write_app(cfg: FederatedConfig, *, run_dir: str | Path, data_dir: str | Path | None = None, resume: bool = False,
              bootstrap_resamples: int = 1000, threads: int | None = None) -> Path:
    """Write the Flower app of a run (``RUN/flower/app/pyproject.toml`` and the request it points to) and
    return its folder: what ``flwr run <folder> <superlink>`` submits, here or on a real deployment."""
    run_path = Path(run_dir).resolve()
    app = run_path / "flower" / "app"
    app.mkdir(parents=True, exist_ok=True)
    request = run_path / "flower" / "request.json"
    request.write_text(json.dumps({"config": asdict(cfg), "run_dir": str(run_path),
                                   "data_dir": str(Path(data_dir).resolve()) if data_dir else "",
                                   "resume": bool(resume), "bootstrap": int(bootstrap_resamples),
                                   "threads": threads}))
    (app / "pyproject.toml").write_text(app_pyproject(request))
    return app


class Credentials(NamedTuple):
    """Files of a TLS + SuperNode-authentication deployment (:func:`make_credentials`).

    Attributes:
        ca_cert: the CA certificate every SuperNode and the ``flwr`` CLI trust (``--root-certificates``).
        server_cert, server_key: the SuperLink's certificate (SAN: the given hosts) and its private key.
        site_keys: per site, its private key (OpenSSH format, P-384; ``--auth-supernode-private-key``).
        site_public_keys: per site, its public key (what ``flwr supernode register`` receives).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: tuple[Path, ...]
    site_public_keys: tuple[Path, ...]


def make_credentials(folder: str | Path, sites: int, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                     days: int = 1) -> Credentials:
    """Write a throw-away CA, a SuperLink certificate for ``hosts`` and one SuperNode key pair per site.

    For localhost runs and tests. In a real deployment each hospital makes its own key pair and sends only
    the public key to the coordinator (``ssh-keygen -t ecdsa -b 384 -N "" -f site``), and the certificate
    comes from the institution's CA (README, "Three hospitals over the network"). Keys are EC P-384 (Flower
    accepts NIST curves), private keys are written with mode 0600. Uses ``cryptography``.

    Raises:
        ValueError: ``sites`` < 1 or ``days`` < 1.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dpfunc._validate import check_int_range

    check_int_range("make_credentials", "sites", sites, low=1)
    check_int_range("make_credentials", "days", days, low=1)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    def private(path: Path, key, fmt) -> Path:
        data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpfunc federated CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
          .not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA384()))
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA384()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    private(out / "server.key", server_key, serialization.PrivateFormat.PKCS8)
    keys, pubs = [], []
    for s in range(sites):
        k = ec.generate_private_key(ec.SECP384R1())
        keys.append(private(out / f"site{s}.key", k, serialization.PrivateFormat.OpenSSH))
        pub = out / f"site{s}.pub"
        pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        pubs.append(pub)
    return Credentials(out / "ca.crt", out / "server.pem", out / "server.key", tuple(keys), tuple(pubs))


def launch_commands(cfg: FederatedConfig, *, superlink: str = "coordinator.example.org:9092",
                    supernode_auth: bool = True) -> str:
    """The shell commands of a deployment on separate machines (TLS; SuperNode authentication by default).

    One SuperLink on the coordinator, one SuperNode per hospital, the ``flwr`` CLI on the coordinator;
    the certificate names are those of the README's ``openssl`` lines, the key pairs those of
    ``ssh-keygen -t ecdsa -b 384 -N "" -f site<s>`` run at hospital s. Printed by
    ``dpfunc federated --engine flower --write-flower-app``.
    """
    host, _, port = superlink.rpartition(":")
    lines = ["# coordinator: the SuperLink (TLS" + (", only registered SuperNodes may connect)" if supernode_auth else ")"),
             f"flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key "
             f"--disable-runtime-dependency-installation --host 0.0.0.0 --port {port}"
             + (" --enable-supernode-auth" if supernode_auth else "")]
    if supernode_auth:
        lines.append("# coordinator: register each hospital's PUBLIC key (sent by the hospital; its private key never leaves it)")
        lines += [f"flwr supernode register site{s}.pub hospitals" for s in range(cfg.sites)]
    lines.append("# hospital s: its own data, its secret noise key" + (" and its private key" if supernode_auth else ""))
    for s in range(cfg.sites):
        lines.append(f"flower-supernode --root-certificates ca.crt --superlink {host}:{port}"
                     + (f" --auth-supernode-private-key site{s}" if supernode_auth else "")
                     + f" --node-config \"partition-id={s} num-partitions={cfg.sites} data-dir=\\\"/data/pneumoniamnist\\\" "
                       f"key-seed=$(python -c 'import secrets; print(secrets.randbits(63))')\"")
    return "\n".join(lines)


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        f.close()


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` s, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group may hold ServerApp/ClientApp children even if p exited
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _wait_health(port: int, proc: subprocess.Popen, timeout: float, log: Path, ca_cert: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    scheme, context = ("https", ssl.create_default_context(cafile=str(ca_cert))) if ca_cert else ("http", None)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerRunError(f"run_flower: flower-superlink exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise FlowerRunError(f"run_flower: the SuperLink did not answer /health within {timeout:g}s; see {log}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _flwr(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "flwr")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def run_flower(
    cfg: FederatedConfig,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path,
    resume: bool = False,
    bootstrap_resamples: int = 1000,
    log: Callable[[str], None] = print,
    startup_timeout: float = 60.0,
    run_timeout: float | None = None,
    site_node_config: dict[int, dict[str, str]] | None = None,
    on_registered: Callable[[dict[int, subprocess.Popen]], None] | None = None,
    supernode_auth: bool = False,
    device: str = "auto",
    threads: int | None = None,
) -> dict:
    """Run ``cfg`` on a local Flower deployment (SuperLink + one SuperNode per site) and return its metrics.

    Args:
        cfg: the job; ``cfg.round_timeout`` bounds each round's wait for the sites.
        data_dir: the data folder each site reads its shard from.
        run_dir: the run folder (the ServerApp writes it, as ``dpfunc train`` would).
        resume: continue from ``run_dir/checkpoint.pt``.
        startup_timeout: seconds for the SuperLink to come up and for ``flwr run`` to answer.
        run_timeout: seconds for the whole run; default ``120 + rounds · (round_timeout + 60)``.
        site_node_config: extra ``--node-config`` entries per site (tests use ``fault="nan"``).
        on_registered: called with ``{site: SuperNode process}`` once the server has found the sites
            (tests use it to kill a site).
        supernode_auth: TLS and SuperNode authentication (credentials in ``RUN/flower/credentials``, see
            the module docstring); default: plain ``--insecure`` localhost.
        device: where each site computes (``--device``; the SuperNodes' ``device`` node config, resolved by
            each ClientApp). The ServerApp's averaging and evaluation run on the CPU.
        threads: torch CPU threads of the ServerApp and of every ClientApp (``--threads``; node config
            ``threads``); None leaves torch's default.

    Returns:
        The metrics dict (``run_dir/metrics.json``).

    Raises:
        RoundFailedError: a round had fewer than ``min_sites`` usable answers (the checkpoint keeps the last
            complete round's model and charges each site asked in the failed round).
        FlowerRunError: anything else that kept the run from completing, with the log's tail.
    """
    run_path = Path(run_dir).resolve()
    fl = run_path / "flower"
    home = fl / "home"
    home.mkdir(parents=True, exist_ok=True)
    status_file = run_path / "flower_status.json"
    status_file.unlink(missing_ok=True)
    (run_path / "server.log").unlink(missing_ok=True)
    app = write_app(cfg, run_dir=run_path, data_dir=data_dir, resume=resume, bootstrap_resamples=bootstrap_resamples,
                    threads=threads)
    port = _free_port()
    creds = make_credentials(fl / "credentials", cfg.sites) if supernode_auth else None
    security = f'root-certificates = "{creds.ca_cert}"' if creds else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\n{security}\n')
    env = flower_env(home)
    link_tls = (["--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile",
                 str(creds.server_key), "--enable-supernode-auth"] if creds else ["--insecure"])
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    sites: dict[int, subprocess.Popen] = {}
    run_timeout = run_timeout if run_timeout is not None else 120 + cfg.rounds * (cfg.round_timeout + 60)
    t0 = time.monotonic()
    try:
        link_log = fl / "superlink.log"
        link = _start([str(bin_dir / "flower-superlink"), *link_tls, "--disable-runtime-dependency-installation",
                       "--host", "127.0.0.1", "--port", str(port), "--database", str(fl / "state.db")], env, link_log)
        procs.append(link)
        _wait_health(port, link, startup_timeout, link_log, creds.ca_cert if creds else None)
        if creds:  # the coordinator registers each site's public key before the sites connect
            for s, pub in enumerate(creds.site_public_keys):
                out = _flwr(["supernode", "register", str(pub), "local", "--format", "json"], env, startup_timeout)
                try:
                    ok = bool(json.loads(out.stdout).get("success"))
                except (ValueError, AttributeError):
                    ok = False
                if not ok:
                    raise FlowerRunError(f"run_flower: `flwr supernode register` failed for site {s} (exit "
                                         f"{out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        for s in range(cfg.sites):
            node_cfg = {"partition-id": str(s), "num-partitions": str(cfg.sites), "device": str(device)}
            if threads is not None:
                node_cfg["threads"] = str(threads)
            if cfg.report_train_loss:  # the site's own consent to send its raw loss (not covered by ε)
                node_cfg["report-train-loss"] = "1"
            node_cfg.update((site_node_config or {}).get(s, {}))
            text = " ".join(f"{k}={v}" if v.isdigit() else f'{k}="{v}"' for k, v in node_cfg.items())
            node_tls = (["--root-certificates", str(creds.ca_cert), "--auth-supernode-private-key", str(creds.site_keys[s])]
                        if creds else ["--insecure"])
            p = _start([str(bin_dir / "flower-supernode"), *node_tls, "--superlink", f"127.0.0.1:{port}",
                        "--node-config", text, "--port", str(_free_port())], env, fl / f"supernode-{s}.log")
            procs.append(p)
            sites[s] = p
        out = _flwr(["run", str(app), "local", "--format", "json"], env, startup_timeout)
        try:
            run_id = json.loads(out.stdout)["run-id"]
        except (ValueError, KeyError, TypeError):
            raise FlowerRunError(f"run_flower: `flwr run` did not return a run id (exit {out.returncode}):\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}") from None
        log(f"Flower run {run_id}: SuperLink 127.0.0.1:{port}, {cfg.sites} SuperNodes; logs in {fl}")
        registered, last_ls, printed = False, 0.0, 0
        while True:
            if status_file.exists():
                break
            if time.monotonic() - t0 > run_timeout:
                raise FlowerRunError(f"run_flower: no result within {run_timeout:g}s; server log:\n{_tail(run_path / 'server.log')}")
            lines = (run_path / "server.log").read_text(errors="replace").splitlines() if (run_path / "server.log").exists() else []
            for line in lines[printed:]:
                log(line)
                if line.startswith("sites registered") and not registered:
                    registered = True
                    if on_registered is not None:
                        on_registered(dict(sites))
            printed = len(lines)
            if time.monotonic() - last_ls > 5:
                last_ls = time.monotonic()
                try:
                    ls = _flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"], env, 30)
                    st = json.loads(ls.stdout)["runs"][0]["status"]
                except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError, TypeError):
                    st = ""
                if st.startswith("finished") and not status_file.exists():
                    time.sleep(1.0)
                    if not status_file.exists():
                        raise FlowerRunError(f"run_flower: Flower says the run is {st!r} but the ServerApp left no "
                                             f"result; server log:\n{_tail(run_path / 'server.log')}\n"
                                             f"SuperLink log:\n{_tail(fl / 'superlink.log')}")
            if link.poll() is not None:
                raise FlowerRunError(f"run_flower: the SuperLink exited with {link.returncode}:\n{_tail(fl / 'superlink.log')}")
            time.sleep(0.5)
        lines = (run_path / "server.log").read_text(errors="replace").splitlines() if (run_path / "server.log").exists() else []
        for line in lines[printed:]:
            log(line)
    finally:
        _stop(procs)
    status = json.loads(status_file.read_text())
    if not status.get("ok"):
        if status.get("kind") == "round_failed":
            raise RoundFailedError.from_message(status["error"])
        raise FlowerRunError(f"run_flower: the ServerApp failed: {status.get('error')}\n{_tail(run_path / 'server.log')}")
    metrics = json.loads((run_path / "metrics.json").read_text())
    if metrics.get("rounds") != cfg.rounds:
        raise FlowerRunError(f"run_flower: metrics.json holds {metrics.get('rounds')} rounds, {cfg.rounds} expected")
    return metrics
