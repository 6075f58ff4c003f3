"""The shared AdamW: Keras's defaults for the guide, BERT's exemptions when the decay is changed."""

from __future__ import annotations

import numpy as np
import pytest

from encoderflow.config import FinetuneConfig, PretrainConfig


def _step(section):
    """One AdamW step with zero gradients on a kernel, a bias and a LayerNorm: only decay moves them."""
    from encoderflow import runtime
    from encoderflow.train.optim import adamw

    keras = runtime.keras()
    dense = keras.layers.Dense(2, name="dense")
    norm = keras.layers.LayerNormalization(name="norm")
    model = keras.Sequential([keras.Input((2,)), dense, norm])
    for v in model.weights:
        v.assign(np.ones(v.shape, "float32"))
    opt = adamw(section, total_steps=10)
    opt.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in model.trainable_variables])
    return {
        f"{layer.name}/{v.name}": float(np.asarray(v.value).ravel()[0])
        for layer in (dense, norm)
        for v in layer.weights
    }


def test_the_guides_decay_applies_to_every_weight_and_other_values_spare_biases_and_norms():
    guide = _step(PretrainConfig())  # learning rate 5e-4, Keras's default decay 0.004 on everything
    assert all(v == pytest.approx(1 - 5e-4 * 0.004) for v in guide.values()), guide
    bert = _step(PretrainConfig(weight_decay=0.1, learning_rate=1e-2))
    assert bert["dense/kernel"] == pytest.approx(1 - 1e-2 * 0.1)
    assert bert["dense/bias"] == bert["norm/gamma"] == bert["norm/beta"] == 1.0


def test_finetuning_schedules_like_pretraining():
    from encoderflow.train.optim import learning_rate

    assert learning_rate(FinetuneConfig(), total_steps=100) == 5e-5
    sched = learning_rate(FinetuneConfig(lr_schedule="warmup_cosine", warmup_ratio=0.2, learning_rate=1e-4), 100)
    assert float(sched(0)) == pytest.approx(0.0) and float(sched(20)) == pytest.approx(1e-4)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)


def test_with_ema_momentum_fit_ends_on_the_moving_average_of_the_weights():
    from encoderflow import runtime
    from encoderflow.train.optim import adamw

    keras = runtime.keras()

    def fit(momentum):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(loss="binary_crossentropy", optimizer=adamw(FinetuneConfig(learning_rate=0.1), 6, momentum))
        seen = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda *_: seen.append(np.asarray(model.layers[0].kernel.value).copy())
        )
        x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
        y = (x[:, :1] > 0).astype("float32")
        model.fit(x, y, batch_size=6, epochs=6, verbose=0, shuffle=False, callbacks=[record])
        return seen, np.asarray(model.layers[0].kernel.value)

    steps, final = fit(0.0)
    np.testing.assert_array_equal(final, steps[-1])  # off: the last iterate, as the guide
    steps, final = fit(0.5)
    average = steps[0]  # Keras: the first step starts the average, then average <- m * average + (1 - m) * w
    for w in steps[1:]:
        average = 0.5 * average + 0.5 * w
    np.testing.assert_allclose(final, average, rtol=1e-5)
    assert np.abs(final - steps[-1]).max() > 1e-3
