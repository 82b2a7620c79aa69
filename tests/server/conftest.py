"""Fixtures for building real Flower messages outside a running Flower process."""

from __future__ import annotations

import pytest


@pytest.fixture
def flwr_task():
    """Give this process a Flower task identity (run 1, node 0), as a running ServerApp has.

    ``flwr.app.Message`` reads it when an instruction message is created.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
