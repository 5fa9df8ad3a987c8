"""App calls as the server drives them: most finish at once, some wait; both must behave the same.

On asyncio and uvloop the server runs a command, its App call and the reply straight from the
socket's callback when the call awaits nothing, and hands a call that does wait to the
connection's task. These tests make hooks wait in every way an App does (a checkpoint, an
event set elsewhere, a thread, a cancel scope, a timeout inside the hook) and check the
replies, their order, and that a hook always runs as the connection's own task.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from minismtp.app import App
from minismtp.message import Message
from minismtp.server import serve
from minismtp.types import Address, Reply, Session, Transaction
from tests.helpers.clients import Connect, WireClient, drain

pytestmark = pytest.mark.anyio


async def send_message(client: WireClient, recipient: str = "b@example.com") -> list[str]:
    replies = [await client.command("MAIL FROM:<a@example.com>")]
    replies.append(await client.command(f"RCPT TO:<{recipient}>"))
    replies.append(await client.command("DATA"))
    replies.append(await client.command("Subject: t\r\n\r\nhello\r\n."))
    return replies


async def greeted(client: WireClient) -> None:
    assert (await client.reply()).startswith("220 ")
    assert (await client.command("EHLO client.example")).startswith("250-")


async def test_hooks_that_wait_in_every_way_give_the_same_replies(
    app: App, connect: Connect
) -> None:
    released = anyio.Event()

    @app.on_mail
    async def checkpoint(tx: Transaction, sender: Address) -> None:
        await anyio.lowlevel.checkpoint()

    @app.on_rcpt
    async def in_a_thread(tx: Transaction, rcpt: Address) -> Reply | None:
        local = await anyio.to_thread.run_sync(lambda: rcpt.local_part)
        return Reply(550, "5.1.1", "No such user") if local == "nobody" else None

    @app.on_data
    async def wait_for_release(tx: Transaction, message: Message) -> None:
        with anyio.fail_after(5):
            await released.wait()

    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
        assert (await client.command("RCPT TO:<nobody@example.com>")).startswith("550 5.1.1")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 2.1.5")
        assert (await client.command("DATA")).startswith("354")
        await client.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
        await anyio.wait_all_tasks_blocked()
        released.set()
        assert (await client.reply()).startswith("250 2.0.0 OK queued as ")
        assert (await client.command("QUIT")).startswith("221")
    [message] = drain(server)
    assert [str(rcpt) for rcpt in message.rcpt_to] == ["b@example.com"]


async def test_cancel_scopes_and_timeouts_inside_hooks(app: App, connect: Connect) -> None:
    timeouts: list[bool] = []

    @app.on_mail
    def scope_without_awaiting(tx: Transaction, sender: Address) -> None:
        with anyio.CancelScope():  # noqa: ASYNC100  # entered and left without a checkpoint, on purpose
            pass

    @app.on_rcpt
    async def timeout_that_fires(tx: Transaction, rcpt: Address) -> None:
        with anyio.move_on_after(0.01) as scope:
            await anyio.sleep(10)
        timeouts.append(scope.cancelled_caught)

    @app.on_data
    async def timeout_that_does_not(tx: Transaction, message: Message) -> None:
        with anyio.fail_after(10):
            await anyio.lowlevel.checkpoint()

    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        for _ in range(2):
            replies = await send_message(client)
            assert [reply[:3] for reply in replies] == ["250", "250", "354", "250"]
    assert timeouts == [True, True]
    assert len(drain(server)) == 2


async def test_every_hook_of_a_session_runs_as_the_connections_task(
    app: App, connect: Connect
) -> None:
    tasks: dict[str, set[int]] = {}

    def note(session: Session) -> None:
        tasks.setdefault(session.id, set()).add(anyio.get_current_task().id)

    app.on_connect(note)
    app.on_helo(lambda session, name: note(session))
    app.on_mail(lambda tx, sender: note(tx.session))

    @app.on_rcpt
    async def waits_then_notes(tx: Transaction, rcpt: Address) -> None:
        await anyio.lowlevel.checkpoint()
        note(tx.session)

    app.on_data(lambda tx, message: note(tx.session))

    async with serve(app, "127.0.0.1", 0) as server:
        async with connect(server.port) as first, connect(server.port) as second:
            for client in (first, second):
                await greeted(client)
            for client in (first, second, first):
                await send_message(client)
    assert len(tasks) == 2
    first_task, second_task = tasks.values()
    assert len(first_task) == 1 and len(second_task) == 1
    assert first_task != second_task


async def test_pipelined_commands_around_a_waiting_hook_are_answered_in_order(
    app: App, connect: Connect
) -> None:
    @app.on_rcpt
    async def slow_for_some(tx: Transaction, rcpt: Address) -> Reply | None:
        if rcpt.local_part.startswith("slow"):
            await anyio.sleep(0.01)
            return Reply(450, "4.2.0", "Try later")
        return None

    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        await client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<fast1@example.com>\r\n"
            b"RCPT TO:<slow@example.com>\r\nRCPT TO:<fast2@example.com>\r\nDATA\r\n"
        )
        replies = [await client.reply() for _ in range(5)]
        assert [reply[:3] for reply in replies] == ["250", "250", "450", "250", "354"]
        assert (await client.command("x\r\n.")).startswith("250 2.0.0")
    [message] = drain(server)
    assert [str(rcpt) for rcpt in message.rcpt_to] == ["fast1@example.com", "fast2@example.com"]


async def test_a_hook_that_raises_after_waiting_gives_451_and_the_session_goes_on(
    app: App, connect: Connect
) -> None:
    failures = iter([True, False])

    @app.on_rcpt
    async def fails_once(tx: Transaction, rcpt: Address) -> None:
        await anyio.lowlevel.checkpoint()
        if next(failures):
            raise RuntimeError("database down")

    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("451 4.3.0")
        assert (await client.command("RCPT TO:<b@example.com>")).startswith("250 2.1.5")
    assert server.metrics.hook_errors == 1


# -- answers given at once (App.answer_now) ---------------------------------------------------


async def test_a_hook_registered_after_the_first_message_is_called(
    app: App, connect: Connect
) -> None:
    """Stages without hooks are answered without an App call; a hook added while serving
    must still be reached."""
    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        assert (await send_message(client))[-1].startswith("250 ")
        seen: list[str] = []

        @app.on_rcpt
        def refuse(tx: Transaction, rcpt: Address) -> Reply:
            seen.append(str(rcpt))
            return Reply(550, "5.1.1", "No such user")

        @app.on_data_chunk
        def count(tx: Transaction, chunk: bytes | memoryview) -> None:
            seen.append(f"chunk {len(chunk)}")

        assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250 ")
        assert (await client.command("RCPT TO:<late@example.com>")).startswith("550 5.1.1")
        assert (await client.command("RCPT TO:<x@example.com>")).startswith("550 5.1.1")
        app._rcpt_hooks.clear()
        assert (await client.command("RCPT TO:<y@example.com>")).startswith("250 ")
        assert (await client.command("DATA")).startswith("354 ")
        assert (await client.command("Subject: t\r\n\r\nhello\r\n.")).startswith("250 ")
    assert seen == ["late@example.com", "x@example.com", "chunk 21"]
    assert [m.rcpt_to for m in drain(server)] == [
        (Address("b", "example.com"),),
        (Address("y", "example.com"),),
    ]


async def test_an_error_while_spooling_at_once_gives_451_and_the_session_goes_on(
    app: App, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hook at the chunk stage: the chunk is written without an App call, and a bug
    there is answered as one in a hook is (logged, counted, 451), at the end of the data."""
    build = app.build_message
    failures = [RuntimeError("a bug")]

    def build_message(session: Session, tx: Transaction) -> Message:
        if failures:
            raise failures.pop()
        return build(session, tx)

    monkeypatch.setattr(app, "build_message", build_message)
    async with serve(app, "127.0.0.1", 0) as server, connect(server.port) as client:
        await greeted(client)
        assert (await send_message(client))[-1].startswith("451 4.3.0")
        assert (await send_message(client))[-1].startswith("250 ")
    assert app.metrics.hook_errors == 1
    assert len(drain(server)) == 1
