"""Models stay resident in the flow process: one open `kdrl.loop.Session` per run directory.

Tasks look their session up by run directory instead of taking models as inputs (models are
not hashable cache inputs, and reloading them per task would dominate a CPU-scale iteration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdrl.config import RunConfig
from kdrl.loop import Session, open_session

_SESSIONS: dict[str, Session] = {}


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve())


def open_run(run_dir: str | Path, config: dict[str, Any], *, log=print) -> Session:
    """Open (or reuse) the session of `run_dir`; resumes after its latest checkpoint."""
    key = _key(run_dir)
    cfg = RunConfig.model_validate(config)
    if key not in _SESSIONS or _SESSIONS[key].cfg != cfg:
        close_run(run_dir)
        _SESSIONS[key] = open_session(cfg, Path(run_dir), log=log)
    return _SESSIONS[key]


def session(run_dir: str | Path) -> Session:
    """The open session of `run_dir` (the flow opens it first with `open_run`)."""
    try:
        return _SESSIONS[_key(run_dir)]
    except KeyError:
        raise RuntimeError(f"no open session for {run_dir}: call the open_run task first") from None


def close_run(run_dir: str | Path) -> None:
    """Free the models and engines of `run_dir` now (`Session.close`)."""
    session = _SESSIONS.pop(_key(run_dir), None)
    if session is not None:
        session.close()
