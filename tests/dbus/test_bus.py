"""The service's bus connection against a real dbus-daemon: the writer survives a
flood (dbus-fast's own drops the connection when the socket buffer fills), and
fds sent in replies are closed once the reply is written."""

from __future__ import annotations

import asyncio
import socket

from dbus_fast import Message, MessageType

from resourced.dbus.bus import ServiceBus
from tests.dbus.conftest import TIMEOUT, Session

SIGNALS = 400
PAYLOAD = b"x" * 65536


async def test_writer_waits_instead_of_dropping_the_bus(session: Session) -> None:
    sender = await ServiceBus(bus_address=session.address).connect()
    receiver = await session.client()
    got = 0
    done = asyncio.Event()

    def count(msg: Message) -> bool:
        nonlocal got
        if msg.message_type is MessageType.SIGNAL and msg.member == "Flood":
            got += 1
            if got == SIGNALS:
                done.set()
        return False

    receiver.add_message_handler(count)
    try:
        # All queued in one go, faster than the daemon reads: the socket fills.
        for _ in range(SIGNALS):
            sender.send(
                Message(
                    message_type=MessageType.SIGNAL,
                    path="/flood",
                    interface="org.example.Flood",
                    member="Flood",
                    destination=receiver.unique_name,
                    signature="ay",
                    body=[PAYLOAD],
                )
            )
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert got == SIGNALS
        assert sender.connected
        # And it still answers.
        reply = await sender.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetId",
            )
        )
        assert reply is not None
        assert reply.message_type is MessageType.METHOD_RETURN
    finally:
        sender.disconnect()
        receiver.disconnect()


async def test_fd_in_a_reply_is_closed_once_written(session: Session) -> None:
    service = await ServiceBus(bus_address=session.address, negotiate_unix_fd=True).connect()
    client = await session.client()
    ours, theirs = socket.socketpair()
    fd = theirs.detach()

    def answer(msg: Message) -> bool:
        if msg.message_type is MessageType.METHOD_CALL and msg.member == "GiveFd":
            service.close_after_sending(fd)
            service.send(Message.new_method_return(msg, "h", [0], unix_fds=[fd]))
            return True
        return False

    service.add_message_handler(answer)
    try:
        reply = await client.call(
            Message(
                destination=service.unique_name, path="/x", interface="org.example", member="GiveFd"
            )
        )
        assert reply is not None
        assert reply.message_type is MessageType.METHOD_RETURN
        received = socket.socket(fileno=reply.unix_fds[reply.body[0]])

        # EOF comes only once the service's copy is closed too.
        received.close()
        ours.settimeout(TIMEOUT)
        assert ours.recv(10) == b""
    finally:
        ours.close()
        service.disconnect()
        client.disconnect()
