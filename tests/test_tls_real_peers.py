"""TLS on both sides of gproxy, with real peers: Perl Gearman::Worker and Gearman::Client with
`use_ssl` (IO::Socket::SSL) connecting to gproxy, and a real haproxy terminating TLS (`bind
... ssl crt`, and `verify required` for mutual TLS) in front of a real gearmand, with the
shipped retry defaults unless a test says otherwise."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gproxy.config import load_config
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.reload import ConfigSource
from tests.gearmand import Gearmand, wait_for
from tests.haproxy import Haproxy
from tests.peer_procs import PeerSet, run_perlclient, run_pyclient, start_perlworker, start_pyworker
from tests.proxy_thread import ProxyThread
from tests.test_metrics import http_get
from tests.tls_files import Pki, make_pki

pytestmark = pytest.mark.timeout(120)
_ECHO = build_packet(REQ, PacketType.ECHO_REQ, data=b"through TLS")
_ECHOED = build_packet(RES, PacketType.ECHO_RES, data=b"through TLS")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def gproxy(directory: Path, upstream: tuple[str, int], tables: str, frozen: bool = False) -> ProxyThread:
    """gproxy from a config file (so that a reload reads it again): one route to `upstream`,
    a metrics listener, the shipped retry defaults, and `tables` (its TLS)."""
    directory.mkdir(exist_ok=True)
    path = directory / "gproxy.toml"
    write_config(path, upstream, tables)
    return ProxyThread(load_config(str(path)), frozen=frozen, source=ConfigSource(str(path)))


def write_config(path: Path, upstream: tuple[str, int], tables: str) -> None:
    path.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{upstream[0]}:{upstream[1]}"\nmetrics_listen = "127.0.0.1:0"\n{tables}'
    )


def ready(proxy: ProxyThread) -> tuple[int, str]:
    assert proxy.proxy is not None and proxy.proxy.metrics_address is not None
    return http_get(proxy.proxy.metrics_address, "/readyz")


def handshake_failures(proxy: ProxyThread, side: str, address: tuple[str, int]) -> float | None:
    return proxy.sample("gproxy_tls_handshake_failures_total", side=side, address=f"{address[0]}:{address[1]}")


@pytest.fixture
def terminator(gearmand: Gearmand, pki: Pki) -> Iterator[Haproxy]:
    with Haproxy(gearmand.address, pki.server.both) as haproxy:
        yield haproxy


@pytest.fixture
def mutual_terminator(gearmand: Gearmand, pki: Pki) -> Iterator[Haproxy]:
    with Haproxy(gearmand.address, pki.server.both, client_ca=pki.ca) as haproxy:
        yield haproxy


def test_perl_worker_and_client_speak_tls_to_gproxy_and_a_failure_is_retried(
    gearmand: Gearmand, pki: Pki, tmp_path: Path
) -> None:
    tables = f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n'
    with gproxy(tmp_path, gearmand.address, tables) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path, tls={"ca": pki.ca}))
        # The client goes through gproxy too, over TLS: its packets pass as they are.
        report = run_perlclient(proxy.address, "flaky", "1:over tls", unique="tls-perl-1", tls={"ca": pki.ca})
        assert report == {"state": "complete", "result": "ok after 2", "exit": 0}
        assert proxy.sample("gproxy_retries_total", function="flaky", reason="exception") == 1
        assert handshake_failures(proxy, "downstream", ("127.0.0.1", 0)) == 0


def test_a_worker_without_a_certificate_from_the_client_ca_is_refused_with_one_warning(
    gearmand: Gearmand, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tables = f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
    with gproxy(tmp_path, gearmand.address, tables) as proxy, PeerSet() as peers:
        peers.add(start_perlworker(
            proxy.address, state_dir=tmp_path, tls={"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key},
        ))
        assert run_pyclient(gearmand.address, "reverse", "mutual").stdout == b"lautum"
        caplog.clear()
        with pytest.raises(RuntimeError, match="before printing 'ready'"):  # (it dies: registering failed)
            start_perlworker(
                proxy.address, state_dir=tmp_path,
                tls={"ca": pki.ca, "cert": pki.stranger.cert, "key": pki.stranger.key},
            )
        with pytest.raises(RuntimeError, match="before printing 'ready'"):
            start_perlworker(proxy.address, state_dir=tmp_path, tls={"ca": pki.ca})
        # (Each worker may try more than once: Gearman::Worker connects again after a failure.)
        refusals = [r for r in caplog.records if r.name == "gproxy.pair" and "TLS handshake failed" in r.getMessage()]
        assert {r.levelno for r in refusals} == {logging.WARNING}
        fields = [r.fields for r in refusals]  # type: ignore[attr-defined]  # (a JSON line's fields)
        assert len({f["peer"] for f in fields}) == len(refusals)  # one line per connection refused
        assert all(r.getMessage().startswith(f"peer {f['peer']} (via ") for r, f in zip(refusals, fields, strict=True))
        assert {f["reason"] for f in fields} == {
            "TLS handshake failed: certificate verify failed: unable to get local issuer certificate",
            "TLS handshake failed: peer did not return a certificate",
        }
        assert handshake_failures(proxy, "downstream", ("127.0.0.1", 0)) == len(refusals)
        # The worker that presented the right certificate serves on.
        assert run_pyclient(gearmand.address, "reverse", "still").stdout == b"llits"


def test_a_refused_worker_hears_why_from_tls_itself(gearmand: Gearmand, pki: Pki, tmp_path: Path) -> None:
    """gproxy's alert goes out with the close: the worker's TLS library names the refusal
    (TLS 1.3 ends a client's handshake before the server checked its certificate, so it
    comes with the first read), rather than an unexplained end of the connection."""
    tables = f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
    with gproxy(tmp_path, gearmand.address, tables) as proxy:
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
            with trusting.wrap_socket(socket.create_connection(proxy.address, timeout=10), server_hostname="localhost") as tls:
                tls.recv(100)  # (nothing sent first: a worker whose packet gproxy never read would get a reset)


def test_a_plain_worker_on_a_tls_port_is_named_and_a_port_probe_is_no_failure(
    gearmand: Gearmand, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gproxy")
    tables = f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n'
    with gproxy(tmp_path, gearmand.address, tables) as proxy:
        plain = socket.create_connection(proxy.address, timeout=10)
        plain.sendall(build_packet(REQ, PacketType.CAN_DO, function=b"reverse"))
        with contextlib.suppress(ConnectionResetError):  # (closed with its packet unread: a reset)
            assert plain.recv(10) == b""
        plain.close()
        socket.create_connection(proxy.address, timeout=10).close()  # a TCP health check

        def lines() -> list[tuple[int, str]]:
            return [(r.levelno, r.getMessage().split(": closed: ")[1]) for r in caplog.records if r.name == "gproxy.pair"]

        wait_for(lambda: len(lines()) == 2, 10, "both close lines")
        assert lines() == [
            (logging.WARNING, "TLS handshake failed: not TLS: the worker sent no TLS record (it speaks plain Gearman)"),
            (logging.INFO, "the worker closed before its TLS handshake began"),
        ]
        assert handshake_failures(proxy, "downstream", ("127.0.0.1", 0)) == 1


def test_gproxy_speaks_tls_to_haproxy_in_front_of_gearmand_retry_connection_included(
    gearmand: Gearmand, terminator: Haproxy, pki: Pki, tmp_path: Path
) -> None:
    tables = f'[upstream_tls]\nca = "{pki.ca}"\nserver_name = "localhost"\n'
    with gproxy(tmp_path, terminator.address, tables) as proxy, PeerSet() as peers:
        assert ready(proxy) == (200, "ready\n")
        peers.add(start_pyworker(proxy.address, state_dir=tmp_path))
        # The client goes straight to gearmand: the retry is submitted by gproxy, over TLS.
        run = run_pyclient(gearmand.address, "flaky", "2:to haproxy", unique="tls-haproxy-1")
        assert (run.returncode, run.stdout) == (0, b"ok after 3")
        assert proxy.sample("gproxy_retries_total", function="flaky", reason="exception") == 2
        assert handshake_failures(proxy, "upstream", terminator.address) == 0


def test_mutual_tls_on_both_sides_and_a_refused_client_certificate(
    gearmand: Gearmand, mutual_terminator: Haproxy, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    both_sides = (
        f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
        f'[upstream_tls]\nca = "{pki.ca}"\ncert = "{pki.client.cert}"\nkey = "{pki.client.key}"\n'
    )
    worker_tls = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    with gproxy(tmp_path / "good", mutual_terminator.address, both_sides) as proxy, PeerSet() as peers:
        assert ready(proxy) == (200, "ready\n")
        peers.add(start_perlworker(proxy.address, state_dir=tmp_path, tls=worker_tls))
        report = run_perlclient(proxy.address, "flaky", "1:mutual", unique="tls-mutual-1", tls=worker_tls)
        assert report == {"state": "complete", "result": "ok after 2", "exit": 0}

    # Without its certificate, haproxy refuses gproxy. TLS 1.3 completes gproxy's handshake
    # before haproxy has checked it: the refusal comes with the ECHO that confirms it.
    no_certificate = f'[upstream_tls]\nca = "{pki.ca}"\n'
    with gproxy(tmp_path / "bad", mutual_terminator.address, no_certificate) as proxy:
        status, why = ready(proxy)
        assert status == 503 and "TLS handshake failed: refused by the peer" in why and "certificate" in why, why
        caplog.clear()
        worker = socket.create_connection(proxy.address, timeout=10)
        assert worker.recv(10) == b""  # closed: no gearmand to serve it
        worker.close()
        (line,) = [r for r in caplog.records if r.name == "gproxy.pair"]
        assert line.levelno == logging.WARNING and "TLS handshake failed" in line.getMessage()
        assert handshake_failures(proxy, "upstream", mutual_terminator.address) == 1


def test_a_wrong_ca_fails_readiness_holds_gearmand_off_and_a_reload_fixes_it(
    gearmand: Gearmand, terminator: Haproxy, pki: Pki, tmp_path: Path
) -> None:
    """With the clock frozen, the hold-off never ends by itself: 20 workers connecting at
    once cost one handshake, not 20; the reload that names the right CA ends it."""
    with gproxy(tmp_path, terminator.address, f'[upstream_tls]\nca = "{pki.other_ca}"\n', frozen=True) as proxy:
        status, why = ready(proxy)
        assert status == 503 and "certificate verify failed: unable to get local issuer certificate" in why, why
        workers = [socket.create_connection(proxy.address, timeout=10) for _ in range(20)]
        assert [w.recv(10) for w in workers] == [b""] * 20
        for w in workers:
            w.close()
        status, why = ready(proxy)
        assert status == 503 and "tried again in" in why, why
        assert handshake_failures(proxy, "upstream", terminator.address) == 1
        assert proxy.sample("gproxy_upstream_up", upstream=f"{terminator.address[0]}:{terminator.address[1]}") == 0

        write_config(tmp_path / "gproxy.toml", terminator.address, f'[upstream_tls]\nca = "{pki.ca}"\n')
        assert proxy.proxy is not None
        assert proxy.call(proxy.proxy.reloader.reload)[0]
        assert ready(proxy) == (200, "ready\n")
        assert proxy.sample("gproxy_upstream_up", upstream=f"{terminator.address[0]}:{terminator.address[1]}") == 1


def test_a_reload_rotates_the_certificate_for_new_workers_and_keeps_the_connected_ones(
    gearmand: Gearmand, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "proxy-cert.pem", tmp_path / "proxy-key.pem"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    with gproxy(tmp_path, gearmand.address, f'[listen_tls]\ncert = "{cert}"\nkey = "{key}"\n') as proxy:
        before = trusting.wrap_socket(socket.create_connection(proxy.address, timeout=10), server_hostname="127.0.0.1")
        first = before.getpeercert(binary_form=True)
        rotated = pki.reissue_server("rotated")
        shutil.copy(rotated.cert, cert)  # (same paths: what cert-manager or certbot do)
        shutil.copy(rotated.key, key)
        assert proxy.proxy is not None
        assert proxy.call(proxy.proxy.reloader.reload) == (True, f"config reloaded from {tmp_path / 'gproxy.toml'}")
        after = trusting.wrap_socket(socket.create_connection(proxy.address, timeout=10), server_hostname="127.0.0.1")
        assert first == ssl.PEM_cert_to_DER_cert(pki.server.cert.read_text())
        assert after.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(rotated.cert.read_text())
        for connection in (before, after):  # both serve: the old one kept its session
            connection.sendall(_ECHO)
            assert _read(connection, len(_ECHOED)) == _ECHOED
            connection.close()


def _read(connection: ssl.SSLSocket, size: int) -> bytes:
    got = b""
    while len(got) < size and (chunk := connection.recv(size - len(got))):
        got += chunk
    return got


def test_the_gproxy_command_with_tls_on_both_sides_and_json_logs(
    gearmand: Gearmand, mutual_terminator: Haproxy, pki: Pki, tmp_path: Path
) -> None:
    """The production path (the data plane as the process's main loop, trio its guest):
    Perl worker and client over mutual TLS to gproxy, gproxy over mutual TLS to haproxy in
    front of gearmand, a failure retried on the retry connection; a worker with a certificate
    of another CA refused, its JSON line naming it and why."""
    host, port = mutual_terminator.address
    path = tmp_path / "gproxy.toml"
    path.write_text(
        f'listen = "127.0.0.1:0"\nupstream = "{host}:{port}"\nlog_format = "json"\n'
        f'[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
        f'[upstream_tls]\nca = "{pki.ca}"\ncert = "{pki.client.cert}"\nkey = "{pki.client.key}"\n'
        '[retry]\nbackoff_initial = 0.05\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        listening = json.loads(proc.stderr.readline())
        proxy = ("127.0.0.1", int(listening["via"].rsplit(":", 1)[1]))
        worker_tls = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
        with PeerSet() as peers:
            peers.add(start_perlworker(proxy, state_dir=tmp_path, tls=worker_tls))
            report = run_perlclient(proxy, "flaky", "1:command", unique="tls-command-1", tls=worker_tls)
            assert report == {"state": "complete", "result": "ok after 2", "exit": 0}
            with pytest.raises(RuntimeError, match="before printing 'ready'"):
                start_perlworker(
                    proxy, state_dir=tmp_path, tls={"ca": pki.ca, "cert": pki.stranger.cert, "key": pki.stranger.key},
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 0
    retried = [(line["function"], line.get("reason"), line["attempt"]) for line in lines if line["logger"] == "gproxy.retry"]
    assert retried == [("flaky", "exception", 2), ("flaky", None, 2)]  # retrying; then it succeeded
    refused = [line for line in lines if line["level"] == "WARNING"]  # (the worker may try twice)
    assert refused and all(line["logger"] == "gproxy.pair" and line["peer"].startswith("127.0.0.1:") for line in refused)
    assert {line["reason"] for line in refused} == {
        "TLS handshake failed: certificate verify failed: unable to get local issuer certificate",
    }
