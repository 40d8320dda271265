# cython: language_level=3
"""The data plane's loop, compiled: the same Endpoint and DataPlane as gproxy/dataplane.py
(which documents them, and is the fallback where this is not built), with the readiness
wait, the reads and the direct writes in C. A read costs one recv into a buffer the plane
reuses, and one bytes object of the size that came, instead of a 64 KiB one shrunk.

Behaviour is the pure module's, line for line; tests/test_dataplane.py runs against both.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, ENOTCONN, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp

import collections
import contextlib
import os
import socket

import trio

from .core.connections import LinkState
from .core.fields import about
from .core.forwarding import (
    BYPASS_DOWNSTREAM, BYPASS_UPSTREAM, GRAB_JOB_UNIQ_PACKET, UPGRADED, WATCHED_DOWNSTREAM, WATCHED_DRAINING,
    WATCHED_UPSTREAM,
)
from .core.protocol import HEADER_SIZE, REQ, RES, PacketType
from .dataplane import _CLOSED, HIGH_WATER, MAX_EVENTS, RECEIVE_SIZE, log, run_as_host


cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CLOEXEC

cdef extern from "sys/socket.h" nogil:
    ssize_t c_recv "recv" (int sockfd, void *buf, size_t length, int flags)
    ssize_t c_send "send" (int sockfd, const void *buf, size_t length, int flags)
    enum:
        MSG_NOSIGNAL

# (EWOULDBLOCK is EAGAIN on Linux)
cdef extern from "unistd.h" nogil:
    int c_close "close" (int fd)

cdef uint32_t _READ = EPOLLIN | EPOLLRDHUP
cdef uint32_t _WRITE = EPOLLOUT
cdef uint32_t _BROKEN = EPOLLERR | EPOLLHUP
cdef Py_ssize_t _HIGH_WATER = HIGH_WATER
cdef Py_ssize_t _RECEIVE_SIZE = RECEIVE_SIZE


cdef class Gate

cdef extern from *:
    """
    #ifndef GPROXY_CHECKED_BUILD
    #define GPROXY_CHECKED_BUILD 0
    #endif
    """
    const int GPROXY_CHECKED_BUILD

CHECKED_BUILD = bool(GPROXY_CHECKED_BUILD)
"""Built with Cython's bounds and None checks on (setup.py, GPROXY_CHECKED_BUILD=1)."""
cdef enum:
    _MAX_EVENTS = 256  # (MAX_EVENTS of the pure module, checked at import below)

if MAX_EVENTS != _MAX_EVENTS:
    raise ImportError("gproxy._dataplane was built for another MAX_EVENTS: rebuild it")


cdef object _os_error(int code):
    """The OSError the socket module would raise for `code` (its subclass by errno)."""
    return OSError(code, os.strerror(code))


cdef class Endpoint:
    """One connected socket of the data plane, and what waits to be written to it."""

    cdef public DataPlane _plane
    cdef public object sock
    cdef public int fd
    cdef public object receive
    cdef public object handler
    cdef public str peer
    cdef public bint reading
    cdef public bint closed
    cdef public bint ended
    cdef public bint watched
    cdef public object error
    cdef public object _out
    cdef public Py_ssize_t buffered
    cdef public bint _eof_pending
    cdef public bint shut
    cdef public uint32_t _mask
    cdef bint _native
    cdef public Gate gate
    """The Session's bypass rule for what this endpoint reads (None: every read to the handler)."""

    def __init__(self, DataPlane plane, sock, handler, str peer):
        self._plane = plane
        self.sock = sock
        self.fd = sock.fileno()
        self.receive = sock.recv
        self.handler = handler
        self.peer = peer
        self.reading = True
        self.closed = False
        self.ended = False
        self.watched = True
        self.error = None
        self._out = collections.deque()
        self.buffered = 0
        self._eof_pending = False
        self.shut = False
        self._mask = _READ
        self._native = type(self) is Endpoint  # (a subclass reads through its `receive`)
        self.gate = None

    def write(self, data):
        """Send `data` after whatever waits already; never blocks, never raises."""
        cdef Py_ssize_t size, sent
        cdef const char *start
        if self.closed or self.error is not None or not data:
            return
        if not self._out and type(data) is bytes:
            size = PyBytes_GET_SIZE(data)
            start = PyBytes_AS_STRING(data)
            sent = c_send(self.fd, start, size, MSG_NOSIGNAL)  # (non-blocking: the GIL is kept)
            if sent < 0:
                if errno != EAGAIN and errno != EINTR:
                    self._broken(_os_error(errno))
                    return
                sent = 0
            if sent == size:
                return
            view = memoryview(data)[sent:]
        elif not self._out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._broken(exc)
                return
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
        else:
            view = memoryview(data)
        self._out.append(view)
        self.buffered += len(view)
        self._watch()

    def shutdown_write(self):
        """Half-close once everything written so far has gone: the peer reads EOF."""
        if self.closed:
            return
        self.shut = True
        if self._out:
            self._eof_pending = True
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != ENOTCONN:
                self._broken(exc)

    def pause(self):
        if self.reading:
            self.reading = False
            self._watch()

    def resume(self):
        if not self.reading and not self.closed and not self.ended:
            self.reading = True
            self._watch()

    def close(self):
        """Forget it and close the socket; what waited to be written is dropped, and so is
        the handler."""
        if not self.closed:
            self.closed = True
            self._out.clear()
            self.buffered = 0
            self._plane._forget(self)
            self.sock.close()
            self.handler = _CLOSED
            self.gate = None

    def _flush(self):
        """Write what waits; True if the buffer fell below HIGH_WATER from above it."""
        cdef Py_ssize_t before = self.buffered
        out = self._out
        try:
            while out:
                view = out[0]
                sent = self.sock.send(view)
                self.buffered -= sent
                if sent < len(view):
                    out[0] = view[sent:]
                    break
                out.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            self._broken(exc)
            return False
        if not out:
            if self._eof_pending:
                self._eof_pending = False
                self.shutdown_write()
            self._watch()
        return before >= _HIGH_WATER > self.buffered

    cpdef _watch(self):
        cdef uint32_t mask = (_READ if self.reading else 0) | (_WRITE if self._out else 0)
        if mask != self._mask and self.watched and not self.closed:
            self._mask = mask
            self._plane._modify(self.fd, mask)

    def _broken(self, exc):
        if self.error is None:
            self.error = exc
            self._out.clear()
            self.buffered = 0
            self._plane._report(self)

    def __repr__(self):
        return f"Endpoint({self.peer}, fd {self.fd})"


cdef class DataPlane:
    """Owns the epoll object and the endpoints registered with it."""

    cdef public object clock
    cdef public bint hosted
    cdef int _epfd
    cdef dict _endpoints
    cdef list _broken
    cdef object _wake_fd
    cdef char *_buffer
    cdef epoll_event _events[_MAX_EVENTS]

    def __cinit__(self):
        self._epfd = -1
        self._buffer = <char *>malloc(_RECEIVE_SIZE)
        if self._buffer == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._buffer)
        if self._epfd >= 0:
            c_close(self._epfd)

    def __init__(self, clock=None):
        import time

        self.clock = clock if clock is not None else time.monotonic
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise _os_error(errno)
        self._endpoints = {}
        self._broken = []
        self._wake_fd = None
        self.hosted = False

    def __len__(self):
        return len(self._endpoints)

    def add(self, sock, handler, str peer, tls=None):
        """Take over a connected socket (with `tls`: whose handshake is done): from now on
        only this loop reads and writes it."""
        sock.setblocking(False)
        if tls is None:
            endpoint = Endpoint(self, sock, handler, peer)
        else:
            from .tls_endpoint import TlsEndpoint

            endpoint = TlsEndpoint(self, sock, handler, peer, tls)
        self._endpoints[endpoint.fd] = endpoint
        self._ctl(EPOLL_CTL_ADD, endpoint.fd, _READ)
        return endpoint

    def guard(self, endpoint, pair, session, endpoints, link=None):
        """Let `endpoint`'s reads that the Session need not see bypass it (see Gate); a TLS
        endpoint's go to its pair, whose Session bypasses them in Python."""
        if type(endpoint) is Endpoint:
            (<Endpoint>endpoint).gate = Gate(pair, session, endpoints, link)

    cdef _ctl(self, int op, int fd, uint32_t mask):
        cdef epoll_event event
        event.events = mask
        event.data.u64 = 0
        event.data.fd = fd
        if epoll_ctl(self._epfd, op, fd, &event) < 0:
            raise _os_error(errno)

    def _modify(self, int fd, uint32_t mask):
        self._ctl(EPOLL_CTL_MOD, fd, mask)

    def poll(self, double timeout):
        """Serve everything ready now (waiting up to `timeout` seconds, -1: until something
        is); returns how many events there were."""
        cdef int count, i, fd, wake_fd
        cdef uint32_t mask
        cdef int milliseconds = -1 if timeout < 0 else <int>(timeout * 1000 + 0.999)
        cdef ssize_t got
        cdef Endpoint endpoint
        with nogil:
            count = epoll_wait(self._epfd, self._events, _MAX_EVENTS, milliseconds)
        if count < 0:
            if errno != EINTR:
                raise _os_error(errno)
            count = 0
        endpoints = self._endpoints
        wake_fd = self._wake_fd if self._wake_fd is not None else -1
        for i in range(count):
            fd = self._events[i].data.fd
            mask = self._events[i].events
            if fd == wake_fd:
                os.eventfd_read(fd)
                continue
            found = endpoints.get(fd)
            if found is None:
                continue
            endpoint = <Endpoint>found
            handler = endpoint.handler
            try:
                if mask & _WRITE and endpoint._flush():
                    handler.drained(endpoint)
                if endpoint.closed or endpoint.error is not None:
                    continue
                if (endpoint.reading and mask & _READ) or (mask & _BROKEN and not endpoint.ended):
                    # (a hang-up is read even while paused: its EOF or error)
                    if endpoint._native:
                        got = c_recv(fd, self._buffer, _RECEIVE_SIZE, 0)  # (non-blocking)
                        if got < 0:
                            if errno == EAGAIN or errno == EINTR:
                                continue
                            self._ended(endpoint, handler, _os_error(errno))
                            continue
                        data = PyBytes_FromStringAndSize(self._buffer, got)
                        if got and endpoint.gate is not None and endpoint.gate.bypasses(data):
                            continue
                    else:
                        try:
                            data = endpoint.receive(_RECEIVE_SIZE)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            self._ended(endpoint, handler, exc)
                            continue
                    if data:
                        handler.received(endpoint, data)
                    else:
                        self._ended(endpoint, handler, None)
                elif mask & _BROKEN:  # told already; epoll would report the hang-up forever
                    self._unwatch(endpoint)
            except Exception as exc:  # a bug closes its pair, not the process
                self._failed(endpoint, exc)
        if self._broken:
            self._report_broken()
        return count

    cdef _ended(self, Endpoint endpoint, handler, error):
        endpoint.error = error
        endpoint.ended = True
        endpoint.pause()  # level-triggered: an EOF would be reported again and again
        handler.ended(endpoint, error)

    def _report_broken(self):
        while self._broken:
            broken, self._broken = self._broken, []
            for endpoint in broken:
                if endpoint.closed or endpoint.ended:
                    continue
                endpoint.ended = True
                endpoint.pause()
                try:
                    endpoint.handler.ended(endpoint, endpoint.error)
                except Exception as exc:
                    self._failed(endpoint, exc)

    def _failed(self, endpoint, exc):
        try:
            endpoint.handler.failed(endpoint, exc)
        except Exception:  # the handler's last resort failed too: still only this socket
            log.exception("%r: internal error while closing it", endpoint, extra=about(peer=endpoint.peer))
            endpoint.close()

    def _report(self, endpoint):
        """A write found `endpoint` broken: its handler hears of it from the loop."""
        self._broken.append(endpoint)
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)

    def _unwatch(self, Endpoint endpoint):
        cdef epoll_event event
        if endpoint.watched:
            endpoint.watched = False
            epoll_ctl(self._epfd, EPOLL_CTL_DEL, endpoint.fd, &event)  # (an error: it is gone already)

    def _forget(self, Endpoint endpoint):
        if self._endpoints.get(endpoint.fd) is endpoint:
            del self._endpoints[endpoint.fd]
            self._unwatch(endpoint)

    def fileno(self):
        return self._epfd

    async def drive(self):
        """Serve until cancelled, as a trio task: for tests and embedding under trio."""
        self._ensure_wake_fd()
        while True:
            if self._broken:
                self._report_broken()
            await trio.lowlevel.wait_readable(self._epfd)
            self.poll(0)

    def run_host(self, main, *args, clock=None):
        """Run `main(*args)` under trio as this loop's guest, serving sockets meanwhile;
        returns what it returns (or raises what it raises)."""
        return run_as_host(self, main, *args, clock=clock)

    def reports_waiting(self):
        """Broken writes are yet to be reported to their handlers (poll at once)."""
        return bool(self._broken)

    def _ensure_wake_fd(self):
        if self._wake_fd is None:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._ctl(EPOLL_CTL_ADD, self._wake_fd, EPOLLIN)
        return self._wake_fd

    def close(self):
        for endpoint in list(self._endpoints.values()):
            endpoint.close()
        if self._wake_fd is not None:
            os.close(self._wake_fd)
            self._wake_fd = None
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1


cdef object _OPEN = LinkState.OPEN
cdef Py_ssize_t _HEADER = HEADER_SIZE
cdef int _TYPES = max(PacketType) + 1


cdef class Gate:
    """Session.bypasses_downstream and .bypasses_upstream, compiled: a read that is one whole
    packet the Session need not see goes on to the other side and is counted, with no Python
    call: a type it does not watch now, a worker's grab (its entry put on the current link's
    grabs_pending, a GRAB_JOB sent as GRAB_JOB_UNIQ where gearmand knows it), gearmand's NO_JOB
    (its grab taken off). The facts are the Session's own, read when a packet comes (its
    framer, drain, ejection, traits, current link, whether the worker is there); the type
    sets are core/forwarding.py's. tests/test_gate.py holds this to the pure rule."""

    cdef object session
    cdef object link
    cdef object framer
    cdef object pair
    cdef object endpoints
    cdef bytes magic
    cdef Py_ssize_t max_packet_size
    cdef unsigned char watched[64]
    cdef unsigned char watched_draining[64]
    cdef unsigned char bypass[64]
    cdef unsigned char upgraded[64]

    def __init__(self, pair, session, endpoints, link=None):
        """`endpoints`: the pair's endpoints by link (for the worker's reads); `link`: the
        link whose reads this gate sees (None: the worker's)."""
        cdef int number
        self.pair, self.session, self.endpoints, self.link = pair, session, endpoints, link
        self.framer = session.downstream if link is None else link.framer
        self.magic = self.framer.magic
        self.max_packet_size = self.framer.max_packet_size
        watched = WATCHED_DOWNSTREAM if link is None else WATCHED_UPSTREAM
        draining = WATCHED_DRAINING if link is None else WATCHED_UPSTREAM
        bypass = BYPASS_DOWNSTREAM if link is None else BYPASS_UPSTREAM
        if _TYPES > 64:
            raise ImportError("more packet types than the gate's tables hold")
        for number in range(64):
            known = number < _TYPES and number in PacketType._value2member_map_
            ptype = PacketType(number) if known else None
            self.watched[number] = not known or ptype in watched
            self.watched_draining[number] = not known or ptype in draining
            self.bypass[number] = known and ptype in bypass
            self.upgraded[number] = known and ptype in UPGRADED

    cpdef bint bypasses(self, bytes data) except -1:
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef uint32_t number, length
        cdef bint answered_here, upgrade, grab = False
        if size < _HEADER or memcmp(p, PyBytes_AS_STRING(self.magic), 4) != 0:
            return False
        number = (p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7]
        length = (p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11]
        if number >= 64 or length + _HEADER != size or length > self.max_packet_size:
            return False
        session = self.session
        link = self.link
        if link is None:
            answered_here = session.drain.started or session.ejection.until is not None  # (grabs_answered_here)
            if answered_here:
                if self.watched_draining[number]:
                    return False
            elif self.bypass[number]:
                grab = True
            elif self.watched[number]:
                return False
            link = session.current
            if link.state is not _OPEN:
                return False
            other = self.endpoints.get(link)
        else:
            if (self.watched[number] and not self.bypass[number]) or link is not session.current or session.worker_gone:
                return False
            other = self.pair.worker
        if other is None:
            return False
        framer = self.framer
        if framer._pending or framer._skipping or framer._error is not None:
            return False
        if grab:  # (Assignments.grab)
            upgrade = self.upgraded[number] and session.traits.grab_uniq
            link.grabs_pending.append(upgrade)
            if upgrade:
                data = GRAB_JOB_UNIQ_PACKET
        elif self.bypass[number]:  # a NO_JOB: its grab answered (Assignments.received)
            pending = link.grabs_pending
            if pending:
                pending.popleft()
        framer.counts[number] += 1
        other.write(data)
        if other.buffered:
            self.pair._flow()
        return True
