"""``celeriac.signals.Signal`` behaves as Celery 5.7's ``Signal``: the same scenario is
run against both classes and must give the same calls."""

from __future__ import annotations

import gc
import logging

import pytest
from celery.utils.dispatch import Signal as CelerySignal

import celeriac.signals
from celeriac.signals import Signal


@pytest.fixture(params=["celeriac", "celery"])
def make(request):
    if request.param == "celery":
        return lambda name: CelerySignal(name=name)
    return Signal


def test_connect_as_a_decorator_with_and_without_options(make):
    sig = make("s")
    calls = []

    @sig.connect
    def anyone(sender=None, **kwargs):
        calls.append(("anyone", sender, kwargs.get("x")))
        return 1

    @sig.connect(sender="proj.add")
    def adds_only(sender=None, **kwargs):
        calls.append(("adds_only", sender, kwargs.get("x")))
        return 2

    assert [r for _, r in sig.send(sender="proj.add", x=5)] == [1, 2]
    assert [r for _, r in sig.send(sender="proj.mul", x=6)] == [1]
    assert calls == [("anyone", "proj.add", 5), ("adds_only", "proj.add", 5),
                     ("anyone", "proj.mul", 6)]


def test_receivers_get_the_signal_and_sender(make):
    sig = make("s")
    seen = {}

    def receiver(**kwargs):
        seen.update(kwargs)

    sig.connect(receiver)
    sender = object()
    sig.send(sender=sender, a=1)
    assert seen == {"signal": sig, "sender": sender, "a": 1}


def test_a_receiver_that_raises_is_logged_and_the_others_still_run(make, caplog):
    sig = make("s")
    calls = []

    def broken(**kwargs):
        raise RuntimeError("broken receiver")

    def fine(**kwargs):
        calls.append("fine")
        return "ok"

    sig.connect(broken)
    sig.connect(fine)
    with caplog.at_level(logging.ERROR):
        responses = sig.send(sender=None)
    assert calls == ["fine"]
    assert isinstance(responses[0][1], RuntimeError) and responses[1][1] == "ok"
    assert "broken receiver" in caplog.text


def test_dispatch_uid_connects_once_and_disconnects(make):
    sig = make("s")
    calls = []

    def one(**kwargs):
        calls.append(1)

    def two(**kwargs):
        calls.append(2)

    sig.connect(one, dispatch_uid="uid")
    sig.connect(two, dispatch_uid="uid")  # same uid: not added
    sig.send(sender=None)
    assert calls == [1]
    assert sig.disconnect(dispatch_uid="uid") is True
    assert sig.disconnect(dispatch_uid="uid") is False
    sig.send(sender=None)
    assert calls == [1]


def test_weak_receivers_go_with_their_last_reference_strong_ones_stay(make):
    sig = make("s")
    calls = []

    def make_receiver(tag):
        def receiver(**kwargs):
            calls.append(tag)
        return receiver

    weak = make_receiver("weak")
    sig.connect(weak)
    sig.connect(make_receiver("strong"), weak=False)
    sig.send(sender=None)
    del weak
    gc.collect()
    sig.send(sender=None)
    assert calls == ["weak", "strong", "strong"]


def test_bound_methods_are_held_weakly_by_their_instance(make):
    sig = make("s")
    calls = []

    class Listener:
        def on(self, **kwargs):
            calls.append("on")

    listener = Listener()
    sig.connect(listener.on)  # a new bound method object every time: still connected
    sig.send(sender=None)
    del listener
    gc.collect()
    sig.send(sender=None)
    assert calls == ["on"]


def test_a_receiver_must_take_keyword_arguments(make):
    sig = make("s")

    def positional_only(sender):
        pass

    with pytest.raises(ValueError):
        sig.connect(positional_only)


def test_sending_with_no_receiver_returns_nothing(make):
    assert make("s").send(sender=None, x=1) == []


def test_every_celery_signal_name_exists():
    import celery.signals

    for name in celery.signals.__all__:
        ours = getattr(celeriac.signals, name)
        assert isinstance(ours, Signal) and ours.name == name
        theirs = getattr(celery.signals, name)
        assert ours.providing_args == theirs.providing_args, name
