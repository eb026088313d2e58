"""The Optuna RDB storage that holds a study, so that it survives kill -9 and several workers can share it."""

from __future__ import annotations

import time
import warnings

import optuna
import sqlalchemy

from src.errors import UserError

# A RUNNING trial whose worker (on any host) has not sent a heartbeat for GRACE_S seconds is marked FAIL.
HEARTBEAT_S, GRACE_S = 60, 300


class TuneError(UserError, RuntimeError):
    """A study that cannot be opened or has no result."""


def shown(url: str) -> str:
    """A storage URL fit for logs and tags: the password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _engine_kwargs(url: str) -> dict:
    backend = url.partition(":")[0].partition("+")[0]
    if backend == "sqlite":  # concurrent workers wait for each other's writes instead of failing
        return {"connect_args": {"timeout": 60}}
    if backend in ("postgresql", "mysql"):  # an unreachable server fails in seconds, not minutes
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats so that trials of dead workers on any host end up FAIL."""
    try:
        try:
            return _rdb_storage(url)
        except sqlalchemy.exc.DBAPIError:  # workers started at once race to create the tables: once more
            time.sleep(1)
            return _rdb_storage(url)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
        reason = err.__cause__ if isinstance(err, ImportError) and err.__cause__ else err
        first_line = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        raise TuneError(
            f"Optuna storage {shown(url)} cannot be opened ({first_line}); pass --storage with a reachable "
            "database URL (e.g. sqlite:///optuna.db, or postgresql://user:password@host/db with its driver "
            "installed)"
        ) from None
