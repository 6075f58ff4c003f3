"""The optimizer both training stages use: AdamW with the section's rate, schedule and weight decay."""

from __future__ import annotations

from encoderflow import runtime

# Cramming (Geiping & Goldstein 2022) and BERT leave biases and norm scales undecayed.
NO_DECAY = ("bias", "gamma", "beta")
KERAS_DEFAULT_DECAY = 0.004


def learning_rate(section, total_steps: int):
    """A constant rate (the guide), or linear warm-up then cosine decay to 0 over ``total_steps``.

    Args:
        section: a config section with ``learning_rate``, ``lr_schedule`` and ``warmup_ratio``.
        total_steps: optimizer steps of the whole run.
    """
    if section.lr_schedule == "constant":
        return section.learning_rate
    keras = runtime.keras()
    warmup = max(1, int(round(section.warmup_ratio * total_steps)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.0,
        warmup_target=section.learning_rate,
        warmup_steps=warmup,
    )


def adamw(section, total_steps: int, ema_momentum: float = 0.0):
    """AdamW as the guide compiles it (Keras defaults) unless the section says otherwise.

    ``weight_decay`` 0.004 is Keras's own default, so the guide's numbers are unchanged; any other
    value also exempts biases and LayerNorm scales and offsets, as BERT does.

    Args:
        section: a config section with the ``_Optimizer`` settings.
        total_steps: optimizer steps of the whole run.
        ema_momentum: above 0, Keras keeps a moving average of the weights and ``fit`` ends by
            writing it into the model (``finalize_variable_values``).
    """
    keras = runtime.keras()
    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum > 0 else {}
    opt = keras.optimizers.AdamW(learning_rate(section, total_steps), weight_decay=section.weight_decay, **ema)
    if section.weight_decay != KERAS_DEFAULT_DECAY:
        opt.exclude_from_weight_decay(var_names=list(NO_DECAY))
    return opt


def describe(section) -> str:
    """The optimizer as a log line says it: ``AdamW, learning rate 0.001 (warmup_cosine, warmup_ratio 0.1),
    weight decay 0.01``. A preset's choices (the recipe's schedule and decay) were in no log line."""
    schedule = f", warmup_ratio {section.warmup_ratio:g}" if section.lr_schedule != "constant" else ""
    decay = " (Keras's default)" if section.weight_decay == KERAS_DEFAULT_DECAY else ", biases and norms undecayed"
    return (
        f"AdamW, learning rate {section.learning_rate:g} ({section.lr_schedule}{schedule}), "
        f"weight decay {section.weight_decay:g}{decay}"
    )
