"""What the worker tells gearmand about itself, and the rules for it on the way.

A worker registers functions (CAN_DO, CAN_DO_TIMEOUT), withdraws them (CANT_DO,
RESET_ABILITIES), names itself (SET_CLIENT_ID) and sets options (OPTION_REQ). gproxy keeps
all of it, to say it again on a fresh gearmand connection (`replay`), and on the way:
- a CAN_DO_TIMEOUT whose timeout is not a number of milliseconds is refused: gearmand 1.1.20
  dies of one that does not fit 64 bits;
- where the function's retry policy is enforced, a CAN_DO_TIMEOUT goes on as a plain CAN_DO,
  and gproxy times the attempts out itself (Deadlines): gearmand would requeue a timed-out
  job at once, held by gproxy or not;
- a CANT_DO or RESET_ABILITIES makes gearmand requeue the connection's jobs it names; where
  one of them is held by the Retrier, it is not sent there: the worker moves to a fresh
  connection instead (`received` answers MOVE), whose replay says it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Final, TypeVar

from ..config import Route
from .deadlines import Deadlines
from .jobs import Owner
from .policy import Mode
from .protocol import REQ, Packet, PacketType, ProtocolError, build_packet
from .retry import Retrier

P = PacketType
LinkT = TypeVar("LinkT", bound=Owner)
MOVE: Final = None
"""Registration.received's answer for a packet that must not go on the worker's connection:
the worker moves to a fresh one."""
_TIMEOUT: Final = re.compile(rb"\d{0,18}")
"""CAN_DO_TIMEOUT's milliseconds, decimal: at most 18 digits fit gearmand's 64-bit long."""


class Registration:
    """What the worker told gearmand about itself, to tell a fresh connection again."""

    def __init__(self) -> None:
        self._client_id = b""
        self._options: dict[bytes, bytes] = {}
        self._abilities: dict[bytes, bytes] = {}

    def received(
        self, packet: Packet, link: LinkT, retrier: Retrier[LinkT, Route] | None, deadlines: Deadlines[LinkT]
    ) -> bytes | None:
        """A registration packet from the worker, for its current connection `link`: the
        bytes that go there (a CAN_DO_TIMEOUT perhaps as a CAN_DO), or MOVE. Kept for the
        replay; the timeouts it sets or clears are told to `deadlines`; the jobs a CANT_DO
        or RESET_ABILITIES sent on releases are forgotten. Raises ProtocolError for a
        CAN_DO_TIMEOUT gearmand could not read."""
        ptype = packet.type
        if ptype is P.CAN_DO_TIMEOUT:
            args = packet.args()
            if not _TIMEOUT.fullmatch(args["timeout"]):
                # gearmand 1.1.20 dies of a timeout that does not fit 64 bits.
                raise ProtocolError("malformed CAN_DO_TIMEOUT: the timeout is not a number of milliseconds")
            if retrier is not None and retrier.policies.for_function(args["function"]).mode is Mode.ENFORCE:
                # gearmand would requeue a timed-out job at once, held or not: gproxy times
                # it out instead, as a retryable failure, and gearmand sees a plain CAN_DO.
                deadlines.registered(args["function"], int(args["timeout"] or b"0"))
                packet = Packet(P.CAN_DO, build_packet(REQ, P.CAN_DO, function=args["function"]))
                ptype = P.CAN_DO
            else:
                deadlines.unregistered(args["function"])
        elif ptype is P.CAN_DO or ptype is P.CANT_DO:
            if deadlines.any_registered:
                deadlines.unregistered(packet.args()["function"])
        elif ptype is P.RESET_ABILITIES:
            deadlines.unregistered(None)
        self.apply(packet)
        if ptype is not P.CANT_DO and ptype is not P.RESET_ABILITIES:
            return packet.raw
        function = packet.args()["function"] if ptype is P.CANT_DO else None
        if retrier is not None and retrier.holds(link, function):
            return MOVE  # sent there, it would make gearmand requeue the held jobs
        if function is None:
            link.jobs.take_all()
        else:
            link.jobs.take_function(function)
        return packet.raw

    def apply(self, packet: Packet) -> None:
        """Keep what `packet` (a registration packet, as it goes on) says, for the replay."""
        ptype = packet.type
        if ptype is P.RESET_ABILITIES:
            self._abilities.clear()
        elif ptype is P.SET_CLIENT_ID:
            self._client_id = packet.raw
        elif ptype is P.OPTION_REQ:
            self._options[packet.args()["option"]] = packet.raw
        elif ptype is P.CANT_DO:
            self._abilities.pop(packet.args()["function"], None)
        else:  # CAN_DO, CAN_DO_TIMEOUT
            self._abilities[packet.args()["function"]] = packet.raw

    @property
    def options(self) -> int:
        return len(self._options)

    def replay(self) -> bytes:
        return self._client_id + b"".join(self._options.values()) + b"".join(self._abilities.values())
