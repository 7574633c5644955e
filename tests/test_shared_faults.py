"""The shared trainers as Ray actors, started as a run starts them (search/trainers.py), on the
session's local Ray: what a client reads of their free slots. Tiny random-init Llama
(tests/conftest.py) and tests/test_shared_trainer.py's data, on the CPU."""

from __future__ import annotations

import pytest
import ray

from search.config import ResourcesConfig
from search.trainers import shared_trainers
from test_shared_trainer import setup, trial  # noqa: F401 - setup is a fixture of these tests too
from trainables.client import _free_slots


@pytest.fixture
def trainers(local_ray, setup):  # noqa: F811 - the imported fixture
    with shared_trainers(ResourcesConfig(pack_slots=2), setup) as handles:
        yield handles


def test_a_client_reads_each_trainers_free_slots(trainers):
    (trainer,) = trainers
    assert ray.get(trainer.open.remote("a", trial(), None))
    assert _free_slots(trainers) == ([(1, 0)], 0)
