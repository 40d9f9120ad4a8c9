"""What one stage hands the next: the file it wrote (`Artifact`) and the run it belongs to
(`RunInfo`). Both are small frozen values, so Prefect records them as task inputs (the edges of
the flow-run graph) and a cache key can be computed from them without touching a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdrl.config import RunConfig
from kdrl.storage import RunPaths, content_hash


@dataclass(frozen=True)
class Artifact:
    """A file a stage wrote, as the next stage receives it: its path and the digest of its bytes
    (taken once, by the writer: a consumer's cache key never reads the file again), and the
    seconds the stage took."""

    path: str
    digest: str
    seconds: float = 0.0

    @classmethod
    def of(cls, path: str | Path, seconds: float = 0.0) -> Artifact:
        return cls(str(path), content_hash(path), seconds)


@dataclass(frozen=True)
class RunInfo:
    """Where a run writes and what every file it writes records: its folder, its config and the
    provenance metadata (config hash, run id, engines)."""

    root: str
    cfg: RunConfig
    metadata: dict[str, str]

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.root))
