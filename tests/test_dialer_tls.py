"""The dialer's TLS to gearmand on a fake clock: a lasting refusal holds that gearmand off
(doubling, capped), a success or a reload starts afresh. The server is a small TLS stand-in
for a terminator in front of gearmand (it answers the confirming ECHO), whose certificate the
test switches; the real haproxy is in test_tls_real_peers.py."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

from gproxy.config import Address, Config, Route
from gproxy.core.metrics import Metrics
from gproxy.core.protocol import REQ, RES, PacketType, build_packet
from gproxy.core.tls_refusals import INITIAL, MAXIMUM, HandshakeFailed, HeldOff
from gproxy.dialer import Dialer
from gproxy.tls import RouteTls, UpstreamTls, client_context, server_context
from tests.tls_files import Pki, make_pki

_ECHO = build_packet(REQ, PacketType.ECHO_REQ, data=b"gproxy: TLS confirmed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Terminator:
    """Accepts TLS with `self.context` (switchable), answers one ECHO, counts handshakes."""

    def __init__(self, context: ssl.SSLContext, hang_up: bool = False) -> None:
        self.context = context
        self.hang_up = hang_up
        """Close each connection at once, before any handshake (a terminator restarting)."""
        self.handshakes = 0
        self.address: Address | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._one, listeners)

    async def _one(self, stream: trio.SocketStream) -> None:
        self.handshakes += 1
        if self.hang_up:
            await stream.aclose()
            return
        tls = trio.SSLStream(stream, self.context, server_side=True)
        try:
            await tls.do_handshake()
            request = b""
            while len(request) < len(_ECHO):
                request += await tls.receive_some(len(_ECHO) - len(request))
            await tls.send_all(build_packet(RES, PacketType.ECHO_RES, data=request[12:]))
            await tls.receive_some(10)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)


def dialer_to(address: Address, pki: Pki) -> tuple[Dialer, Route, Metrics]:
    route = Route(Address("127.0.0.1", 0), address)
    upstream = UpstreamTls(server_name="localhost", ca=str(pki.ca), context=client_context(str(pki.ca), None, None))
    config = Config(routes=(route,), tls={route: RouteTls(upstream=upstream)})
    metrics = Metrics()
    return Dialer(metrics, lambda: config), route, metrics


async def test_a_lasting_refusal_holds_gearmand_off_doubling_and_a_success_starts_afresh(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    trusted = server_context(str(pki.server.cert), str(pki.server.key), None)
    untrusted = server_context(str(pki.stranger.cert), str(pki.stranger.key), None)
    terminator = Terminator(untrusted)
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.serve)
        assert terminator.address is not None
        dialer, route, metrics = dialer_to(terminator.address, pki)
        failures = metrics.tls_handshake_failures.labels("upstream", str(terminator.address))

        async def dial() -> str:
            try:
                (await dialer.connect(route)).close()
            except HandshakeFailed as exc:
                return f"{type(exc).__name__}: {exc}"
            return "connected"

        assert await dial() == "HandshakeFailed: certificate verify failed: unable to get local issuer certificate"
        assert await dial() == (
            "HeldOff: certificate verify failed: unable to get local issuer certificate (0.0s ago; tried again in 1.0s)"
        )
        assert (terminator.handshakes, failures._value.get()) == (1, 1)  # held off: no handshake at all
        await trio.sleep(INITIAL)
        assert (await dial()).startswith("HandshakeFailed: ")
        await trio.sleep(INITIAL)
        assert (await dial()).startswith("HeldOff: ") and terminator.handshakes == 2  # now 2 s
        await trio.sleep(INITIAL)
        terminator.context = trusted  # the terminator's certificate fixed
        assert await dial() == "connected"
        terminator.context = untrusted
        assert (await dial()).startswith("HandshakeFailed: ")
        await trio.sleep(INITIAL)  # afresh: one second, not four
        assert (await dial()).startswith("HandshakeFailed: ")
        assert terminator.handshakes == 5 and failures._value.get() == 4
        nursery.cancel_scope.cancel()


async def test_the_hold_off_is_capped_and_a_reload_forgets_it(pki: Pki, autojump_clock: trio.testing.MockClock) -> None:
    terminator = Terminator(server_context(str(pki.stranger.cert), str(pki.stranger.key), None))
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.serve)
        assert terminator.address is not None
        dialer, route, _ = dialer_to(terminator.address, pki)
        waits = []
        for _ in range(8):
            with pytest.raises(HandshakeFailed):
                await dialer.transport(route)
            with pytest.raises(HeldOff) as held:
                await dialer.transport(route)
            waits.append(float(str(held.value).rsplit("in ", 1)[1].rstrip("s)")))
            await trio.sleep(waits[-1])
        assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, MAXIMUM, MAXIMUM, MAXIMUM]
        with pytest.raises(HandshakeFailed) as failed:
            await dialer.transport(route)
        assert type(failed.value) is HandshakeFailed
        dialer.forget_refusals()
        with pytest.raises(HandshakeFailed) as failed:  # tried at once: a handshake, not a hold-off
            await dialer.transport(route)
        assert type(failed.value) is HandshakeFailed and terminator.handshakes == 10
        nursery.cancel_scope.cancel()


async def test_a_connection_lost_during_the_handshake_is_no_refusal_and_holds_nothing_off(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    terminator = Terminator(server_context(str(pki.server.cert), str(pki.server.key), None), hang_up=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.serve)
        assert terminator.address is not None
        dialer, route, _ = dialer_to(terminator.address, pki)
        for _ in range(3):
            with pytest.raises(HandshakeFailed, match="closed by the peer during the TLS handshake") as failed:
                await dialer.transport(route)
            assert not failed.value.lasting
        assert terminator.handshakes == 3  # each tried at once
        nursery.cancel_scope.cancel()
