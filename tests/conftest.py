"""Fixtures shared by more than one test module."""

from __future__ import annotations

import pytest

from service.subscriber import DecisionSubscriber


@pytest.fixture
def make_subscriber():
    """``make(endpoint, **kwargs)``: a connected reference subscriber, closed after the test."""
    made: list[DecisionSubscriber] = []

    def make(endpoint: str, **kwargs) -> DecisionSubscriber:
        subscriber = DecisionSubscriber(**kwargs)
        made.append(subscriber)
        subscriber.connect(endpoint)
        return subscriber

    yield make
    for subscriber in made:
        subscriber.close()
