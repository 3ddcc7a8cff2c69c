"""The step loop's pure pieces: learning-rate schedule and data order."""

from __future__ import annotations

from forgetkit.train import TrainConfig
from forgetkit.train.loop import DataOrder, _lr_lambda


def test_scheduler_warmup_then_constant_or_cosine():
    cosine = _lr_lambda(TrainConfig(warmup_steps=3, lr_scheduler_type="cosine"), total_steps=13)
    assert [cosine(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert cosine(3) == 1.0 and abs(cosine(8) - 0.5) < 1e-12 and cosine(13) < 1e-12
    constant = _lr_lambda(TrainConfig(warmup_steps=2, lr_scheduler_type="constant"), 10)
    assert [constant(s) for s in (0, 1, 2, 9)] == [1 / 3, 2 / 3, 1.0, 1.0]


def test_data_order_is_reshuffled_each_epoch_and_restorable():
    order = DataOrder(5, seed=3)
    first = order.take(3) + order.take(3)
    assert sorted(first[:5]) == list(range(5))
    state, pending = order.generator.get_state(), list(order.pending)
    ahead = order.take(7)
    again = DataOrder(5, seed=99)
    again.generator.set_state(state)
    again.pending = pending
    assert again.take(7) == ahead
