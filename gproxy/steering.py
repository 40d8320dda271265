"""The operator's view of the held retries and hand on them (`/held`, `gproxy held`, the
admin POSTs; http_endpoint.Operator).

What is shown is read from the Retrier, which owns the held jobs; what an operator sets in
motion (a retry now, a give-up, a resume) is the Retrier's decision, carried out by the
control plane and supervised like its timers: a failure costs the connections it concerns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio

from .config import Route
from .core.held import held_view
from .core.retry import Action, Retrier
from .core.session import UpstreamLink
from .supervision import Supervisor

Actions = list[Action[UpstreamLink, Route]]


class Steering:
    """`perform`: the control plane's interpreter of the Retrier's actions."""

    def __init__(
        self, admin: bool, retrier: Retrier[UpstreamLink, Route],
        perform: Callable[[Sequence[Action[UpstreamLink, Route]]], None], supervisor: Supervisor,
        reload: Callable[[], tuple[bool, str]],
    ) -> None:
        self.admin = admin
        """The POSTs are allowed (the listener is unauthenticated: off by default)."""
        self._retrier, self._perform, self._supervisor = retrier, perform, supervisor
        self.reload = reload
        """Re-read the config file (reload.Reloader): (done, what happened)."""

    def held(self, function: bytes | None) -> dict[str, Any]:
        return held_view(self._retrier, trio.current_time(), function)

    def retry_now(self, key: int) -> bool:
        return self._steer(key, self._retrier.retry_now)

    def give_up_now(self, key: int) -> bool:
        return self._steer(key, self._retrier.give_up_now)

    def _steer(self, key: int, action: Callable[[int, float], Actions | None]) -> bool:
        done = False
        retrier = self._retrier
        with self._supervisor.supervised(f"operator's action on {retrier.describe(key)}", retrier.owners(key=key)):
            actions = action(key, trio.current_time())
            if actions is not None:
                self._perform(actions)
                done = True
        return done

    def pause(self, function: bytes) -> None:
        self._retrier.pause(function)

    def resume(self, function: bytes) -> None:
        name = function.decode("utf-8", "replace")
        with self._supervisor.supervised(f"operator's resume of {name}", self._retrier.owners(function=function)):
            self._perform(self._retrier.resume(function, trio.current_time()))
