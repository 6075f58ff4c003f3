"""One declaration per parameter: a field added to the config reaches the form, the key map,
the CLI and the docs with no other edit; the committed docs table is never stale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from encoderflow import airflow_adapter, config

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PretrainWithClipNorm(config.PretrainConfig):
    clip_norm: float = config.knob(
        0.004, "Gradient clipping norm.", minimum=0.0, maximum=0.5, title="Pretraining clip norm", form=config.TRAIN
    )


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setitem(config.SECTIONS, "pretrain", PretrainWithClipNorm)


def test_a_new_field_reaches_every_generated_place(extended):
    # Trigger form, with its bounds, title, section and the presets' values.
    param = airflow_adapter.params()["pretrain_clip_norm"]
    assert param.schema["minimum"] == 0.0 and param.schema["maximum"] == 0.5
    assert param.schema["title"] == "Pretraining clip norm" and param.schema["section"] == config.TRAIN
    assert param.schema["type"] == ["null", "number"]
    assert "guide 0.004 / smoke 0.004" in param.description
    # The DAG-param -> key map, and the config built from a triggered run's params.
    assert config.param_keys()["pretrain_clip_norm"] == "pretrain.clip_norm"
    assert config.from_params({"preset": "smoke", "pretrain_clip_norm": 0.01}).pretrain.clip_norm == 0.01
    # Validation from the same bounds.
    with pytest.raises(config.ConfigError, match="'pretrain.clip_norm': must be <= 0.5"):
        config.from_params({"preset": "smoke", "pretrain_clip_norm": 0.9})
    # The CLI's --set and the docs table.
    assert config.from_overrides("guide", config.parse_set(["pretrain.clip_norm=0.1"])).pretrain.clip_norm == 0.1
    assert "pretrain.clip_norm" in config.keys()
    row = next(line for line in config.parameters_markdown().splitlines() if "`pretrain.clip_norm`" in line)
    assert "`pretrain_clip_norm` (Pretraining)" in row and "[0, 0.5]" in row and "Gradient clipping norm." in row


def test_the_docs_table_is_generated_and_current():
    committed = (REPO / "docs" / "parameters.md").read_text()
    assert committed == config.parameters_markdown(), "docs/parameters.md is stale: run `make docs`"


def test_every_declared_field_documents_itself():
    for k in config.knobs():
        assert k.description.strip(), k.key
        assert (k.title is None) == (k.form is None), f"{k.key}: a form field needs a title, and only it"
        assert k.type in (int, float, bool, str), k.key
        if k.type in (int, float):
            assert k.minimum is not None and k.maximum is not None, f"{k.key}: numbers are bounded"
