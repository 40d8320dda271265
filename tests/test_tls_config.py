"""TLS settings: parsed, their files loaded and checked once (at start, by check-config and at
every reload), each mistake one line naming the key and the file."""

from __future__ import annotations

import shutil
import socket
import ssl
from pathlib import Path

import pytest

from gproxy.cli import main
from gproxy.config import ConfigError, load_config, unreloadable
from gproxy.reload import ConfigSource
from tests.proxy_thread import ProxyThread
from tests.tls_files import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(directory: Path, text: str) -> str:
    path = directory / "gproxy.toml"
    path.write_text(text)
    return str(path)


def test_both_sides_are_loaded_with_their_defaults(pki: Pki, tmp_path: Path) -> None:
    config = load_config(write(tmp_path, (
        'upstream = "gearmand.internal:4731"\n'
        f'[listen_tls]\ncert = "{pki.server.both}"\n'
        f'[upstream_tls]\nca = "{pki.ca}"\ncert = "{pki.client.cert}"\nkey = "{pki.client.key}"\n'
    )))
    tls = config.tls_of(config.routes[0])
    assert tls.listen is not None and tls.upstream is not None
    assert (tls.listen.cert, tls.listen.key, tls.listen.client_ca) == (str(pki.server.both), None, None)
    assert tls.listen.context.verify_mode == ssl.CERT_NONE  # (no client_ca: workers show no certificate)
    assert tls.upstream.server_name == "gearmand.internal"  # the upstream's host, by default
    assert tls.upstream.context.verify_mode == ssl.CERT_REQUIRED and tls.upstream.context.check_hostname
    assert tls.upstream.context.minimum_version == tls.listen.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_client_ca_makes_every_worker_show_a_certificate(pki: Pki, tmp_path: Path) -> None:
    config = load_config(write(tmp_path, (
        f'upstream = "g:1"\n[listen_tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
    )))
    listen = config.tls_of(config.routes[0]).listen
    assert listen is not None and listen.context.verify_mode == ssl.CERT_REQUIRED


def test_relative_paths_are_the_config_files_directory(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    shutil.copy(pki.server.both, tmp_path / "tls" / "proxy.pem")
    shutil.copy(pki.ca, tmp_path / "tls" / "ca.pem")
    config = load_config(write(tmp_path, (
        'upstream = "g:1"\n[listen_tls]\ncert = "tls/proxy.pem"\n[upstream_tls]\nca = "tls/ca.pem"\nserver_name = "g.internal"\n'
    )))
    tls = config.tls_of(config.routes[0])
    assert tls.listen is not None and tls.listen.cert == str(tmp_path / "tls" / "proxy.pem")
    assert tls.upstream is not None and tls.upstream.ca == str(tmp_path / "tls" / "ca.pem")
    assert tls.upstream.server_name == "g.internal"


def test_each_route_has_its_own_and_a_plain_route_has_none(pki: Pki, tmp_path: Path) -> None:
    config = load_config(write(tmp_path, (
        '[[routes]]\nlisten = "127.0.0.1:4730"\nupstream = "g:1"\n'
        f'[routes.listen_tls]\ncert = "{pki.server.both}"\n'
        '[[routes]]\nlisten = "127.0.0.1:4731"\nupstream = "h:1"\n'
        f'upstream_tls = {{ ca = "{pki.ca}" }}\n'
        '[[routes]]\nlisten = "127.0.0.1:4732"\nupstream = "k:1"\n'
    )))
    first, second, third = (config.tls_of(route) for route in config.routes)
    assert first.listen is not None and first.upstream is None
    assert second.listen is None and second.upstream is not None
    assert third.listen is None and third.upstream is None
    assert list(config.tls) == list(config.routes[:2])


@pytest.mark.parametrize(("tables", "message"), [
    ('[listen_tls]\nkey = "{key}"\n', r"^listen_tls.key: given without cert"),
    ('[listen_tls]\nclient_ca = "{ca}"\n', r"^listen_tls.cert: required"),
    ('[listen_tls]\ncert = "{both}"\nverify = true\n', r"^listen_tls.verify: unknown TLS setting \(known: cert, key, client_ca\)"),
    ('[upstream_tls]\ninsecure = true\n', r"^upstream_tls.insecure: unknown TLS setting \(known: ca, cert, key, server_name\)"),
    ('listen_tls = "{both}"\n', r"^listen_tls: expected a table with cert, key, client_ca"),
    ('[upstream_tls]\nca = ""\n', r"^upstream_tls.ca: expected a non-empty string, got ''"),
    ('[listen_tls]\ncert = "{missing}"\n', r"^listen_tls: cannot read '.*/missing.pem': No such file or directory$"),
    ('[listen_tls]\ncert = "{garbage}"\n', r"^listen_tls: '.*garbage.pem': expected a PEM certificate and its private key \(OpenSSL: "),
    ('[listen_tls]\ncert = "{cert}"\n', r"^listen_tls: '.*server-cert.pem': expected a PEM certificate and its private key"),
    ('[listen_tls]\ncert = "{cert}"\nkey = "{other_key}"\n', r"^listen_tls: the key in '.*stranger-key.pem' does not belong to the certificate in '.*server-cert.pem'$"),
    ('[listen_tls]\ncert = "{both}"\nclient_ca = "{garbage}"\n', r"^listen_tls: '.*garbage.pem': expected PEM CA certificates \(OpenSSL: "),
    ('[upstream_tls]\nca = "{garbage}"\n', r"^upstream_tls: '.*garbage.pem': expected PEM CA certificates"),
    ('[upstream_tls]\nca = "{ca}"\ncert = "{missing}"\n', r"^upstream_tls: cannot read '.*missing.pem'"),
])
def test_a_mistake_is_one_line_naming_the_key_and_the_file(pki: Pki, tmp_path: Path, tables: str, message: str) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    text = 'upstream = "g:1"\n' + tables.format(
        key=pki.server.key, ca=pki.ca, both=pki.server.both, cert=pki.server.cert, other_key=pki.stranger.key,
        missing=tmp_path / "missing.pem", garbage=tmp_path / "garbage.pem",
    )
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_route_tables_cannot_be_combined_with_top_level_ones(pki: Pki, tmp_path: Path) -> None:
    text = f'[listen_tls]\ncert = "{pki.server.both}"\n[[routes]]\nupstream = "g:1"\n'
    with pytest.raises(ConfigError, match=r"^listen_tls: cannot be combined with \[\[routes\]\]"):
        load_config(write(tmp_path, text))


def test_tls_changes_live_and_the_route_stays_the_same(pki: Pki, tmp_path: Path) -> None:
    plain = load_config(write(tmp_path, 'upstream = "g:1"\n'))
    secured = load_config(write(tmp_path, f'upstream = "g:1"\n[listen_tls]\ncert = "{pki.server.both}"\n'))
    assert unreloadable(plain, secured) is None
    assert plain.routes == secured.routes


def test_check_config_names_the_files(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = f'upstream = "g:1"\n[listen_tls]\ncert = "{pki.server.both}"\n[upstream_tls]\nca = "{pki.ca}"\n'
    assert main(["check-config", write(tmp_path, text)]) == 0
    out = capsys.readouterr().out
    assert f'  listen_tls: cert = "{pki.server.both}"\n' in out
    assert f'  upstream_tls: server_name = "g", ca = "{pki.ca}"\n' in out
    (tmp_path / "bad.pem").write_text("nope\n")
    assert main(["check-config", write(tmp_path, f'upstream = "g:1"\n[listen_tls]\ncert = "{tmp_path}/bad.pem"\n')]) == 2
    assert capsys.readouterr().err.startswith("gproxy: configuration error: listen_tls: ")


def test_a_reload_that_cannot_load_a_certificate_changes_nothing(pki: Pki, tmp_path: Path) -> None:
    cert = tmp_path / "proxy.pem"
    shutil.copy(pki.server.both, cert)
    path = write(tmp_path, f'listen = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\n[listen_tls]\ncert = "{cert}"\n')
    with ProxyThread(load_config(path), source=ConfigSource(path)) as proxy:
        assert proxy.proxy is not None
        cert.write_text("truncated by a careless copy\n")
        done, message = proxy.call(proxy.proxy.reloader.reload)
        assert not done
        assert message.startswith(f"reload refused: configuration error: listen_tls: '{cert}': expected a PEM certificate")
        assert message.endswith("; the running config stays")
        # The certificate loaded at the start still serves new handshakes.
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        with trusting.wrap_socket(socket.create_connection(proxy.address, timeout=10), server_hostname="localhost") as tls:
            assert tls.getpeercert() is not None
