"""Progress of the long stages (generation, teacher scoring, evaluation): a tqdm bar on a
terminal, a log line at a fixed interval otherwise (a Prefect worker has no terminal), with
tokens/s.

The engines report through `Progress`; where the lines go and what the stage is called comes from
the caller, which wraps the stage in `reporting(log, "generate step 3")` (the task layer passes
Prefect's run logger). Without it, lines go to stdout labelled with the engine's own name.

    with reporting(print, "evaluate step 20 (student)", every_s=30):
        engine.generate(...)      # "[kdrl] evaluate step 20 (student): 512/1,024 decode steps, ..."

A stage shorter than `every_s` logs nothing; on a terminal the bar appears after 2 s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

Log = Callable[[str], None]

DEFAULT_EVERY_S = 30.0
"""Seconds between progress lines when stderr is not a terminal; $KDRL_PROGRESS_EVERY_S overrides."""


def default_every_s() -> float:
    return float(os.environ.get("KDRL_PROGRESS_EVERY_S", DEFAULT_EVERY_S))


@dataclass(frozen=True)
class _Reporting:
    log: Log
    label: str | None
    every_s: float


_current: ContextVar[_Reporting | None] = ContextVar("kdrl_progress", default=None)


@contextmanager
def reporting(log: Log, label: str, *, every_s: float | None = None) -> Iterator[None]:
    """Progress of the stages run inside this block goes to `log`, labelled `label`."""
    token = _current.set(_Reporting(log, label, default_every_s() if every_s is None else every_s))
    try:
        yield
    finally:
        _current.reset(token)


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "–"


class Progress:
    """`done` of `total` units of one stage, and the tokens processed so far.

    >>> lines = []
    >>> with reporting(lines.append, "teacher step 0", every_s=0.0):
    ...     p = Progress("teacher scoring", total=2, unit="batches", tty=False)
    ...     p.update(1, tokens=300)
    ...     p.update(1)
    ...     p.close()
    >>> lines[0].startswith("[kdrl] teacher step 0: 1/2 batches, 300 tokens, ")
    True
    >>> lines[-1].startswith("[kdrl] teacher step 0: done, 2/2 batches, 300 tokens in ")
    True
    """

    def __init__(self, name: str, *, total: int, unit: str, tty: bool | None = None) -> None:
        reporting_ = _current.get() or _Reporting(print, None, default_every_s())
        self.log, self.every_s = reporting_.log, reporting_.every_s
        self.label = reporting_.label or name
        self.total, self.unit = total, unit
        self.done = self.tokens = 0
        self.start = self.last = self.last_read = time.perf_counter()
        self.logged = False
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit=unit, delay=2.0, leave=False, file=sys.stderr)

    def update(self, n: int = 1, *, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{_rate(self.tokens, now - self.start)} tok/s", refresh=False)
        elif now - self.last >= self.every_s:
            self.last, self.logged = now, True
            self.log(f"[kdrl] {self.label}: {self.done:,}/{self.total:,} {self.unit}, {self.tokens:,} tokens, "
                     f"{_rate(self.tokens, now - self.start)} tokens/s, {now - self.start:.0f} s")

    def set_tokens(self, tokens: int) -> None:
        """The token count so far, where the stage counts it itself."""
        self.tokens, self.last_read = tokens, time.perf_counter()

    def due(self) -> bool:
        """Whether the token count is worth reading now (for a stage whose count costs a device
        sync): before a line is logged, or twice a second for a bar."""
        now = time.perf_counter()
        return now - (self.last_read if self.bar is not None else self.last) >= (0.5 if self.bar is not None
                                                                                  else self.every_s)

    def close(self) -> None:
        """Close the bar; a stage that logged progress logs its end too."""
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        elif self.logged:
            self.log(f"[kdrl] {self.label}: done, {self.done:,}/{self.total:,} {self.unit}, {self.tokens:,} tokens "
                     f"in {seconds:.0f} s ({_rate(self.tokens, seconds)} tokens/s)")


class VLLMProgress:
    """What vLLM's `LLM.generate(..., use_tqdm=...)` asks of a tqdm bar, over a `Progress`: pass
    ``use_tqdm=VLLMProgress.factory("generate", unit="sequences")``. vLLM counts finished sequences
    (`update(n)`; n samples of a prompt are n) and reports its output speed in `postfix`, from which
    the token count is taken (an estimate: speed × elapsed).
    Requests run together, so most of them finish near the end: the lines say how many are done."""

    def __init__(self, name: str, *, total: int, unit: str) -> None:
        self.progress = Progress(name, total=total, unit=unit)
        self.n = 0
        self._postfix = ""

    @classmethod
    def factory(cls, name: str, *, unit: str):
        """The callable vLLM calls as ``tqdm_func(total=..., desc=..., postfix=...)`` for the engine
        loop, and as ``tqdm_func(iterable, desc=...)`` around the prompts it renders first: that
        one gets the iterable back, unwrapped (rendering is quick)."""
        def make(iterable=None, *_, total: int = 0, **__):
            return iterable if iterable is not None else cls(name, total=total, unit=unit)

        return make

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.perf_counter() - self.progress.start, 1e-9)}

    @property
    def postfix(self) -> str:
        return self._postfix

    @postfix.setter
    def postfix(self, text: str) -> None:  # "est. speed input: 1.00 toks/s, output: 2.00 toks/s"
        self._postfix = text
        speed = text.rpartition("output:")[2].split("toks/s")[0].strip()
        try:
            self.progress.set_tokens(int(float(speed) * self.format_dict["elapsed"]))
        except ValueError:
            pass

    def update(self, n: int = 1) -> None:
        self.n += n
        self.progress.update(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.progress.close()
