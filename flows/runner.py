"""How a flow body calls its tasks: as Prefect task runs, or as plain functions.

The bodies in flows/train.py and flows/compare.py are the only places where the order of the
stages, the evaluation cadence and the resume rules are written. They call every task through a
`Stages` object, so `kdrl train --no-prefect` runs the very same body without the engine:

    PrefectStages  task runs: cached, in the flow-run graph, artifacts published in the background
    PlainStages    `task.fn(...)`: no server, no cache (a resumed run recomputes what follows its
                   checkpoint: the same bytes), no artifacts; log lines on stdout

A body may pass `wait_for=[result]` (Prefect's own keyword) to order a task after one whose
result it does not read, e.g. generate after the update that moved the weights it samples with:
an edge in the flow-run graph; PlainStages drops it (its calls already run in order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdrl.handoff import Artifact
from kdrl.storage import is_readable


class PrefectStages:
    """Tasks as Prefect task runs."""

    prefect = True

    def __init__(self) -> None:
        self._background: list = []

    def __call__(self, task, *args: Any, **kwargs: Any) -> Any:
        return task(*args, **kwargs)

    def cached(self, task, *args: Any, **kwargs: Any) -> Any:
        """Run a cached task; if the file it returned has since been deleted or damaged (a
        truncated copy, a full disk), recompute it: every stage is a pure function of its inputs."""
        out = task(*args, **kwargs)
        if isinstance(out, Artifact) and not is_readable(out.path):
            out = task.with_options(refresh_cache=True)(*args, **kwargs)
        return out

    def report(self, task, *args: Any, **kwargs: Any) -> Any:
        """A task that only publishes (artifacts in the UI)."""
        return task(*args, **kwargs)

    def background(self, task, *args: Any, **kwargs: Any) -> None:
        """A publishing task that may overlap the next iteration."""
        self._background.append(task.submit(*args, **kwargs))

    def wait(self) -> None:
        from prefect.futures import wait

        wait(self._background)
        self._background.clear()

    def subflow(self, flow, name: str, plain: Callable[[], Any], **parameters: Any) -> Any:
        """A flow run inside this one (`plain` is what PlainStages calls instead)."""
        return flow.with_options(flow_run_name=name)(**parameters)


class PlainStages:
    """Tasks as plain function calls: no Prefect server, cache or artifacts."""

    prefect = False

    def __call__(self, task, *args: Any, wait_for: Any = None, **kwargs: Any) -> Any:
        return task.fn(*args, **kwargs)  # called in order: nothing to wait for

    cached = __call__

    def report(self, task, *args: Any, **kwargs: Any) -> None:
        """Artifacts are Prefect's: nothing to publish."""

    background = report

    def wait(self) -> None:
        pass

    def subflow(self, flow, name: str, plain: Callable[[], Any], **parameters: Any) -> Any:
        return plain()
