"""One frozen, typed configuration for a pipeline run, with named presets.

A :class:`Config` is built once per task from the preset name plus validated overrides
(``section.key=value`` strings from the command line, or typed Airflow ``Param`` values) and is
never mutated. Every artifact records the resolved config and its hash, so a consumer can check
the coupled values (sequence length, predictions per sequence, vocabulary) it depends on.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from encoderflow.errors import EncoderflowError
from encoderflow.layout import sha256_json

SPLITS = ("train", "valid", "test")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("constant", "warmup_cosine")
SEQUENCE_MODES = ("line", "packed")
POOLINGS = ("auto", "real_tokens", "all_tokens")
AUTO_ON_OFF = ("auto", "on", "off")
DOCUMENT_MODES = ("file", "blank_line")
VOCABS = ("bert", "trained")


class ConfigError(EncoderflowError, ValueError):
    """An invalid preset, key, type or value; the message names the offending key."""


# Trigger-form sections: MAIN stays at the top of the form, the others are collapsed groups below.
MAIN, OWN, DATA, TRAIN, TUNE, GATE = (
    "",
    "Your own data",
    "Data generation",
    "Pretraining",
    "Fine-tuning",
    "Promotion gate",
)
FORM_SECTIONS = (MAIN, OWN, DATA, TRAIN, TUNE, GATE)


def knob(
    default: Any,
    description: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    choices: tuple[str, ...] | None = None,
    title: str | None = None,
    form: str | None = None,
    param: str | None = None,
    display: Mapping[str, str] | None = None,
    trains: bool = True,
) -> Any:
    """A config field and everything said about it, in one place.

    Validation, the DAG's trigger-form ``Param``s, the param-to-key map, ``encoderflow config``
    and ``docs/parameters.md`` are all generated from this metadata.

    Args:
        default: the guide preset's value.
        description: one or two sentences for a person filling the trigger form.
        minimum: inclusive lower bound (exclusive with ``exclusive_minimum``).
        maximum: inclusive upper bound.
        choices: the allowed strings.
        title: the trigger-form label; fields without ``form`` are set through "Other overrides".
        form: the trigger-form section (``MAIN`` or a group name); ``None`` keeps it off the form.
        param: the DAG param's name; default ``<section>_<name>``.
        display: labels for ``choices`` in the form.
        trains: False for a setting that changes only when the host looks (logs, backs up, returns
            from the device), not what is trained: it stays out of :meth:`Config.training_hash`, so
            a run differing from the champion only there trains nothing. (Validation thresholds stay
            in: a run that tightens one validates the data again.)
    """
    meta = {
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
        "title": title,
        "form": form,
        "param": param,
        "display": dict(display) if display else None,
        "trains": trains,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Knob:
    """One config field as declared: its key, Python type, default and :func:`knob` metadata."""

    key: str
    type: type
    default: Any
    description: str
    minimum: float | None
    maximum: float | None
    exclusive_minimum: bool
    choices: tuple[str, ...] | None
    title: str | None
    form: str | None
    param: str | None
    display: dict[str, str] | None
    trains: bool

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def name(self) -> str:
        return self.key.split(".")[1]

    @property
    def in_lineage(self) -> bool:
        """Whether a model is trained from it (:meth:`Config.training_hash`): neither in a section that
        decides promotion (:data:`PROMOTION_SECTIONS`) nor declared ``trains=False``."""
        return self.trains and self.section not in PROMOTION_SECTIONS

    def check(self, value: Any) -> None:
        """Raise ``ConfigError`` naming the key if ``value`` breaks the declared bounds or choices."""
        if isinstance(value, float):
            _check(math.isfinite(value), self.key, f"must be finite, got {value!r}")
        if self.minimum is not None:
            ok = value > self.minimum if self.exclusive_minimum else value >= self.minimum
            pct = f" (a fraction: {value / 100:g} for {value:g}%)" if self.minimum == -1 and -100 <= value < -1 else ""
            _check(
                ok, self.key, f"must be {'>' if self.exclusive_minimum else '>='} {self.minimum}, got {value!r}{pct}"
            )
        if self.maximum is not None:
            # An accuracy given in percent (80 for 0.8) is the likely slip where 1 is the most.
            pct = f" (a fraction: {value / 100:g} for {value:g}%)" if self.maximum == 1 and 1 < value <= 100 else ""
            _check(value <= self.maximum, self.key, f"must be <= {self.maximum}, got {value!r}{pct}")
        if self.choices is not None:
            _check(value in self.choices, self.key, f"must be one of {self.choices}, got {value!r}")

    def bounds(self) -> str:
        """``[8, 512]``, ``(0, 1]``, ``>= 0`` or one of the choices, for docs and CLI output."""
        if self.choices:
            return " | ".join(self.choices)
        lo = "" if self.minimum is None else f"{'(' if self.exclusive_minimum else '['}{_fmt(self.minimum)}"
        hi = "" if self.maximum is None else f"{_fmt(self.maximum)}]"
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f"{'>' if self.exclusive_minimum else '>='} {_fmt(self.minimum)}"
        return f"<= {_fmt(self.maximum)}" if hi else ""


def _fmt(value: Any) -> str:
    """Bounds and preset values as a person writes them: 2147483647, 0.0005, 1e-05."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


class _Section:
    """Shared by the config sections: bounds come from the declarations, cross-field rules from ``rules``."""

    def validate(self) -> None:
        for k in section_knobs(type(self)):
            k.check(getattr(self, k.name))
        self.rules()

    def rules(self) -> None:
        """Checks that involve more than one field; the declarations cover the rest."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config value {key!r}: {msg}")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Inputs, tokenization and masked-LM example generation (fields: ``docs/parameters.md``)."""

    seq_length: int = knob(
        128,
        "Tokens per sequence (pretraining and fine-tuning).",
        minimum=8,
        maximum=512,
        title="Sequence length",
        form=DATA,
        param="seq_length",
    )
    mask_rate: float = knob(
        0.25,
        "Share of each sequence's selectable tokens chosen for prediction, rounded up and capped at "
        "data.predictions_per_seq (as the guide's tf.data masking).",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
    )
    predictions_per_seq: int = knob(
        32, "Cap on predicted tokens per sequence (MLM label slots); at most data.seq_length.", minimum=1, maximum=512
    )
    min_line_chars: int = knob(100, "The guide keeps only WikiText lines longer than this.", minimum=0, maximum=100_000)
    num_shards: int = knob(
        8,
        "TFRecord shards per masked copy of the pretraining split (data.dupe_factor copies, one mapped "
        "build_shard task per shard; validation gets fewer).",
        minimum=1,
        maximum=1024,
        title="Shards",
        form=DATA,
        param="num_shards",
    )
    dupe_factor: int = knob(
        8,
        "Copies of the corpus, each with different masks; epoch e trains on copy "
        "e % dupe_factor. The guide masks on the fly, so one copy per pretraining epoch "
        "reproduces it, reproducibly.",
        minimum=1,
        maximum=64,
        title="Dupe factor",
        form=DATA,
        param="dupe_factor",
    )
    seed: int = knob(
        42,
        "Root of every random choice in data generation and training, and of the gate's bootstrap resamples.",
        minimum=0,
        maximum=2**31 - 1,
        title="Seed",
        form=DATA,
        param="seed",
    )
    pretrain_split: str = knob(
        "train",
        "WikiText split to pretrain on (offline copies usually lack train: use "
        "test). MLM validation reads data.validation_split (valid by default).",
        choices=SPLITS,
        title="WikiText split to pretrain on",
        form=MAIN,
        param="pretrain_split",
        display={
            "train": "train (full WikiText-103)",
            "valid": "valid",
            "test": "test (offline copies without the train split)",
        },
    )
    validation_split: str = knob("valid", "WikiText split for MLM validation.", choices=SPLITS)
    lowercase: bool = knob(True, "WordPiece lower-casing (BERT uncased vocabulary).")
    strip_accents: bool = knob(True, "WordPiece accent stripping.")
    task_adaptive: bool = knob(
        False,
        "Task-adaptive pretraining (Gururangan et al. 2020): the texts of the labeled data's train split (SST-2's "
        "by default), without their labels, join the pretraining corpus as shards of their own, packed into "
        "data.seq_length windows. Dev and test text never do.",
    )
    sequence_mode: str = knob(
        "line",
        "line: the guide, one sequence per line longer than data.min_line_chars, "
        "truncated; packed: every non-blank line of an article, concatenated and cut into "
        "consecutive windows (no text dropped).",
        choices=SEQUENCE_MODES,
    )

    def rules(self) -> None:
        _check(
            self.predictions_per_seq <= self.seq_length,
            "data.predictions_per_seq",
            f"must be <= data.seq_length={self.seq_length}, got {self.predictions_per_seq}",
        )
        # mlm_val_accuracy measured on the text pretraining learned from says nothing of the model.
        others = " or ".join(repr(split) for split in SPLITS if split != self.pretrain_split)
        _check(
            self.validation_split != self.pretrain_split,
            "data.validation_split",
            f"is data.pretrain_split ({self.pretrain_split!r}): MLM accuracy would be measured on the text "
            f"pretraining trained on; give another split ({others})",
        )


# What a run reads: a corpus to pretrain on, labeled data to fine-tune on, a vocabulary.
ROLES = ("corpus", "labeled", "vocab")


@dataclass(frozen=True)
class InputsConfig(_Section):
    """How your own corpus and labeled data are read and checked (the guide's datasets ignore it but
    ``inputs.vocab``). Where they are is a run source (``corpus``, ``labeled``), not config: their
    content hashes are the lineage."""

    documents: str = knob(
        "file",
        "How a custom corpus folder splits into documents: file (each file is one document) or blank_line "
        "(blocks of lines between blank lines). Packed mode never lets a window straddle two documents.",
        choices=DOCUMENT_MODES,
        title="Corpus documents",
        form=OWN,
    )
    holdout: float = knob(
        0.05,
        "Share of a custom corpus's documents held out for MLM validation, chosen by each document's sha256 "
        "(stable when documents are added); at least one document.",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=0.5,
    )
    text_column: str = knob(
        "sentence",
        "Column (TSV/CSV header) or key (JSONL) of the labeled data's text.",
        title="Text column",
        form=OWN,
    )
    label_column: str = knob(
        "label",
        "Column or key of the labeled data's label; the label set is read from train, checked on dev, and "
        "sets the classifier's output size.",
        title="Label column",
        form=OWN,
    )
    vocab: str = knob(
        "bert",
        "bert: the BERT uncased WordPiece vocabulary (the guide); trained: one computed on the pretraining "
        "corpus's training documents (keras-hub compute_word_piece_vocabulary), recorded with its sha256 in "
        "the shards' manifest and the bundle.",
        choices=VOCABS,
        title="Vocabulary",
        form=OWN,
    )
    vocab_size: int = knob(8000, "Size of a trained vocabulary (inputs.vocab=trained).", minimum=64, maximum=200_000)
    min_rows: int = knob(10, "Fewest rows each labeled split may have.", minimum=1, maximum=2**31 - 1)
    max_rows: int = knob(50_000_000, "Most rows each labeled split may have.", minimum=1, maximum=2**31 - 1)
    min_class_share: float = knob(
        0.01, "Smallest share any class may have in the labeled train split.", minimum=0.0, maximum=1.0
    )
    max_class_share: float = knob(
        0.99, "Largest share any class may have in the labeled train split.", minimum=0.0, maximum=1.0
    )
    min_unique_text_share: float = knob(
        0.5,
        "Smallest share of distinct texts in each labeled split: below it, most rows are copies of others.",
        minimum=0.0,
        maximum=1.0,
    )
    max_dev_in_train_share: float = knob(
        0.01,
        "Largest share of labeled dev rows whose text is also in train: leaked rows inflate val_accuracy, "
        "the metric the gate promotes on.",
        minimum=0.0,
        maximum=1.0,
    )

    def rules(self) -> None:
        for key in ("text_column", "label_column"):
            _check(bool(getattr(self, key).strip()), f"inputs.{key}", "must be a non-empty column name")
        _check(self.text_column != self.label_column, "inputs.label_column", "must differ from inputs.text_column")
        _check(self.min_rows <= self.max_rows, "inputs.max_rows", f"must be >= inputs.min_rows={self.min_rows}")
        _check(
            self.min_class_share <= self.max_class_share,
            "inputs.max_class_share",
            f"must be >= inputs.min_class_share={self.min_class_share}",
        )


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The encoder (the guide: 3 layers, dim 256, FFN 512, 4 heads, dropout 0.1)."""

    num_layers: int = knob(3, "Transformer encoder layers.", minimum=1, maximum=48)
    model_dim: int = knob(256, "Hidden size (token and position embeddings, attention).", minimum=8, maximum=4096)
    intermediate_dim: int = knob(512, "Feed-forward inner size.", minimum=8, maximum=16384)
    num_heads: int = knob(4, "Attention heads; must divide model.model_dim.", minimum=1, maximum=64)
    dropout: float = knob(0.1, "Dropout rate in every encoder layer.", minimum=0.0, maximum=0.9)
    norm_epsilon: float = knob(1e-5, "Layer-normalization epsilon.", minimum=0.0, exclusive_minimum=True, maximum=0.1)
    normalize_first: bool = knob(
        False,
        "Pre-layer-norm Transformer blocks (keras-hub normalize_first=True) plus a final LayerNorm; false is "
        "the guide's post-norm. Pre-norm trains stably at higher learning rates (the Cramming recipe).",
    )
    padding_mask: bool = knob(
        True,
        "Attend to real tokens only; false reproduces the guide, which lets every token attend to [PAD].",
        title="Padding mask",
        form=DATA,
        param="padding_mask",
    )

    def rules(self) -> None:
        _check(
            self.model_dim % self.num_heads == 0,
            "model.num_heads",
            f"must divide model.model_dim={self.model_dim}, got {self.num_heads}",
        )


@dataclass(frozen=True)
class BaselineConfig(_Section):
    """The guide's bag-of-words baseline: multi-hot over the top tokens, one sigmoid unit."""

    max_tokens: int = knob(
        4000, "Vocabulary of the multi-hot encoding (most frequent tokens).", minimum=16, maximum=1_000_000
    )
    epochs: int = knob(5, "Passes over the labeled train split (SST-2 train by default).", minimum=1, maximum=1000)
    batch_size: int = knob(32, "Sentences per step.", minimum=1, maximum=65536)


@dataclass(frozen=True)
class _Optimizer(_Section):
    """The AdamW settings both training stages declare (``train.optim`` reads them)."""

    lr_schedule: str = knob(
        "constant",
        "constant (the guide) or warmup_cosine: linear warm-up over this section's warmup_ratio of all "
        "steps, then cosine decay to 0.",
        choices=LR_SCHEDULES,
    )
    warmup_ratio: float = knob(
        0.1, "Share of all steps spent warming up (warmup_cosine only).", minimum=0.0, maximum=0.9
    )
    weight_decay: float = knob(
        0.004,
        "AdamW weight decay; 0.004 is Keras's default (the guide's). Any other value also exempts biases and "
        "LayerNorm parameters, as BERT does.",
        minimum=0.0,
        maximum=1.0,
    )


@dataclass(frozen=True)
class PretrainConfig(_Optimizer):
    """Masked-LM pretraining."""

    batch_size: int = knob(
        128, "Sequences per step.", minimum=1, maximum=65536, title="Pretraining batch size", form=TRAIN
    )
    learning_rate: float = knob(
        5e-4, "AdamW.", minimum=0.0, exclusive_minimum=True, maximum=1.0, title="Pretraining learning rate", form=TRAIN
    )
    epochs: int = knob(
        8,
        "Passes over the shards; 0 = no pretraining (the encoder keeps its random initialisation: the "
        "ablation's reference for what pretraining adds).",
        minimum=0,
        maximum=1000,
        title="Pretraining epochs",
        form=TRAIN,
    )
    steps_per_epoch: int = knob(
        0,
        "Cap on steps per epoch; 0 = every shard record.",
        minimum=0,
        maximum=10_000_000,
        title="Pretraining steps per epoch",
        form=TRAIN,
    )
    validation_steps: int = knob(
        0, "Cap on validation batches; 0 = the whole validation split.", minimum=0, maximum=10_000_000
    )
    precision: str = knob(
        "auto",
        "Keras dtype policy; auto is mixed_bfloat16 on a GPU/TPU and float32 on a CPU "
        "(where bfloat16 matmuls are slower, not faster).",
        choices=PRECISIONS,
    )
    init_from: str = knob(
        "none",
        "Where pretraining starts: none (random, the guide), champion (the current champion's encoder: "
        "continual pretraining on new text), or the absolute path of an encoder.keras. Its vocabulary size, "
        "sequence length and layer shapes must match this config's; the model version records the parent.",
        title="Pretraining starts from",
        form=TRAIN,
    )
    dropout_off: bool = knob(
        False,
        "Pretrain without dropout (the Cramming recipe); fine-tuning rebuilds the encoder with model.dropout. "
        "False is the guide: model.dropout in both stages.",
    )
    steps_per_execution: int = knob(
        16,
        "Training steps per call into the compiled step (Keras steps_per_execution): fewer host round trips per "
        "step; progress lines, NaN checks and backups run between calls. Lowered to the largest divisor of the "
        "steps per epoch.",
        minimum=1,
        maximum=1024,
        trains=False,
    )
    log_every_seconds: float = knob(
        60.0,
        "At most one progress line (step, loss, sequences/s, ETA) per this many seconds within an epoch; the "
        "loss is read, and checked for NaN, only then. 0 = after every call into the compiled step.",
        minimum=0.0,
        maximum=86400.0,
        trains=False,
    )
    backup_every_steps: int = knob(
        5000,
        "Back up weights and optimizer state every this many steps (at the end of the call into the compiled "
        "step that reaches it) as well as at each epoch end, so a retry resumes mid-epoch; 0 = epoch ends only. "
        "A guide-model backup writes ~230 MB.",
        minimum=0,
        maximum=10_000_000,
        trains=False,
    )

    def rules(self) -> None:
        _check(
            self.init_from in ("none", "champion")
            or (self.init_from.startswith("/") and self.init_from.endswith(".keras")),
            "pretrain.init_from",
            f"must be none, champion or an absolute path to an encoder .keras file, got {self.init_from!r}",
        )


@dataclass(frozen=True)
class FinetuneConfig(_Optimizer):
    """Fine-tuning of the pretrained encoder on the labeled data (SST-2 by default)."""

    batch_size: int = knob(
        32, "Sentences per step.", minimum=1, maximum=65536, title="Fine-tuning batch size", form=TUNE
    )
    learning_rate: float = knob(
        5e-5, "AdamW.", minimum=0.0, exclusive_minimum=True, maximum=1.0, title="Fine-tuning learning rate", form=TUNE
    )
    epochs: int = knob(
        3, "Passes over the labeled train split.", minimum=1, maximum=1000, title="Fine-tuning epochs", form=TUNE
    )
    steps_per_epoch: int = knob(
        0,
        "0 = the whole labeled train split (SST-2 train by default).",
        minimum=0,
        maximum=10_000_000,
        title="Fine-tuning steps per epoch",
        form=TUNE,
    )
    pooling: str = knob(
        "auto",
        "How the classifier averages the encoder outputs: real_tokens ([PAD] excluded), all_tokens (the "
        "guide's GlobalAveragePooling1D, [PAD] included); auto = real_tokens with model.padding_mask, else "
        "all_tokens.",
        choices=POOLINGS,
    )
    init_from: str = knob(
        "none",
        "Where fine-tuning starts: none (a new classification head on this run's pretrained encoder, the "
        "guide) or champion (the current champion's whole classifier, fine-tuned encoder and head, continues "
        "on this run's labeled data; its label set, vocabulary and sequence length must equal this run's, and "
        "pretraining then does not run: nothing would read its encoder). The model version records the parent.",
        choices=("none", "champion"),
        title="Fine-tuning starts from",
        form=TUNE,
    )
    length_buckets: str = knob(
        "auto",
        "Batch sentences of similar length padded to 16/32/64/.../data.seq_length instead of always to "
        "data.seq_length (the guide). Only valid when outputs do not depend on padding (model.padding_mask "
        "and real-token pooling); auto = on exactly then.",
        choices=AUTO_ON_OFF,
    )
    ema_momentum: float = knob(
        0.0,
        "0 = off (the guide). Otherwise the classifier keeps an exponential moving average of its weights "
        "during fine-tuning (Keras use_ema), with this momentum, and ends on the average: it is what is "
        "evaluated, gated and saved.",
        minimum=0.0,
        maximum=0.9999,
    )


@dataclass(frozen=True)
class GateConfig(_Section):
    """Promotion thresholds, TFX Evaluator style."""

    min_accuracy: float = knob(
        0.80,
        "Dev accuracy (val_accuracy: the labeled data's dev split) the candidate must reach, as a fraction "
        "(0.8 is 80%).",
        minimum=0.0,
        maximum=1.0,
        title="Gate: accuracy floor",
        form=GATE,
    )
    min_gain_over_baseline: float = knob(
        0.0,
        "Dev accuracy the candidate must gain over this run's bag-of-words baseline, as a fraction (0.01 is one "
        "percentage point); negative tolerates a deficit.",
        minimum=-1.0,
        maximum=1.0,
        title="Gate: minimum gain over the BoW baseline",
        form=GATE,
    )
    max_regression: float = knob(
        0.0,
        "How far below the current champion (re-evaluated on this run's dev data) a "
        "candidate may fall and still be promoted, as a fraction of dev accuracy (0.01 is one percentage point).",
        minimum=0.0,
        maximum=1.0,
        title="Gate: maximum regression vs champion",
        form=GATE,
    )
    require_significant_gain: bool = knob(
        False,
        "Replace an existing champion only when the lower bound of the 95% paired bootstrap interval of "
        "candidate - champion accuracy (both scored on this run's dev data) is strictly above "
        "-gate.max_regression: with the default 0, a gain the dev set's sampling noise does not explain; "
        "identical predictions never pass. Passes when there is no champion yet.",
        title="Gate: require a significant gain vs champion",
        form=GATE,
    )
    bootstrap_resamples: int = knob(
        2000,
        "Resamples of the dev set behind the gate's 95% bootstrap intervals (seeded by data.seed).",
        minimum=200,
        maximum=100_000,
    )
    registered_model: str = knob("encoderflow-sst2", "MLflow registered model name.")

    def rules(self) -> None:
        _check(
            bool(self.registered_model.strip()) and "/" not in self.registered_model,
            "gate.registered_model",
            f"must be a non-empty name without '/', got {self.registered_model!r}",
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "inputs": InputsConfig,
    "model": ModelConfig,
    "baseline": BaselineConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "gate": GateConfig,
}

# What a run without a preset gets: the guide's hyperparameters (CLI, trigger form, Makefile's PRESET).
DEFAULT_PRESET = "guide"


def deployment_preset() -> str:
    """The trigger form's default preset, which scheduled and asset-triggered runs (no form) train with:
    ``ENCODERFLOW_PRESET`` on every Airflow component, else the guide's.

    Raises:
        ConfigError: it names no preset (the DAG's import error then says so).
    """
    value = os.environ.get("ENCODERFLOW_PRESET", "").strip() or DEFAULT_PRESET
    if value not in PRESETS:
        raise ConfigError(
            f"ENCODERFLOW_PRESET={value!r} is no preset",
            fix=f"set it to one of {', '.join(sorted(PRESETS))}, or unset it",
        )
    return value


CRON_PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
SCHEDULE_FIX = "give a cron expression ('0 3 * * *'), a preset (@daily), assets or assets|<cron>; docs/operations.md"


def checked_cron(value: str, variable: str, fix: str = SCHEDULE_FIX, whole: str | None = None) -> str:
    """``value`` if Airflow can schedule on it; else the import error names the variable and the fix, not
    croniter's "Exactly 5, 6 or 7 columns" (or, behind ``assets|``, nothing at all: it never fired).
    ``whole``: the variable's value when ``value`` is the cron after its ``assets|``."""
    from croniter import croniter

    presets = CRON_PRESETS if whole is None else [p for p in CRON_PRESETS if p not in ("@once", "@continuous")]
    if value in presets or (not value.startswith("@") and croniter.is_valid(value)):
        return value
    said = f"{variable}={value!r}" if whole is None else f"{variable}={whole!r}: {value!r}"
    raise ConfigError(f"{said} is not a schedule Airflow can run", fix=fix)


def training_schedule() -> tuple[str, str | None]:
    """``ENCODERFLOW_SCHEDULE`` as (kind, cron): ("off", None), ("cron", cron), ("assets", cron or None).
    Read by the DAG files (airflow_adapter.schedule_from_env) and the source watcher's task."""
    value = os.environ.get("ENCODERFLOW_SCHEDULE", "").strip()
    if value.lower() in ("", "none", "off", "manual"):
        return "off", None
    kind, bar, cron = value.partition("|")
    if kind.strip().lower() != "assets":
        return "cron", checked_cron(value, "ENCODERFLOW_SCHEDULE")
    if bar and not cron.strip():
        raise ConfigError(f"ENCODERFLOW_SCHEDULE={value!r}: no cron after '|'", fix=SCHEDULE_FIX)
    return "assets", checked_cron(cron.strip(), "ENCODERFLOW_SCHEDULE", whole=value) if cron.strip() else None


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one run. Build with :func:`from_overrides`."""

    preset: str = DEFAULT_PRESET
    data: DataConfig = field(default_factory=DataConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in SECTIONS:
            getattr(self, name).validate()
        _check(
            self.finetune.length_buckets != "on" or self.padding_free(),
            "finetune.length_buckets",
            "on needs outputs that do not depend on padding: model.padding_mask=true and finetune.pooling "
            f"real_tokens or auto (got model.padding_mask={self.model.padding_mask}, "
            f"finetune.pooling={self.finetune.pooling}); set finetune.length_buckets=auto or off",
        )

    def pooling(self) -> str:
        """``finetune.pooling`` resolved: ``real_tokens`` or ``all_tokens``."""
        if self.finetune.pooling != "auto":
            return self.finetune.pooling
        return "real_tokens" if self.model.padding_mask else "all_tokens"

    def padding_free(self) -> bool:
        """Whether the classifier's outputs are independent of how much [PAD] follows a sentence."""
        return self.model.padding_mask and self.pooling() == "real_tokens"

    def length_buckets(self) -> bool:
        """``finetune.length_buckets`` resolved."""
        return {"on": True, "off": False}.get(self.finetune.length_buckets, self.padding_free())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable sha256 over the named sections (all of them when none are named)."""
        names = names or tuple(SECTIONS)
        return sha256_json({n: dataclasses.asdict(getattr(self, n)) for n in names})

    def config_hash(self) -> str:
        return self.section_hash()

    def training_hash(self, init_from_sha256: str | None = None) -> str:
        """What a model is trained from: every section but ``gate`` and ``baseline`` (what decides its
        promotion, and what it must beat), less the settings declared ``trains=False`` (when the host
        looks).

        Args:
            init_from_sha256: the sha256 of the encoder a ``pretrain.init_from`` path names, hashed in
                the path's place: the bytes are what training starts from, not where they lie.
        """
        payload: dict[str, dict[str, Any]] = {}
        for k in knobs():
            if k.in_lineage:
                payload.setdefault(k.section, {})[k.name] = getattr(getattr(self, k.section), k.name)
        if init_from_sha256 is not None:
            payload["pretrain"]["init_from"] = f"sha256:{init_from_sha256}"
        return sha256_json(payload)

    def promotion_hash(self) -> str:
        """What a gate decision is a function of besides the models and the dev data: the
        :data:`PROMOTION_SECTIONS`. Recorded with each decision, so a candidate rejected under these
        settings and this champion is not gated again (:func:`encoderflow.steps.check_lineage`)."""
        return self.section_hash(*PROMOTION_SECTIONS)


# Sections that decide a model's promotion, not the model: out of Config.training_hash.
PROMOTION_SECTIONS = ("gate", "baseline")


# The guide's hyperparameters are the dataclass defaults. What the guide preset does differently
# (padding mask, masks fixed per epoch copy, shuffled training data, bfloat16 on a GPU) is listed,
# with the switch back, in the README's "Model quality".
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "guide": {},
    # Tiny model and sequences: the whole DAG on CPU in a few minutes, for tests and smoke runs.
    # Offline data has no WikiText train split, so smoke pretrains on `test`.
    # Its gate only asks for better than chance: a smoke model is a plumbing check, not a product.
    "smoke": {
        "data": {
            "seq_length": 32,
            "predictions_per_seq": 6,
            "num_shards": 2,
            "pretrain_split": "test",
            "dupe_factor": 2,
        },
        "model": {"num_layers": 1, "model_dim": 32, "intermediate_dim": 64, "num_heads": 2},
        "baseline": {"max_tokens": 1000, "epochs": 2, "batch_size": 64},
        "pretrain": {
            "batch_size": 32,
            "learning_rate": 1e-3,
            "epochs": 2,
            "steps_per_epoch": 50,
            "validation_steps": 10,
        },
        "finetune": {"batch_size": 32, "learning_rate": 1e-3, "epochs": 1, "steps_per_epoch": 300},
        "gate": {"min_accuracy": 0.5, "min_gain_over_baseline": -1.0, "max_regression": 0.0},
    },
    # The guide's model with a better recipe, for the same wall time on the offline quality benchmark
    # (README, "Model quality"): no text thrown away (packed windows, the SST-2 train sentences as
    # task-adaptive text), pre-norm blocks without dropout while pretraining and a warmed-up, decayed
    # rate (Cramming), BERT's weight decay, and a warmed-up, decayed fine-tuning rate.
    "recipe": {
        "data": {"sequence_mode": "packed", "task_adaptive": True, "dupe_factor": 2},
        "model": {"normalize_first": True},
        "pretrain": {
            "epochs": 2,
            "learning_rate": 1e-3,
            "lr_schedule": "warmup_cosine",
            "weight_decay": 0.01,
            "dropout_off": True,
        },
        # One epoch: the guide's three overfit this encoder (OQB dev 0.8096 after the first, 0.7844 after three).
        "finetune": {"epochs": 1, "learning_rate": 1e-4, "lr_schedule": "warmup_cosine", "weight_decay": 0.01},
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
                # As for JSON numbers below: "2.0" is the form's and a REST client's spelling of 2.
                number = float(text) if any(c in text for c in ".eE") else int(text)
                if isinstance(number, float) and not number.is_integer():
                    raise ValueError(text)
                return int(number)
            if typ is float:
                return float(text)
            return text
        except ValueError:
            raise ConfigError(f"config value {key!r}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # JSON has one number type: a REST client (Python's json.dumps of 32.0) may send a whole number as 32.0,
    # and the form's "integer" schema accepts it.
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is bool and isinstance(value, bool):
        return value
    if type(value) is not typ:
        raise ConfigError(f"config value {key!r}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _field_types(cls: type) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: hints[f.type] for f in fields(cls)}


@functools.cache
def section_knobs(cls: type) -> tuple[Knob, ...]:
    """The declared fields of one config section class."""
    section = next(name for name, c in SECTIONS.items() if c is cls)
    types = _field_types(cls)
    return tuple(
        Knob(key=f"{section}.{f.name}", type=types[f.name], default=f.default, **f.metadata) for f in fields(cls)
    )


def knobs() -> tuple[Knob, ...]:
    """Every declared field, section by section, in declaration order."""
    return tuple(k for cls in SECTIONS.values() for k in section_knobs(cls))


def param_name(k: Knob) -> str:
    """The DAG param a form field is filled in through."""
    return k.param or f"{k.section}_{k.name}"


def param_keys() -> dict[str, str]:
    """DAG param name -> config key, for every field on the trigger form."""
    return {param_name(k): k.key for k in knobs() if k.form is not None}


def param_names() -> list[str]:
    """Every DAG param, i.e. every key a trigger's conf may hold: the preset, the sources, the run
    options, the form fields and the free overrides."""
    return [
        "preset",
        *(f.name for f in fields(Sources)),
        *(f.name for f in fields(RunOptions)),
        *param_keys(),
        "overrides",
    ]


def check_conf_keys(conf: Mapping[str, Any]) -> None:
    """A trigger's conf holds params only: Airflow keeps any other key, which then changes nothing.

    Raises:
        ConfigError: naming each unknown key and the param it most resembles.
    """

    known = param_names()
    unknown = sorted(set(conf) - set(known))
    if unknown:
        guesses = "; ".join(
            f"{k!r}: did you mean {m[0]!r}?" if (m := difflib.get_close_matches(k, known, n=1)) else f"{k!r}"
            for k in unknown
        )
        raise ConfigError(
            f"unknown trigger params {guesses}",
            fix="use the form's params (docs/parameters.md, second column), or put any config key in "
            "overrides as section.key=value",
        )


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse ``["section.key=value", ...]`` into a dict; malformed items raise ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        out[key.strip()] = value  # the last wins: a wrapper adds its defaults first, a person's value after
    return out


def param_text(value: Any) -> str:
    """A value as ``--set`` takes it back, ``runs`` prints it and MLflow's params hold it: booleans as
    ``true``/``false``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def set_item(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` (and :func:`parse_set`) takes it back."""
    return f"{key}={param_text(value)}"


# An unknown key is a misspelt one: its value may be right.
KEY_FIX = "use a key `encoderflow config` prints (docs/parameters.md lists each, with its type and bounds)"


def from_overrides(preset: str = DEFAULT_PRESET, overrides: Mapping[str, Any] | None = None) -> Config:
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
            raise ConfigError(f"unknown config key {key!r}: sections are {sorted(SECTIONS)}", fix=KEY_FIX)
        types = _field_types(SECTIONS[section])
        if name not in types:
            near = difflib.get_close_matches(name, types, n=1)
            hint = f"did you mean '{section}.{near[0]}'? " if near else ""
            raise ConfigError(f"unknown config key {key!r}: {hint}{section} has {sorted(types)}", fix=KEY_FIX)
        values.setdefault(section, {})[name] = _coerce(key, types[name], value)
    sections = {name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(preset=preset, **sections)


def from_dict(payload: Mapping[str, Any]) -> Config:
    """Rebuild a Config recorded in an artifact (the inverse of :meth:`Config.to_dict`)."""
    try:
        # A section added later (inputs) is absent from older records: they were made with its defaults.
        sections = {
            name: cls(**payload.get(name, {}) if name == "inputs" else payload[name]) for name, cls in SECTIONS.items()
        }
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"recorded config is incomplete or has unknown keys: {exc}") from None
    return Config(preset=payload.get("preset", DEFAULT_PRESET), **sections)


def keys() -> list[str]:
    """Every overridable key, ``section.name``."""
    return [k.key for k in knobs()]


def from_params(params: Mapping[str, Any]) -> Config:
    """The run's Config from DAG params: preset, then the ``data_file``'s sections, then the form fields,
    then free-form ``overrides``."""
    return from_overrides(params.get("preset") or DEFAULT_PRESET, given_overrides(params))


def given_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a run sets over its preset (data file, form fields, overrides), later ones winning."""
    overrides: dict[str, Any] = dict(read_data_file(params.get("data_file"))[1])
    overrides.update({key: v for name, key in param_keys().items() if (v := params.get(name)) is not None})
    overrides.update(parse_set(list(params.get("overrides") or [])))
    return overrides


def resolve(params: Mapping[str, Any]) -> tuple[Config, dict[str, Any], Sources]:
    """What a run is, checked before it starts: its Config, the keys it sets over its preset, its sources.

    Labeled data of your own needs a registered model of its own, named by the run: under the
    default name its first model would become the SST-2 model's champion (or, with one already
    there, train in full only for the gate to refuse another label set). Naming
    ``encoderflow-sst2`` explicitly is allowed: that is a choice, not an oversight.

    Raises:
        ConfigError: what :func:`from_params` refuses, or ``labeled`` given and
            ``gate.registered_model`` not.
    """
    given = given_overrides(params)
    cfg = from_overrides(params.get("preset") or DEFAULT_PRESET, given)
    sources = Sources.from_params(params)
    if (labeled := sources.labeled) and "gate.registered_model" not in given:
        raise ConfigError(
            f"gate.registered_model: labeled data of your own ({labeled}) would be registered as "
            f"{GateConfig().registered_model!r}, the guide's SST-2 classifier",
            fix="name this task's model: --set gate.registered_model=<name> (data file: gate: {registered_model: "
            "<name>}; trigger form: Other overrides)",
        )
    return cfg, given, sources


def read_data_file(path: str | None) -> tuple[dict[str, str], dict[str, Any]]:
    """A data declaration kept in git (YAML or JSON): ``(sources, overrides)``.

    Top-level keys are run sources (``corpus``, ``labeled``, ...; a relative path is taken from the
    file's folder) or config sections holding their keys (``inputs: {text_column: body}``)::

        corpus: corpus/            # a folder of UTF-8 text files
        labeled: tickets/          # train.jsonl and dev.jsonl
        inputs: {text_column: body, label_column: category, vocab: trained}

    Raises:
        ConfigError: unreadable file, unknown key or a section that is not a mapping; names the file.
    """
    if not path:
        return {}, {}
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"data file {file}: {'a folder' if file.is_dir() else 'no such file'}",
            fix="give --data-file (or DATA_FILE) the path of your data.yaml",
        )
    try:
        payload = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # Where, not what: YAML's message quotes the line, and this one reaches failure.json and the runs
        # page, which every viewer reads, whatever file the path named.
        mark = getattr(exc, "problem_mark", None)
        said = (
            f"{getattr(exc, 'problem', None) or 'not YAML'} at line {mark.line + 1}, column {mark.column + 1}"
            if mark is not None
            else type(exc).__name__ + (f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else "")
        )
        raise ConfigError(f"data file {file}: cannot read it as YAML or JSON ({said})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"data file {file}: expected a mapping of sources and config sections at the top")
    if not payload:  # empty, or comments only: the run would quietly train on the guide's datasets
        raise ConfigError(
            f"data file {file}: declares nothing",
            fix="declare your corpus and/or labeled data in it (README, Your own data), or leave the data file "
            "out to train on the guide's datasets",
        )
    source_names = {f.name for f in fields(Sources)} - {"data_file"}
    sources: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for key, value in payload.items():
        if key in source_names:
            if value is None or isinstance(value, (dict, list)):  # ``corpus:`` with nothing after it
                raise ConfigError(
                    f"data file {file}: {key!r} needs a folder, file or URL, got {value!r}; write e.g. "
                    f"'{key}: my_{key}/' (relative to the file's folder), or remove the line"
                )
            text = str(value)
            if (
                key in ("corpus", "labeled", "data_dir", "sources_file")
                and "://" not in text
                and not text.startswith("/")
            ):
                text = str((file.parent / text).resolve())
            sources[key] = text
        elif key in SECTIONS and isinstance(value, dict):
            section = {f.name for f in fields(SECTIONS[key])}
            unknown = sorted(set(value) - section)
            if unknown:
                raise ConfigError(
                    f"data file {file}: section {key!r} has no keys {unknown}; its keys are {sorted(section)}"
                )
            overrides.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            raise ConfigError(
                f"data file {file}: unknown top-level key {key!r}; use sources {sorted(source_names)} "
                f"or a config section {sorted(SECTIONS)} holding its keys"
            )
    return sources, overrides


@dataclass(frozen=True)
class Sources:
    """Where a run's data comes from: not part of the config hash, since the bytes are pinned.

    Each field is a trigger-form field of the same name; its metadata is the form's declaration.
    """

    data_dir: str | None = field(
        default=None,
        metadata={
            "title": "Offline data folder",
            "pattern": r"^/",
            "minLength": 1,
            "description": "Absolute path, readable by every worker, laid out as the archives extract (SST-2/, "
            "wikitext-103-raw/, bert_vocab_uncased.txt). Empty: download.",
        },
    )
    mirror: str | None = field(
        default=None,
        metadata={
            "title": "Mirror URL",
            "pattern": r"^(https?|file)://",
            "description": "Base URL tried before the official addresses for every file (same file names; the pinned "
            "sha256 still applies). Empty: official addresses only.",
        },
    )
    sources_file: str | None = field(
        default=None,
        metadata={
            "title": "Sources file",
            "pattern": r"^/",
            "description": "Absolute path of a JSON file replacing dataset specs (URLs, sha256) for re-packed copies. "
            "Empty: the pinned official archives.",
        },
    )
    corpus: str | None = field(
        default=None,
        metadata={
            "title": "Pretraining corpus",
            "section": OWN,
            "pattern": r"^(/|file://|https?://)",
            "description": "Your own pretraining text instead of WikiText-103: an absolute path or file:// URL of a "
            "folder of UTF-8 text files, or an http(s):// folder holding a manifest.json that lists them. "
            "Documents: inputs.documents. Empty: WikiText-103.",
        },
    )
    labeled: str | None = field(
        default=None,
        metadata={
            "title": "Labeled data",
            "section": OWN,
            "pattern": r"^(/|file://|https?://)",
            "description": "Your own labeled data instead of SST-2: a folder (path, file:// or http(s):// with a "
            "manifest.json) holding train.<ext> and dev.<ext>, ext tsv, csv or jsonl; any number of classes. "
            "Columns: inputs.text_column, inputs.label_column. Empty: GLUE SST-2.",
        },
    )
    data_file: str | None = field(
        default=None,
        metadata={
            "title": "Data file",
            "section": OWN,
            "pattern": r"^/",
            "description": "Absolute path of a YAML or JSON file declaring the sources and input settings "
            "(README, Your own data); fields set here win over it. Default: $ENCODERFLOW_DATA_FILE when the DAG "
            "was parsed.",
        },
    )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Sources:
        """Each field from its param, else from the ``data_file``'s sources."""
        given = {f.name: (str(v) if (v := params.get(f.name)) not in (None, "") else None) for f in fields(cls)}
        declared = read_data_file(given["data_file"])[0]
        return cls(**{name: value or declared.get(name) for name, value in given.items()})

    def custom(self) -> dict[str, str]:
        """The roles given your own data: ``{"corpus": location, ...}``."""
        return {role: v for role in ("corpus", "labeled") if (v := getattr(self, role))}


@dataclass(frozen=True)
class RunOptions:
    """How a run treats what it finds, not what it trains: outside the config hash and the lineage.

    Each field is a trigger-form field of the same name (and a CLI flag); its metadata is the declaration.
    """

    force: bool = field(
        default=False,
        metadata={
            "title": "Train even if nothing changed",
            "description": "A run whose data, config and code equal the champion's skips training (it would "
            "rebuild the same model): check_lineage short-circuits everything after it, and pretrain and finetune "
            "copy what another run trained from the same inputs, config and code. On: train anyway.",
        },
    )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunOptions:
        return cls(**{f.name: bool(params.get(f.name) or False) for f in fields(cls)})


def _preset_value(k: Knob, preset: str) -> Any:
    return PRESETS[preset].get(k.section, {}).get(k.name, k.default)


def preset_hint(k: Knob) -> str:
    """``guide X / smoke Y / recipe Z``: what an empty form field means under each preset."""
    return " / ".join(f"{p} {_fmt(_preset_value(k, p))}" for p in PRESETS)


def parameters_markdown() -> str:
    """``docs/parameters.md``: every config key with its bounds, presets and description."""
    lines = [
        "# Parameters",
        "",
        "Generated from the declarations in `src/encoderflow/config.py` by `make docs`; do not edit by hand",
        "(a test fails when this file is stale). A form field is filled in through the DAG param named in",
        "the second column; every key can be set with `--set key=value` (CLI) or the form's *Other",
        "overrides*. An empty form field keeps the preset's value.",
        "",
        "| key | trigger form | type | allowed | " + " | ".join(PRESETS) + " | description |",
        "|---|---|---|---|" + "---|" * len(PRESETS) + "---|",
    ]
    for k in knobs():
        form = f"`{param_name(k)}` ({k.form or 'main'})" if k.form is not None else ""
        values = " | ".join(f"`{param_text(_preset_value(k, p))}`" for p in PRESETS)
        # A bare "|" between choices would start a new table cell.
        allowed = k.bounds().replace("|", "\\|")
        lineage = "" if k.in_lineage else " (Not in the model's lineage: changed alone, a run trains nothing.)"
        lines.append(f"| `{k.key}` | {form} | {k.type.__name__} | {allowed} | {values} | {k.description}{lineage} |")
    return "\n".join(lines) + "\n"
