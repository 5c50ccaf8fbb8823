"""The ``keyhygiene`` console script: loads the command line lean, then runs it.

Two things make every command start faster (together about a third of a second on a 2-core
machine, where a sync of 20,000 keys takes under four):

- **No optional extras nobody uses.** httpx imports its own command line (click, rich and
  pygments) whenever they are installed, and structlog imports rich to pretty-print tracebacks
  and locals, which keyhygiene renders plainly. A ``None`` in ``sys.modules`` makes an import
  raise ``ImportError``, which both catch: httpx's command line stays out for the whole process;
  rich only while structlog loads, so the commands that draw tables still import it as usual.
- **No garbage collection while loading.** The command line's modules make hundreds of thousands
  of objects that live as long as the process, and each automatic collection during the imports
  walks all of them again, for nothing. They load with collection paused, are then frozen
  (``gc.freeze``: the collector never walks them again), and collection resumes before the
  command runs, for the modules it loads itself and for its own work.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        _leave_out_unused_extras()
        from keyhygiene.cli import main as run_command
    finally:
        gc.freeze()
        gc.enable()
    run_command()


def _leave_out_unused_extras() -> None:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    if "rich" in sys.modules or "structlog" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog.dev  # the two modules that try to import rich
        import structlog.tracebacks  # noqa: F401
    finally:
        del sys.modules["rich"]
