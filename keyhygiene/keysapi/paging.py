"""Listing every key of several workspaces with ``concurrency`` requests in flight, page by page.

``GET /keys`` pages by offset, 100 keys at a time, with no total: a list ends at its first page
shorter than 100. :class:`KeyStream` keeps ``concurrency`` worker threads busy, each taking the
next offset of the least advanced open workspace as soon as its previous request is answered, so
no request waits for another thread to schedule it. Offsets are asked for ahead of knowing where a
list ends (at most a few past it per workspace); once a short page is seen, no later offset of
that workspace is asked for, and pages past it are dropped.

Pages are handed over in offset order per workspace as soon as every earlier page of that
workspace has been, while later ones are still in flight. A bounded number of pages may wait to be
taken, so a slow consumer slows the listing instead of growing memory.

No document says what the API answers for an offset past the end of a list (the facts infer an
empty page). Should it refuse one (400 or 404), the offsets asked for ahead would fail every
listing: a refusal of an offset past every full page seen is held instead, and becomes the list's
end once every page before it has come back full and the next offset is refused too (asked for if
it was not: one request more); ``ends_by_refusal`` names those workspaces. A page with keys after
a refused offset, a short page (even an empty one) after it that is not refused, a refusal before a
short page, or a refusal of offset 0, fails the listing as any error does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, NotFound

PAGE_SIZE = 100
"""``GET /keys`` always answers at most 100 keys; a shorter page is the last one."""

DEFAULT_WORKSPACE = "default"
"""How counts name the default workspace when the account lists no workspaces."""

RawKey = dict[str, Any]
FetchPage = Callable[[str | None, int], list[RawKey]]
"""Fetch the page of ``GET /keys`` at (workspace id or None, offset): the API's raw key objects."""
ProgressCallback = Callable[[str, int], None]
"""Called with (workspace id, keys on the page) after every page."""

_END = object()


@dataclass(slots=True)
class _Workspace:
    """Paging state of one workspace."""

    workspace_id: str | None
    next_offset: int = 0  # the next offset to ask for
    end: int | None = None  # offset of the first short page, once seen
    next_due: int = 0  # the next offset to hand over
    early: dict[int, list[RawKey]] = field(default_factory=dict)  # arrived before an earlier page
    refused: dict[int, BaseException] = field(default_factory=dict)  # offsets the API refused (400, 404)

    @property
    def refused_at(self) -> int | None:
        """The lowest offset the API refused, if any."""
        return min(self.refused) if self.refused else None

    @property
    def name(self) -> str:
        return self.workspace_id or DEFAULT_WORKSPACE


class KeyStream:
    """Every key of the given workspaces (None: the default one), as the API's raw key objects.

    Iterating yields one list per page, in offset order within each workspace: the keys of that
    page not handed over before (offset paging over a list that changes can show a key twice; its
    first sighting wins). Iterate once. The first failure of any request is raised from the
    iteration, and stops the other workers. After the iteration, ``per_workspace`` (keys first seen
    in each workspace), ``pages`` (pages fetched, dropped ones included) and ``duplicates`` are final.

    ``room``: most requests in flight and pages waiting to be taken, together; at least four per
    worker, the default.
    """

    def __init__(
        self,
        fetch: FetchPage,
        workspace_ids: Iterable[str | None],
        *,
        concurrency: int,
        on_page: ProgressCallback | None = None,
        room: int | None = None,
    ) -> None:
        self._fetch = fetch
        self._workspaces = [_Workspace(workspace_id) for workspace_id in dict.fromkeys(workspace_ids)]
        self.concurrency = max(1, concurrency)
        self._on_page = on_page
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Requests in flight plus pages fetched and not yet taken: bounds the memory a slow consumer
        # can make the listing hold.
        self._room = threading.Semaphore(max(room or 0, 4 * self.concurrency))
        self._stopping = False
        self._workers_left = 0
        self._workers: list[threading.Thread] | None = None
        self._seen: set[str] = set()
        self.per_workspace: dict[str, int] = {workspace.name: 0 for workspace in self._workspaces}
        self.pages = 0
        self.duplicates = 0
        self.ends_by_refusal: list[str] = []
        """Workspaces whose list ended at an offset the API refused rather than at a short page."""

    def start(self) -> None:
        """Start asking for pages now, before anything iterates (iterating starts it otherwise):
        they wait, as many as there is room for, until they are taken. Call ``close`` unless the
        stream is then iterated."""
        if self._workers is not None:
            return
        self._workers = []
        self._workers_left = self.concurrency
        try:
            for index in range(self.concurrency):
                worker = threading.Thread(target=self._work, name=f"keysapi-{index}", daemon=True)
                worker.start()  # may fail (no thread left to the process): the listing fails
                self._workers.append(worker)
        except BaseException:
            self.close()
            raise

    def close(self, *, wait: bool = True) -> None:
        """Stop asking for pages; what was fetched is dropped. With ``wait``, wait for the requests in
        flight (each ends after its own retries); without, the workers end by themselves after them."""
        with self._lock:
            self._stopping = True
        workers = self._workers or []
        for _ in workers:  # wake any worker waiting for room
            self._room.release()
        if wait:
            for worker in workers:
                worker.join()

    def __iter__(self) -> Iterator[list[RawKey]]:
        self.start()
        try:
            while (item := self._ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                workspace, page = item
                self._room.release()
                yield self._first_seen(workspace, page)
        finally:
            self.close()

    @property
    def listed(self) -> set[str]:
        """The hashes of every key handed over so far."""
        return self._seen

    @property
    def waiting(self) -> int:
        """Pages fetched and waiting to be taken."""
        return self._ready.qsize()

    def batched(self, most_pages: int) -> Iterator[list[RawKey]]:
        """Like iterating, but the pages that are already waiting when one is taken come with it, as
        one list (at most ``most_pages`` pages): a consumer that falls behind catches up in fewer,
        larger steps, and one that keeps up still gets each page as it arrives."""
        batch: list[RawKey] = []
        pages = 0
        for page in self:
            batch.extend(page)
            pages += 1
            if pages >= most_pages or not self.waiting:
                if batch:
                    yield batch
                batch, pages = [], 0
        if batch:
            yield batch

    def _first_seen(self, workspace: _Workspace, page: list[RawKey]) -> list[RawKey]:
        fresh: list[RawKey] = []
        seen = self._seen
        for raw in page:
            key_hash = raw["hash"]
            if key_hash in seen:
                self.duplicates += 1
                continue
            seen.add(key_hash)
            fresh.append(raw)
        self.per_workspace[workspace.name] += len(fresh)
        if self._on_page is not None:
            self._on_page(workspace.name, len(page))
        return fresh

    # -- the workers -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._room.acquire()
            with self._lock:
                request = None if self._stopping else self._next_request()
                if request is None:
                    self._room.release()
                    self._workers_left -= 1
                    if self._workers_left == 0 and not self._stopping:
                        self._ready.put(_END)
                    return
            workspace, offset = request
            try:
                page = self._fetch(workspace.workspace_id, offset)
            except BaseException as exc:
                with self._lock:
                    if not self._held(workspace, offset, exc):
                        self._fail(exc)
                self._room.release()
                continue
            with self._lock:
                self._arrived(workspace, offset, page)

    def _fail(self, exc: BaseException) -> None:
        if not self._stopping:
            self._stopping = True
            self._ready.put(exc)

    def _held(self, workspace: _Workspace, offset: int, exc: BaseException) -> bool:
        """Whether the failure of the request at ``offset`` is no failure of the listing (yet): past
        the known end, or a refusal past every full page seen (see the module's docstring)."""
        if workspace.end is not None and offset > workspace.end:
            return True
        if workspace.end is not None or offset == 0 or not isinstance(exc, BadRequest | NotFound):
            return False  # before the list's end (its short page came back first), or no refusal
        if any(later > offset and page for later, page in workspace.early.items()):
            return False  # keys came back from further on: the list goes on past this offset
        workspace.refused[offset] = exc
        self._end_at_refusal(workspace)
        return True

    def _end_at_refusal(self, workspace: _Workspace) -> None:
        """Every page before the lowest refused offset came back full, and the next offset was
        refused as well: the list ends there."""
        refused_at = workspace.refused_at
        if refused_at is None or workspace.end is not None or workspace.next_due < refused_at:
            return
        if refused_at + PAGE_SIZE not in workspace.refused:
            return
        workspace.end = refused_at
        self.ends_by_refusal.append(workspace.name)
        for later in [later for later in workspace.early if later > refused_at]:
            del workspace.early[later]  # empty pages from past the end
            self._room.release()

    def _next_request(self) -> tuple[_Workspace, int] | None:
        """The next offset of the least advanced workspace whose end is not known yet, short of an
        offset the API refused."""
        open_workspaces = [
            workspace
            for workspace in self._workspaces
            # Up to the offset after the lowest refused one: its answer tells an end from an error.
            if workspace.end is None
            and (not workspace.refused or workspace.next_offset <= min(workspace.refused) + PAGE_SIZE)
        ]
        if not open_workspaces:
            return None
        workspace = min(open_workspaces, key=lambda candidate: candidate.next_offset)
        offset = workspace.next_offset
        workspace.next_offset += PAGE_SIZE
        return workspace, offset

    def _arrived(self, workspace: _Workspace, offset: int, page: list[RawKey]) -> None:
        """Keep a fetched page and hand over every page of its workspace that is now due, in order."""
        self.pages += 1
        refused_at = workspace.refused_at
        no_short_page_before = refused_at is not None and (workspace.end is None or workspace.end >= refused_at)
        if (page or workspace.end is None) and refused_at is not None and offset > refused_at and no_short_page_before:
            # Keys past the offset the API refused, or the first short page, and no short page
            # before it: that refusal was no end of the list (an end is refused twice in a row).
            self._fail(workspace.refused[refused_at])
            self._room.release()
            return
        if workspace.end is not None and offset > workspace.end:
            self._room.release()  # past the end: dropped
            return
        workspace.early[offset] = page
        if len(page) < PAGE_SIZE:
            workspace.end = offset if workspace.end is None else min(workspace.end, offset)
            for later in [later for later in workspace.early if later > offset]:
                del workspace.early[later]
                self._room.release()
        while workspace.next_due in workspace.early:
            self._ready.put((workspace, workspace.early.pop(workspace.next_due)))
            workspace.next_due += PAGE_SIZE
        self._end_at_refusal(workspace)
