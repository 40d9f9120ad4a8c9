"""One log function for tasks that also run without Prefect (`task.fn`): the run logger inside a
flow or task run, stdout outside one."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def info(message: str) -> None:
    try:
        logger = get_run_logger()
    except MissingContextError:
        print(message, flush=True)
        return
    logger.info(message)
