"""One guest's RFB connection, held on demand and shared by every consumer.

A `GuestLink` opens the connection when the first user holds it (`hold()`),
keeps it while anyone does, closes it `idle_timeout` seconds after the last
`release()`, and reconnects with backoff when it drops while held. Events from
the connection are pushed from the socket's read callback (`RfbClient.dispatch_to`)
and routed by type to the consumers that registered for them (`route`), so each
kind of traffic (consoles now, audio and display next) reaches only its own
consumer, and a consumer is a plain callback that must not block: none can
stall another.

It is not the console logic (`resourced.broker.guest`) and knows nothing of D-Bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from resourced.errors import (
    AuthenticationFailed,
    ConfigurationError,
    NotConnected,
    ResourcedError,
    SecurityError,
)
from resourced.rfb.aio import RfbClient
from resourced.rfb.extension import Extension

log = logging.getLogger(__name__)

#: Seconds between reconnection attempts, growing; the last one repeats.
RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 20.0

#: Opens a connection to the guest with these extensions attached (an address,
#: a libvirt `openGraphicsFD`, ...); raises a `ResourcedError` or `OSError`.
Connector = Callable[[Sequence[Extension]], Awaitable[RfbClient]]
#: Builds the extensions for one connection (each connection needs fresh ones).
ExtensionFactory = Callable[[], Sequence[Extension]]


class LinkState(enum.Enum):
    """The guest's connection, as the Guest's `State` property shows it."""

    IDLE = "idle"  # not connected, nobody needs it
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # it dropped (or failed) while needed; retrying
    STOPPED = "stopped"  # the guest is not running (libvirt said so)
    FAILED = "failed"  # gave up: authentication or configuration will not get better


class LinkObserver:
    """What a link tells its owner: override what you need. Called on the loop."""

    def link_up(self, client: RfbClient) -> None:
        """Connected; `client` is ready (events are routed from now on)."""

    def link_down(self, reason: str) -> None:
        """The connection is gone (closed on purpose, dropped or failed)."""

    def link_state_changed(self, state: LinkState, error: str) -> None:
        """`state` or `error` changed."""


class GuestLink:
    """The one RFB connection of one guest (see the module docstring)."""

    def __init__(
        self,
        name: str,
        connector: Connector,
        extensions: ExtensionFactory,
        observer: LinkObserver,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.name = name
        self.connector = connector
        self._extensions = extensions
        self._observer = observer
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.state = LinkState.IDLE
        self.last_error = ""
        #: What put the link in FAILED (its kind is what callers are told).
        self.failure: ResourcedError | None = None
        self.client: RfbClient | None = None
        self._routes: dict[type, list[Callable[[Any], None]]] = {}
        self._holds = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stopped = False  # the guest is not running: do not connect

    # --- routing --------------------------------------------------------------

    def route(self, event_type: type, consumer: Callable[[Any], None]) -> None:
        """Hand every event of `event_type` (exactly) to `consumer` from now on."""
        self._routes.setdefault(event_type, []).append(consumer)

    def _dispatch(self, event: Any) -> None:
        for consumer in self._routes.get(type(event), ()):
            try:
                consumer(event)
            except ResourcedError:
                raise  # a broken peer: ends the connection
            except Exception:  # one consumer's bug must not take the others down
                log.exception("guest %s: consumer of %s failed", self.name, type(event).__name__)

    # --- holding --------------------------------------------------------------

    @property
    def holds(self) -> int:
        return self._holds

    def hold(self) -> None:
        """Someone needs the connection: open it if it is not."""
        self._holds += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._ensure_running()

    def release(self) -> None:
        """One user less; the last one starts the idle timer."""
        if self._holds <= 0:
            raise RuntimeError("release() without hold()")
        self._holds -= 1
        if self._holds == 0 and self._task is not None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._holds == 0:
            log.info("guest %s: idle for %g s; disconnecting", self.name, self.idle_timeout)
            self._stop_task()

    async def wait_connected(self, timeout: float | None = None) -> RfbClient:
        """The connected client, connecting if needed.

        Raises `NotConnected` with the reason when the attempt under way fails
        (retries go on in the background while the link is held), when the guest
        is stopped or failed, or after `timeout` seconds (default `connect_timeout`).
        """
        self._ensure_running()
        limit = self.connect_timeout if timeout is None else timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self.client is None and self._task is not None:
                    await asyncio.shield(self._outcome)
                    break
        if self.client is not None:
            return self.client
        reason = self.last_error or "not connected"
        if self.state is LinkState.FAILED and self.failure is not None:
            # The kind of failure is the caller's answer (AuthenticationFailed...).
            raise type(self.failure)(f"guest {self.name}: {reason}")
        raise NotConnected(f"guest {self.name}: {reason}")

    def _signal_outcome(self) -> None:
        """An attempt connected or failed: wake `wait_connected`."""
        outcome, self._outcome = self._outcome, asyncio.get_running_loop().create_future()
        if not outcome.done():
            outcome.set_result(None)

    # --- the guest's life (libvirt) ------------------------------------------------

    def set_stopped(self, stopped: bool) -> None:
        """The guest stopped (close and stay closed) or runs again (reconnect if held)."""
        self._stopped = stopped
        if stopped:
            self._stop_task()
            self._set_state(LinkState.STOPPED, "the guest is not running")
        else:
            self._set_state(LinkState.IDLE, "")
            if self._holds:
                self._ensure_running()

    def reset_failure(self) -> None:
        """Try again after a failure (new credentials, an explicit Connect)."""
        if self.state is LinkState.FAILED:
            self.failure = None
            self._set_state(LinkState.IDLE, self.last_error)

    # --- the connection task ---------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._stopped or self.state is LinkState.FAILED:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"link-{self.name}"
            )

    def _stop_task(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    async def close(self) -> None:
        """Close for good (the guest is removed or the service stops)."""
        self._stopped = True
        task = self._task
        self._stop_task()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set_state(self, state: LinkState, error: str | None = None) -> None:
        changed = state is not self.state or (error is not None and error != self.last_error)
        self.state = state
        if error is not None:
            self.last_error = error
        if changed:
            self._observer.link_state_changed(state, self.last_error)

    async def _run(self) -> None:
        attempt = 0
        client: RfbClient | None = None
        try:
            while True:
                self._set_state(LinkState.CONNECTING if attempt == 0 else LinkState.RECONNECTING)
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        client = await self.connector(self._extensions())
                except (AuthenticationFailed, ConfigurationError, SecurityError) as err:
                    # Trying again would fail the same way (and could lock an account).
                    log.warning("guest %s: %s", self.name, err)
                    self.failure = err
                    self._set_state(LinkState.FAILED, str(err))
                    self._signal_outcome()
                    return
                except (ResourcedError, OSError, TimeoutError) as err:
                    reason = str(err) or "timed out connecting"
                    if attempt == 0 or attempt == len(RECONNECT_DELAYS):
                        log.warning("guest %s: %s; retrying", self.name, reason)
                    self._set_state(LinkState.RECONNECTING, reason)
                    self._signal_outcome()
                    await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
                    attempt += 1
                    continue
                attempt = 0
                reason = await self._serve(client)
                client = None
                log.info("guest %s: connection lost (%s); reconnecting", self.name, reason)
                self._set_state(LinkState.RECONNECTING, reason)
                self._signal_outcome()
                await asyncio.sleep(RECONNECT_DELAYS[0])
        finally:
            if self.client is not None or client is not None:
                closing = self.client or client
                self.client = None
                assert closing is not None
                # Shielded: a cancelled task still closes its socket.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(closing.close())
                self._observer.link_down("disconnected")
            if self.state not in (LinkState.FAILED, LinkState.STOPPED):
                self._set_state(LinkState.IDLE, None)
            self._signal_outcome()

    async def _serve(self, client: RfbClient) -> str:
        """Route the connection's events until it ends; the reason it ended."""
        self.client = client
        self._set_state(LinkState.CONNECTED, "")
        self._signal_outcome()
        finished = client.dispatch_to(self._dispatch)
        self._observer.link_up(client)
        try:
            await finished
            reason = "the server closed the connection"
        except ResourcedError as err:
            reason = str(err)
            log.warning("guest %s: %s", self.name, reason)
        finally:
            self.client = None
            await client.close()
        self._observer.link_down(reason)
        return reason
