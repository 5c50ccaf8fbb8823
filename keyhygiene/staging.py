"""A second process that stages part of a sync's listing, so that a large listing uses two cores.

Turning a key's JSON into its staging row (typing its fields, fingerprinting it) and writing the
row is interpreter work: in one process it all runs under one interpreter lock, beside the threads
that fetch the pages, and the listing waits for it. A sync of a large organisation starts one
helper (``python -m keyhygiene.staging``) and hands it whole batches of keys while it has room
for them, staging the others itself: whichever is free takes the next batch. The helper writes its
staging rows for the same snapshot through its own connection, as a sharing writer
(``SnapshotWriter.sharing``); the sync still records the snapshot itself, in one transaction.

The protocol, over the helper's stdin and stdout: a header (the database's URL, with its password:
never on a command line; the snapshot and the writer's share), then one frame per batch (the keys
in ``marshal`` format), each answered by one line once its rows are committed (``ok`` and the ids
reserved for the keys new to the store, as JSON), then an empty frame that asks for the helper's
``WriterState``. The helper logs nothing; a failure ends it with one
line on stderr, which the sync reports as its own failure (and then discards every staging row of
the snapshot, the helper's included). The helper holds no credential for the API. It dies with the
sync: it stops at the end of its input, which closes when the sync's process ends however it ends.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from sqlalchemy.exc import SQLAlchemyError

from db import snapshots
from db.engine import describe_db_error, make_engine, make_session_factory

_FRAME = struct.Struct("<I")
_WAITING = 2
"""Batches that may wait for the helper beside the one it is staging: enough that it never waits
for the sync to hand it the next one, few enough that the sync stages the rest itself."""


class HelperFailed(RuntimeError):
    """The staging helper could not stage a batch; the sync fails with its message."""


def _without_credential(environment: Mapping[str, str]) -> dict[str, str]:
    """The sync's environment but the API's management key: the helper calls no API."""
    return {name: value for name, value in environment.items() if name != "OPENROUTER_MANAGEMENT_KEY"}


class StagingHelper:
    """The sync's side of one helper process (``start``, ``offer``, ``finish``, ``stop``)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        errors: IO[bytes],
        header: bytes,
        on_new_keys: Callable[[list[int]], None] | None = None,
    ) -> None:
        self._process = process
        self._errors = errors
        self._header = header
        self._on_new_keys = on_new_keys
        self._batches: queue.Queue[Sequence[Mapping[str, Any]] | None] = queue.Queue(maxsize=_WAITING)
        self._failure: str | None = None
        self._state: snapshots.WriterState | None = None
        self._feeder = threading.Thread(target=self._feed, name="keyhygiene-staging", daemon=True)
        self._feeder.start()

    @classmethod
    def start(
        cls,
        database_url: str,
        share: snapshots.WriterShare,
        lane: int,
        *,
        use_known: bool,
        on_new_keys: Callable[[list[int]], None] | None = None,
    ) -> StagingHelper | None:
        """Start a helper for lane ``lane`` of ``share``; None when no process can be started.
        ``on_new_keys`` is called (from another thread) with the ids reserved for the keys new to
        the store of each batch, once its rows are committed (``SnapshotWriter.write``)."""
        # A file, not a pipe: nothing the helper writes can block it. Closed with the helper.
        errors = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "keyhygiene.staging"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                close_fds=True,
                env=_without_credential(os.environ),
            )
        except OSError:
            errors.close()
            return None
        assert process.stdin is not None
        header = {
            "database": database_url,
            "snapshot_id": share.snapshot_id,
            "lanes": share.lanes,
            "floor": share.floor,
            "lane": lane,
            "known": use_known,
        }
        return cls(process, errors, json.dumps(header).encode(), on_new_keys)

    def offer(self, keys: Sequence[Mapping[str, Any]]) -> bool:
        """Hand ``keys`` to the helper if it has room for them now; False: stage them yourself."""
        self._raise_failure()
        try:
            self._batches.put_nowait(keys)
        except queue.Full:
            return False
        return True

    def finish(self) -> snapshots.WriterState:
        """Wait until every batch handed over is staged and committed; what the helper staged."""
        self._batches.put(None)
        self._feeder.join()
        self._raise_failure()
        assert self._state is not None
        self._process.wait()
        self._close()
        return self._state

    def stop(self) -> None:
        """End the helper now, whatever it is doing (its open transaction rolls back); wait for it."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        with contextlib.suppress(queue.Empty):  # only this thread puts: after this, None has room
            while True:
                self._batches.get_nowait()
        self._batches.put_nowait(None)
        self._feeder.join()
        self._close()

    def _close(self) -> None:
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._errors.close()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise HelperFailed(self._failure)

    def _feed(self) -> None:
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        ended = False  # the end of the batches (None) was taken
        try:
            self._send(process.stdin, self._header)
            while (keys := self._batches.get()) is not None:
                self._send(process.stdin, marshal.dumps(list(keys)))
                said = process.stdout.readline()
                if not said.startswith(b"ok ") or not said.endswith(b"\n"):
                    raise BrokenPipeError
                new_ids = json.loads(said[3:])
                if new_ids and self._on_new_keys is not None:
                    self._on_new_keys(new_ids)
            ended = True
            self._send(process.stdin, b"")
            state = json.loads(process.stdout.readline())
            self._state = snapshots.WriterState(**state)
        except (OSError, ValueError, TypeError):
            self._failure = self._why()
            while not ended:  # take what ``offer`` still hands over, up to the end ``finish`` or ``stop`` puts
                ended = self._batches.get() is None
        finally:
            with contextlib.suppress(OSError):  # the helper is gone (``stop``, or it failed) mid-frame
                process.stdin.close()

    @staticmethod
    def _send(stream: IO[bytes], data: bytes) -> None:
        stream.write(_FRAME.pack(len(data)))
        stream.write(data)
        stream.flush()

    def _why(self) -> str:
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it answered something else than it should, and goes on
            self._process.kill()
            self._process.wait()
        self._errors.seek(0)
        lines = self._errors.read().decode(errors="replace").strip().splitlines()
        said = lines[-1] if lines else f"it exited with status {self._process.returncode}"
        return f"the staging helper failed: {said}"


# -- the helper process ------------------------------------------------------------------------


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None  # the sync is gone
    (size,) = _FRAME.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def main() -> int:
    # Ctrl-C reaches the sync's whole process group: the sync decides, and stops the helper.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    header_data = _read_frame(stdin)
    if header_data is None:
        return 1
    header = json.loads(header_data)
    share = snapshots.WriterShare(header["snapshot_id"], header["lanes"], header["floor"])
    engine = make_engine(header["database"])
    writing = make_session_factory(engine, writer=True)
    try:
        known = None
        if header["known"]:
            with make_session_factory(engine)() as session:
                known = snapshots.known_fingerprints(session)
        writer = snapshots.SnapshotWriter.sharing(share, header["lane"], known=known)
        while (data := _read_frame(stdin)) is not None:
            if not data:
                with writing() as session, session.begin():
                    state = writer.state(session)  # writes the keys it carried and still held back
                stdout.write(json.dumps(_state_fields(state)).encode() + b"\n")
                stdout.flush()
                return 0
            with writing() as session, session.begin():
                new_ids = writer.add(session, marshal.loads(data))  # noqa: S302  # from the sync that started it
            stdout.write(b"ok " + json.dumps(new_ids).encode() + b"\n")
            stdout.flush()
        return 1  # the sync ended without asking for the result: it failed, and discards the rows
    except SQLAlchemyError as exc:
        print(f"database error: {describe_db_error(exc)}", file=sys.stderr)
    except Exception as exc:
        text = str(exc).strip()
        print(text.splitlines()[0] if text else type(exc).__name__, file=sys.stderr)
    finally:
        engine.dispose()
    return 1


def _state_fields(state: snapshots.WriterState) -> dict[str, Any]:
    return {"printed": state.printed, "reserved": state.reserved, "carried_on": state.carried_on}


if __name__ == "__main__":
    sys.exit(main())
