"""One frozen, typed configuration for a pipeline run, with named presets.

A :class:`Config` is built once per task from the preset name plus validated overrides
(``section.key=value`` strings from the command line, or typed Airflow ``Param`` values) and is
never mutated. Every artifact records the resolved config and its hash, so a consumer can check
the coupled values (sequence length, predictions per sequence, vocabulary) it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from encoderflow.errors import EncoderflowError

SPLITS = ("train", "valid", "test")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("constant", "warmup_cosine")
SEQUENCE_MODES = ("line", "packed")


class ConfigError(EncoderflowError, ValueError):
    """An invalid preset, key, type or value; the message names the offending key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config value {key!r}: {msg}")


def _range(obj: Any, section: str, name: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> None:
    value = getattr(obj, name)
    key = f"{section}.{name}"
    if isinstance(value, float):
        _check(math.isfinite(value), key, f"must be finite, got {value!r}")
    if lo is not None:
        ok = value > lo if lo_open else value >= lo
        _check(ok, key, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None:
        _check(value <= hi, key, f"must be <= {hi}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Inputs, tokenization and masked-LM example generation.

    Attributes:
        seq_length: tokens per sequence (pretraining and fine-tuning).
        mask_rate: probability that a selectable token is chosen for prediction.
        predictions_per_seq: cap on predicted tokens per sequence (MLM label slots).
        min_line_chars: the guide keeps only WikiText lines longer than this.
        num_shards: TFRecord shards for the pretraining split (validation gets fewer).
        dupe_factor: copies of the corpus, each with different masks; epoch ``e`` trains on copy
            ``e % dupe_factor``. The guide masks on the fly, so each of its 8 epochs sees new
            masks: one copy per pretraining epoch (8) reproduces that, reproducibly.
        seed: root of every random choice in data generation.
        pretrain_split: WikiText split to pretrain on (offline runs use ``test``).
        validation_split: WikiText split for MLM validation.
        lowercase: WordPiece lower-casing (BERT uncased vocabulary).
        strip_accents: WordPiece accent stripping.
        sequence_mode: ``line`` (the guide: one sequence per line longer than ``min_line_chars``,
            truncated to ``seq_length``) or ``packed`` (every non-blank line of an article,
            concatenated and cut into consecutive ``seq_length`` windows: no text is dropped).
    """

    seq_length: int = 128
    mask_rate: float = 0.25
    predictions_per_seq: int = 32
    min_line_chars: int = 100
    num_shards: int = 8
    dupe_factor: int = 8
    seed: int = 42
    pretrain_split: str = "train"
    validation_split: str = "valid"
    lowercase: bool = True
    strip_accents: bool = True
    sequence_mode: str = "line"

    def validate(self) -> None:
        s = "data"
        _range(self, s, "seq_length", 8, 512)
        _range(self, s, "mask_rate", 0.0, 1.0, lo_open=True)
        _range(self, s, "predictions_per_seq", 1, self.seq_length)
        _range(self, s, "min_line_chars", 0, 100_000)
        _range(self, s, "num_shards", 1, 1024)
        _range(self, s, "dupe_factor", 1, 64)
        _range(self, s, "seed", 0, 2**31 - 1)
        _check(self.pretrain_split in SPLITS, "data.pretrain_split",
               f"must be one of {SPLITS}, got {self.pretrain_split!r}")
        _check(self.validation_split in SPLITS, "data.validation_split",
               f"must be one of {SPLITS}, got {self.validation_split!r}")
        _check(self.sequence_mode in SEQUENCE_MODES, "data.sequence_mode",
               f"must be one of {SEQUENCE_MODES}, got {self.sequence_mode!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The encoder (the guide: 3 layers, dim 256, FFN 512, 4 heads, dropout 0.1).

    Attributes:
        padding_mask: attend to real tokens only. ``False`` reproduces the guide, which lets
            every token attend to ``[PAD]``.
    """

    num_layers: int = 3
    model_dim: int = 256
    intermediate_dim: int = 512
    num_heads: int = 4
    dropout: float = 0.1
    norm_epsilon: float = 1e-5
    padding_mask: bool = True

    def validate(self) -> None:
        s = "model"
        _range(self, s, "num_layers", 1, 48)
        _range(self, s, "model_dim", 8, 4096)
        _range(self, s, "intermediate_dim", 8, 16384)
        _range(self, s, "num_heads", 1, 64)
        _range(self, s, "dropout", 0.0, 0.9)
        _range(self, s, "norm_epsilon", 0.0, 0.1, lo_open=True)
        _check(self.model_dim % self.num_heads == 0, "model.num_heads",
               f"must divide model.model_dim={self.model_dim}, got {self.num_heads}")


@dataclass(frozen=True)
class BaselineConfig:
    """The guide's bag-of-words baseline: multi-hot over the top tokens, one sigmoid unit."""

    max_tokens: int = 4000
    epochs: int = 5
    batch_size: int = 32

    def validate(self) -> None:
        _range(self, "baseline", "max_tokens", 16, 1_000_000)
        _range(self, "baseline", "epochs", 1, 1000)
        _range(self, "baseline", "batch_size", 1, 65536)


@dataclass(frozen=True)
class PretrainConfig:
    """Masked-LM pretraining.

    Attributes:
        steps_per_epoch: cap on steps per epoch; 0 trains on every shard record.
        validation_steps: cap on validation batches; 0 uses the whole validation split.
        precision: Keras dtype policy; ``auto`` is ``mixed_bfloat16`` on a GPU/TPU and
            ``float32`` on a CPU (where bfloat16 matmuls are slower, not faster).
        lr_schedule: ``constant`` (the guide) or ``warmup_cosine``: linear warm-up over
            ``warmup_ratio`` of all steps to ``learning_rate``, then cosine decay to 0.
        backup_every_steps: back up weights and optimizer state every this many steps as well
            as at each epoch end, so a retry resumes mid-epoch; 0 backs up at epoch ends only.
            A backup of the guide model is ~230 MB written (weights and AdamW moments, kept
            twice): 5000 steps is minutes on a Colab-class GPU, ~15 s at 40,000 seq/s.
    """

    batch_size: int = 128
    learning_rate: float = 5e-4
    epochs: int = 8
    steps_per_epoch: int = 0
    validation_steps: int = 0
    precision: str = "auto"
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.1
    backup_every_steps: int = 5000

    def validate(self) -> None:
        s = "pretrain"
        _range(self, s, "backup_every_steps", 0, 10_000_000)
        _range(self, s, "batch_size", 1, 65536)
        _range(self, s, "learning_rate", 0.0, 1.0, lo_open=True)
        _range(self, s, "epochs", 1, 1000)
        _range(self, s, "steps_per_epoch", 0, 10_000_000)
        _range(self, s, "validation_steps", 0, 10_000_000)
        _check(self.precision in PRECISIONS, "pretrain.precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.lr_schedule in LR_SCHEDULES, "pretrain.lr_schedule",
               f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _range(self, s, "warmup_ratio", 0.0, 0.9)


@dataclass(frozen=True)
class FinetuneConfig:
    """SST-2 fine-tuning of the pretrained encoder."""

    batch_size: int = 32
    learning_rate: float = 5e-5
    epochs: int = 3
    steps_per_epoch: int = 0

    def validate(self) -> None:
        s = "finetune"
        _range(self, s, "batch_size", 1, 65536)
        _range(self, s, "learning_rate", 0.0, 1.0, lo_open=True)
        _range(self, s, "epochs", 1, 1000)
        _range(self, s, "steps_per_epoch", 0, 10_000_000)


@dataclass(frozen=True)
class GateConfig:
    """Promotion thresholds, TFX Evaluator style.

    Attributes:
        min_accuracy: absolute floor on SST-2 validation accuracy.
        min_gain_over_baseline: the candidate must beat this run's bag-of-words baseline by at
            least this much (negative values tolerate a deficit).
        max_regression: how far below the current champion (re-evaluated on this run's
            validation data) the candidate may fall and still be promoted.
        registered_model: MLflow registered model name.
    """

    min_accuracy: float = 0.80
    min_gain_over_baseline: float = 0.0
    max_regression: float = 0.0
    registered_model: str = "encoderflow-sst2"

    def validate(self) -> None:
        s = "gate"
        _range(self, s, "min_accuracy", 0.0, 1.0)
        _range(self, s, "min_gain_over_baseline", -1.0, 1.0)
        _range(self, s, "max_regression", 0.0, 1.0)
        _check(bool(self.registered_model.strip()) and "/" not in self.registered_model,
               "gate.registered_model", f"must be a non-empty name without '/', got {self.registered_model!r}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "baseline": BaselineConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "gate": GateConfig,
}


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one run. Build with :func:`from_overrides`."""

    preset: str = "guide"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in SECTIONS:
            getattr(self, name).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable sha256 over the named sections (all of them when none are named)."""
        names = names or tuple(SECTIONS)
        payload = {n: dataclasses.asdict(getattr(self, n)) for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def config_hash(self) -> str:
        return self.section_hash()


# The guide's exact hyperparameters are the dataclass defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "guide": {},
    # Tiny model and sequences: the whole DAG on CPU in a few minutes, for tests and smoke runs.
    # Offline data has no WikiText train split, so smoke pretrains on `test`.
    # Its gate only asks for better than chance: a smoke model is a plumbing check, not a product.
    "smoke": {
        "data": {"seq_length": 32, "predictions_per_seq": 6, "num_shards": 2, "pretrain_split": "test",
                 "dupe_factor": 2},
        "model": {"num_layers": 1, "model_dim": 32, "intermediate_dim": 64, "num_heads": 2},
        "baseline": {"max_tokens": 1000, "epochs": 2, "batch_size": 64},
        "pretrain": {"batch_size": 32, "learning_rate": 1e-3, "epochs": 2,
                     "steps_per_epoch": 50, "validation_steps": 10},
        "finetune": {"batch_size": 32, "learning_rate": 1e-3, "epochs": 1, "steps_per_epoch": 300},
        "gate": {"min_accuracy": 0.5, "min_gain_over_baseline": -1.0, "max_regression": 0.0},
    },
}


def _coerce(key: str, typ: type, value: Any) -> Any:
    """Turn a string (from ``--set``) or a typed value (from a DAG Param) into ``typ``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if typ is bool:
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
            return text
        except ValueError:
            raise ConfigError(f"config value {key!r}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and isinstance(value, bool):
        return value
    if type(value) is not typ:
        raise ConfigError(f"config value {key!r}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _field_types(cls: type) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: hints[f.type] for f in fields(cls)}


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse ``["section.key=value", ...]`` into a dict; malformed items raise ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        out[key.strip()] = value
    return out


def from_overrides(preset: str = "guide", overrides: Mapping[str, Any] | None = None) -> Config:
    """Resolve a preset plus ``{"section.key": value}`` overrides into a validated Config.

    ``None`` values are skipped (an Airflow Param left empty means "the preset's value").

    Raises:
        ConfigError: unknown preset or key, a value of the wrong type, or out of range.
    """
    if preset not in PRESETS:
        raise ConfigError(f"config value 'preset': must be one of {sorted(PRESETS)}, got {preset!r}")
    values: dict[str, dict[str, Any]] = {name: dict(v) for name, v in PRESETS[preset].items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(f"unknown config key {key!r}: sections are {sorted(SECTIONS)}")
        types = _field_types(SECTIONS[section])
        if name not in types:
            raise ConfigError(f"unknown config key {key!r}: {section} has {sorted(types)}")
        values.setdefault(section, {})[name] = _coerce(key, types[name], value)
    sections = {name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(preset=preset, **sections)


def from_dict(payload: Mapping[str, Any]) -> Config:
    """Rebuild a Config recorded in an artifact (the inverse of :meth:`Config.to_dict`)."""
    try:
        sections = {name: cls(**payload[name]) for name, cls in SECTIONS.items()}
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"recorded config is incomplete or has unknown keys: {exc}") from None
    return Config(preset=payload.get("preset", "guide"), **sections)


def keys() -> list[str]:
    """Every overridable key, ``section.name``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]
