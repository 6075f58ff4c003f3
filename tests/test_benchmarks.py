"""benchmarks/: train.py --synthetic runs where TensorFlow cannot be imported and its numbers add up; every
script refuses a bad argument in one line before any work; a comparison with the guide says when it is none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthetic  # noqa: E402

from encoderflow.config import from_overrides  # noqa: E402


def no_tensorflow_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python finds a ``tensorflow`` package that refuses to import."""
    fake = tmp_path / "no_tf"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text('raise ImportError("TensorFlow is blocked in this test")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ENCODERFLOW_BENCH_ALLOW_TF"] = "1"  # the benchmark's own guard off: the fake package must do it
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_synthetic_benchmark_and_loss_run_without_tensorflow(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "train.py"),
            "--synthetic",
            "--preset",
            "smoke",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--pool",
            "2",
            "--loss-run",
            "20",
            "--in-process",
            "--out",
            str(out),
        ],
        env=no_tensorflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spe = from_overrides("smoke").pretrain.steps_per_execution
    header = "| " + " | ".join(synthetic.columns(spe)) + " |"
    assert header in proc.stdout and f"first call s (compile + {spe} steps)" in header
    # --steps 2 ran as one whole call of steps_per_execution, and the header says so, and why.
    assert f"timed: 1 x {spe} steps each" in proc.stdout and f"steps_per_execution={spe}" in proc.stdout
    for name in ("fit ms/step", "bare ms/step", "fit/bare", "seq/s", "GFLOP/seq", "util", "peak mem"):
        assert name in proc.stdout
    assert "loss run (mixed_bfloat16" in proc.stdout and "PASS" in proc.stdout
    assert "TensorFlow WAS imported" not in proc.stdout
    assert (out / "synthetic.md").read_text() in proc.stdout
    result = json.loads((out / "synthetic.json").read_text())
    (cell,) = result["cells"]
    assert "error" not in cell, cell
    assert cell["precision"] == "float32" and cell["batch"] == 8  # auto on a CPU
    assert cell["fit_ms"] > 0 and cell["bare_ms"] > 0 and cell["fit_over_bare"] > 0
    assert cell["flops_per_seq"] == synthetic.train_flops_per_sequence(from_overrides("smoke"), 30522)
    loss = result["loss_run"]
    # The fewest steps allowed still record a first and a last loss, at the batch asked for.
    assert loss["passed"] and loss["finite"] and loss["steps"] == 20 and len(loss["every_10_steps"]) == 2
    assert loss["last"] < loss["first"] and loss["batch"] == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logsumexp_loss_has_the_keras_loss_value_and_gradient(dtype):
    """--mlm-loss logsumexp (the lever gpu.sh times) is the pipeline's loss, written another way:
    same weighted value and same gradient, padded positions (weight 0) included."""
    import jax
    import jax.numpy as jnp
    import keras

    rng = np.random.default_rng(0)
    logits = jnp.asarray(4 * rng.normal(size=(3, 5, 97)), dtype=dtype)
    labels = jnp.asarray(rng.integers(0, 97, size=(3, 5)), dtype="int32")
    weights = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype="float32")
    ours = synthetic.mlm_loss("logsumexp")
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    value = {}
    grad = {}
    for name, loss in (("ours", ours), ("theirs", theirs)):
        value[name], grad[name] = jax.value_and_grad(lambda z, f=loss: f(labels, z, sample_weight=weights))(logits)
    tol = 1e-6 if dtype == "float32" else 1e-3
    assert float(value["ours"]) == pytest.approx(float(value["theirs"]), rel=tol)
    diff = jnp.abs(grad["ours"].astype("float32") - grad["theirs"].astype("float32"))
    assert float(jnp.max(diff)) <= tol * float(jnp.max(jnp.abs(grad["theirs"].astype("float32"))))
    assert float(jnp.max(jnp.abs(grad["ours"][weights == 0].astype("float32")))) == 0.0
    assert synthetic.mlm_loss("keras") is None
    with pytest.raises(ValueError, match="--mlm-loss 'optax'"):
        synthetic.mlm_loss("optax")


def test_every_lever_loss_compiles_into_the_real_model():
    """Each --mlm-loss through compile_mlm on the smoke model, same seed: the same loss on one batch
    (chunked and fused build their own head; its weights are drawn in the pipeline's order)."""
    import head_loss

    assert set(synthetic.HEAD_LOSSES) == set(head_loss.KERNELS)  # synthetic.py names them without importing JAX
    cfg = from_overrides("smoke")
    (batch,) = synthetic.make_batches(cfg, 30522, 4, 1, seed=0)
    losses = {}
    for name in synthetic.MLM_LOSSES:
        mlm, _ = synthetic.build(cfg, 30522, "float32", total_steps=10, loss=name)
        assert (name == "keras") == (type(mlm.loss).__name__ == "SparseCategoricalCrossentropy")
        losses[name] = float(mlm.test_on_batch(*batch, return_dict=True)["loss"])
    assert losses["keras"] > 1.0  # an untrained model over 30,522 words
    for name in synthetic.MLM_LOSSES[1:]:
        assert losses[name] == pytest.approx(losses["keras"], rel=1e-5), name
    with pytest.raises(ValueError, match="needs the model"):
        synthetic.mlm_loss("fused")


@pytest.mark.parametrize("kernel", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_loss_has_the_value_and_gradients_of_the_full_logits(kernel, dtype, monkeypatch):
    """The chunked (uneven chunks) and fused (padded rows and words; Pallas's interpreter here)
    losses: the weighted loss and the gradients for the features, the embedding and the bias equal
    those of the whole logits through Keras's loss."""
    import head_loss
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    n, dim, vocab = 37, 16, 97
    h = jnp.asarray(rng.normal(size=(n, dim)), dtype=dtype)
    w = jnp.asarray(0.5 * rng.normal(size=(vocab, dim)), dtype=dtype)
    b = jnp.asarray(0.1 * rng.normal(size=(vocab,)), dtype="float32")
    y = jnp.asarray(rng.integers(0, vocab, size=n), dtype="int32")
    weights = jnp.asarray(rng.integers(0, 2, size=n), dtype="float32")
    assert 0 < float(weights.sum()) < n
    if kernel == "chunked":
        monkeypatch.setattr(head_loss, "CHUNK_ROWS", 8)

    diffs = head_loss.agreement(kernel, h, w, b, y, weights)
    tol = 1e-5 if dtype == "float32" else 2e-2  # fused keeps the logits float32, the pipeline rounds them
    assert set(diffs) == {"loss", "features", "embedding", "bias"}
    assert max(diffs.values()) <= tol, diffs
    zero_rows = jax.grad(lambda h: jnp.sum(weights * head_loss.KERNELS[kernel](h, w, b, y)))(h)[weights == 0]
    assert float(jnp.max(jnp.abs(zero_rows.astype("float32")))) == 0.0
    # The measure itself: a loss a hair off shows up in it.
    off = dict(head_loss.KERNELS)
    monkeypatch.setitem(head_loss.KERNELS, kernel, lambda *a: 1.001 * off[kernel](*a))
    assert head_loss.agreement(kernel, h, w, b, y, weights)["loss"] == pytest.approx(1e-3, rel=0.05)


def test_fused_blocks_from_the_environment_and_other_blocks_agree(monkeypatch):
    """ENCODERFLOW_FUSED_BLOCKS overrides the fused kernels' blocks for another try on a GPU; bad
    text is refused naming the knob; other blocks (more slices, smaller steps) give the same loss."""
    import head_loss
    import jax.numpy as jnp

    assert head_loss.FusedBlocks.from_env("") == head_loss.FusedBlocks()
    small = head_loss.FusedBlocks.from_env("rows=16 vocab=32 grad_vocab=16 split=2 stages=1")
    assert (small.rows, small.vocab, small.grad_vocab, small.split, small.warps, small.stages) == (16, 32, 16, 2, 8, 1)
    for bad in ("rows=48", "lanes=2", "rows", "vocab=x"):
        with pytest.raises(ValueError, match="power of two|ENCODERFLOW_FUSED_BLOCKS"):
            head_loss.FusedBlocks.from_env(bad)
    rng = np.random.default_rng(2)
    n, dim, vocab = 40, 16, 150
    h = jnp.asarray(rng.normal(size=(n, dim)), dtype="float32")
    w = jnp.asarray(0.5 * rng.normal(size=(vocab, dim)), dtype="float32")
    b = jnp.asarray(0.1 * rng.normal(size=(vocab,)), dtype="float32")
    y = jnp.asarray(rng.integers(0, vocab, size=n), dtype="int32")
    weights = jnp.ones((n,), "float32")
    monkeypatch.setattr(head_loss, "FUSED", small)
    assert max(head_loss.agreement("fused", h, w, b, y, weights).values()) <= 1e-5


def test_a_head_loss_off_the_whole_logits_fails_its_cell():
    """The agreement line under a lever's table: PASS within AGREEMENT_TOLERANCE, else FAIL."""
    cell = {"precision": "mixed_bfloat16", "batch": 128}
    near = {"loss": 1e-5, "features": 5e-3, "embedding": 1e-2, "bias": 1e-3}
    far = {**near, "embedding": 0.9}
    assert synthetic.agrees(cell) and synthetic.agrees({**cell, "agreement": near})
    assert not synthetic.agrees({**cell, "agreement": far})
    cells = [{**cell, "agreement": a, "error": "-", "batch_size": 128} for a in (near, far)]
    lines = [line for line in synthetic.markdown("h", cells, None).splitlines() if "whole logits" in line]
    assert len(lines) == 2 and lines[0].endswith("-> PASS (all <= 0.05).")
    assert "embedding 9.0e-01" in lines[1] and lines[1].endswith("-> FAIL (all <= 0.05).")


def test_fused_kernels_lower_to_triton_for_a_gpu(monkeypatch):
    """The guide's shapes (4,096 rows, dim 256, 30,522 words), lowered here for CUDA as an H100
    would get them (jax 0.10 here, 0.11 on the lent device): forward and both gradient kernels
    become Triton calls (Pallas's Triton lowering has run; make gpu-aot compiles them for an H100),
    and a dim Triton cannot tile is refused."""
    import re

    import head_loss
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(head_loss, "_interpret", lambda: False)
    n, dim, vocab = 4096, 256, 30522
    args = [
        jax.ShapeDtypeStruct((n, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((vocab,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    ]

    def step(h, w, b, y):
        return jax.value_and_grad(lambda *a: jnp.sum(head_loss.fused_cross_entropy(*a, y)), argnums=(0, 1, 2))(h, w, b)

    triton = "__gpu$xla.gpu.triton"
    # From jax 0.11 (the lent H100's) Pallas asks the device for its compute capability while
    # lowering; an abstract H100 answers here as the real one will there (9.0).
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        exported = jax.export.export(
            jax.jit(step), platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
        )(*args)
    text = exported.mlir_module()
    assert text.count(f"@{triton}(") == 3
    assert re.findall(r'name = "(mlm_cross_entropy_\w+)"', text) == [
        "mlm_cross_entropy_forward",
        "mlm_cross_entropy_features_grad",
        "mlm_cross_entropy_embedding_grad",
    ]
    with pytest.raises(ValueError, match="power of two"):
        head_loss.fused_cross_entropy(jnp.zeros((4, 24)), jnp.zeros((9, 24)), jnp.zeros(9), jnp.zeros(4, "int32"))


@pytest.mark.parametrize("kernel", ["chunked", "fused"])
def test_head_loss_trains_the_real_model_as_the_pipeline_does(kernel, monkeypatch):
    """Two fit steps of the smoke model (24 masked positions; chunked in chunks of 5): the same
    losses and the same weights after them (the tied embedding and the output bias included) as
    the pipeline's head and loss; the head's config round-trips."""
    import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 5)
    cfg = from_overrides("smoke")
    (batch,) = synthetic.make_batches(cfg, 30522, 4, 1, seed=0)
    pipeline, _ = synthetic.build(cfg, 30522, "float32", total_steps=10)
    mine, _ = synthetic.build(cfg, 30522, "float32", total_steps=10, loss=kernel)
    assert mine.loss.kernel == kernel
    mine.set_weights(pipeline.get_weights())
    before = mine.get_weights()
    for _ in range(2):
        want = pipeline.train_on_batch(*batch, return_dict=True)["loss"]
        got = mine.train_on_batch(*batch, return_dict=True)["loss"]
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    names = [w.path for w in mine.weights]
    for name, old, new, ref in zip(names, before, mine.get_weights(), pipeline.get_weights()):
        assert np.abs(new - old).max() > 0, f"{name} did not train"
        assert np.abs(new - ref).max() <= 1e-5 + 1e-3 * np.abs(ref - old).max(), name
    head = mine.get_layer("mlm_head")
    assert type(head).from_config(head.get_config()).get_config() == head.get_config()


def test_flops_formula_for_the_guide_model():
    cfg = from_overrides("guide")
    d, f, s, layers, p, v = 256, 512, 128, 3, 32, 30522
    forward = layers * (2 * (4 * d * d + 2 * d * f) * s + 4 * s * s * d) + 2 * (d * d + d * v) * p
    assert synthetic.train_flops_per_sequence(cfg, v) == 3 * forward
    assert round(3 * forward / 1e9, 2) == 2.87


def test_peaks_by_device_kind():
    assert synthetic.peak_flops("NVIDIA H100 80GB HBM3", "gpu", "mixed_bfloat16") == 989e12
    assert synthetic.peak_flops("NVIDIA H100 80GB HBM3", "gpu", "float32") == 494e12  # TF32
    assert synthetic.peak_flops("NVIDIA H200", "gpu", "mixed_bfloat16") == 989e12
    assert synthetic.peak_flops("NVIDIA H100 PCIe", "gpu", "mixed_bfloat16") == 756e12
    assert synthetic.peak_flops("cpu", "cpu", "float32") is None
    assert synthetic.peak_flops("Some Future GPU", "gpu", "float32") is None


@pytest.mark.parametrize("preset", ["smoke", "guide"])
def test_synthetic_batches_match_the_shards(preset):
    cfg = from_overrides(preset)
    seq, p = cfg.data.seq_length, cfg.data.predictions_per_seq
    batches = synthetic.make_batches(cfg, 30522, 64, 2, seed=0)
    assert len(batches) == 2
    features, labels, weights = batches[0]
    assert set(features) == {"token_ids", "mask_positions"}
    tokens, positions = features["token_ids"], features["mask_positions"]
    assert tokens.shape == (64, seq) and tokens.dtype == np.int32
    assert positions.shape == labels.shape == weights.shape == (64, p)
    assert positions.dtype == labels.dtype == np.int32 and weights.dtype == np.float32
    assert tokens.min() >= 0 and tokens.max() < 30522
    real = weights > 0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert 0.5 < real.mean() < 1.0  # most slots predict, some are padding
    assert (positions[~real] == 0).all() and (labels[~real] == 0).all()
    for row in range(64):
        kept = positions[row][real[row]]
        assert (np.diff(kept) > 0).all() and kept.max() < seq  # distinct, ascending, in the sequence
        assert (tokens[row][kept] != 0).all()  # never a [PAD] position
    # labels are words, never special or [unused] ids; most masked inputs are [MASK]
    assert labels[real].min() >= 999
    assert (tokens[real.nonzero()[0], positions[real]] == 103).mean() > 0.6
    assert not np.array_equal(batches[0][0]["token_ids"], batches[1][0]["token_ids"])


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], check=True)


def test_quality_ablation_rows_and_table(tmp_path):
    """benchmarks/quality.py: every ablation row is a valid override set, unknown rows are refused
    before anything runs, and --table prints a results file (no training here)."""
    import quality

    for name, (label, extra) in quality.ABLATIONS.items():
        cfg = from_overrides("guide", dict(item.split("=", 1) for item in extra))
        assert label and cfg is not None, name
    assert from_overrides("guide", {"finetune.length_buckets": "off"}).length_buckets() is False
    # The recipe's rows each turn one of its own changes back to the guide's value.
    for name in ("pre_norm", "dropout_off", "schedule", "packing", "weight_decay"):
        back = dict(item.split("=", 1) for item in quality.ABLATIONS[name][1])
        recipe, reverted, guide = from_overrides("recipe"), from_overrides("recipe", back), from_overrides("guide")
        for key in back:
            section, field = key.split(".")
            value = [getattr(getattr(c, section), field) for c in (recipe, reverted, guide)]
            assert value[1] == value[2] != value[0], (name, key, value)
    # Fine-tuning epochs: the OQB's one for the guide, a preset's own otherwise, the flag over both.
    import argparse

    flag = {n: argparse.Namespace(finetune_epochs=n) for n in (None, 2)}
    assert quality.finetune_epochs(flag[None], "guide") == 1 and from_overrides("guide").finetune.epochs == 3
    assert quality.finetune_epochs(flag[None], "smoke") == from_overrides("smoke").finetune.epochs
    assert quality.finetune_epochs(flag[2], "guide") == quality.finetune_epochs(flag[2], "recipe") == 2
    # The header says what the encoderflow side ran: a --set epochs wins over preset and flag.
    caps = {"pretrain_steps": 0, "finetune_steps": 0, "pretrain_epochs": None}
    run = argparse.Namespace(preset="recipe", finetune_epochs=None, set=["pretrain.epochs=4"], **caps)
    assert quality.ours_epochs(run) == (4, 1)
    run = argparse.Namespace(preset="guide", finetune_epochs=2, set=[], **caps)
    assert quality.ours_epochs(run) == (8, 2)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--data-dir", str(tmp_path), "--ablation", "full,nope"],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 2 and "unknown ablation row(s) ['nope']" in proc.stderr
    assert not list(tmp_path.glob("encoderflow-quality-*"))  # refused before its work folder exists
    rows = [
        {"row": "encoderflow (guide preset)", "name": "full", "extra": [], "sst2": 0.8085, "mlm": 0.0857,
         "baseline": 0.8005, "pretrain_s": 840.0, "finetune_s": 162.0, "wall_s": 1068.0},
        {"row": "- length buckets (pad to 128)", "name": "buckets", "extra": ["finetune.length_buckets=off"],
         "sst2": 0.8050, "mlm": 0.0857, "baseline": 0.8005, "pretrain_s": 840.0, "finetune_s": 900.0, "wall_s": 1800.0},
    ]  # fmt: skip
    results = tmp_path / "oqb.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--table", str(results)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[1].startswith("encoderflow (guide preset)") and "0.8085" in out[1] and out[1].endswith("-")
    assert "0.8050" in out[2] and out[2].endswith("finetune.length_buckets=off") and "15.0m" in out[2]


def test_quality_guide_series_reuses_finished_runs_and_reports_mean_and_std(tmp_path):
    """--only guide --seeds N: runs already in --results for the same epochs and caps count towards N
    (a stopped series resumes); a run with other epochs does not. The data folder is empty, so
    starting the guide's code would fail: success means nothing ran."""
    key = {"pretrain_epochs": 8, "finetune_epochs": 1, "pretrain_steps": 0, "finetune_steps": 0}
    rows = [
        {"row": f"guide (seed_guide.py), run {i + 1}", "name": "guide", **key, "sst2": acc, "mlm": 0.07,
         "baseline": 0.80, "pretrain_s": 780.0, "finetune_s": 860.0, "wall_s": 1650.0}
        for i, acc in enumerate([0.77, 0.79])
    ] + [{"row": "guide (seed_guide.py), run 1", "name": "guide", **key, "pretrain_epochs": 1, "sst2": 0.5,
          "mlm": 0.06, "baseline": 0.80, "pretrain_s": 80.0, "finetune_s": 12.0, "wall_s": 130.0}]  # fmt: skip
    results = tmp_path / "oqb.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(BENCH / "quality.py"), "--data-dir", str(tmp_path / "empty"), "--only", "guide"]
    out = subprocess.run(
        [*cmd, "--seeds", "2", "--results", str(results)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    ).stdout
    assert "reusing 2 run(s)" in out
    assert "over 2 runs: SST-2 dev 0.7800 ± 0.0141   BoW 0.8000   wall 27.5 min" in out
    assert "0.5000" not in out  # the one-epoch run is another series
    assert len(results.read_text().splitlines()) == 3  # nothing appended
    # An ablation reuses its own rows from the same file; the guide's rows (no overrides) are not its.
    import quality

    full = {**rows[0], "row": "encoderflow (guide preset)", "name": "full", "extra": [], "commit": quality.commit(),
            "preset": "guide", "sst2": 0.81}  # fmt: skip
    # Nor is a fine-tuning-only row with the same overrides (benchmarks/finetune.py on an encoder).
    tuned = {**full, "row": "an encoder, fine-tuned again", "sst2": 0.55, "encoder_of": "the full row"}
    with results.open("a") as f:
        f.write(json.dumps(full) + "\n" + json.dumps(tuned) + "\n")
    cmd[-2:] = ["--ablation", "full", "--results", str(results)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert "reusing the result" in out.stdout and "0.8100" in out.stdout
    assert "0.7700" not in out.stdout and "0.5500" not in out.stdout
    # --seeds alone would be one run called a series: refused, naming what it needs
    cmd[-4:] = ["--seeds", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 2 and "add one of them" in out.stderr and "logs in" not in out.stdout


def test_finetune_benchmark_scores_a_saved_encoder(tmp_path):
    """benchmarks/finetune.py on the fixture tree: the seeded random encoder, two steps, one JSON line."""
    from tests.fixtures_pipeline import write_tree

    tree = write_tree(tmp_path / "data")
    env = {**os.environ, "PRESET": "smoke", "DATA_DIR": str(tree), "ENCODERFLOW_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "finetune.py"), "random", str(tmp_path / "out"), "finetune.steps_per_epoch=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["preset"] == "smoke" and row["sets"] == ["finetune.steps_per_epoch=2"] and 0.0 <= row["sst2"] <= 1.0
    assert (tmp_path / "out" / "bundle" / "bundle.json").exists()


def test_gpu_aot_counts_each_launch_and_its_bytes_in_compiled_hlo():
    """benchmarks/gpu_aot.py reads an executable's HLO: a while body's kernels count once per trip
    and move their operands and output each time; bookkeeping (tuples, parameters) launches nothing."""
    import gpu_aot
    import jax
    import jax.numpy as jnp

    def f(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ b) + i, a).sum()

    text = jax.jit(f).lower(jnp.zeros((64, 32)), jnp.zeros((32, 32))).compile().as_text()
    launched = gpu_aot.kernels(text)
    (dot,) = [k for k in launched if k["op_name"].endswith("dot_general")]
    assert dot["times"] == 5
    assert dot["bytes"] == 5 * 4 * (64 * 32 + 32 * 32 + 64 * 32)  # x and b in, x @ b out, per trip
    assert {k["opcode"] for k in launched}.isdisjoint(gpu_aot.NOT_KERNELS)
    assert not any(k["triton"] for k in launched)


def test_gpu_aot_reads_gpu_hlo_triton_calls_and_parts_of_the_step():
    """The GPU form: a Triton custom call with a tuple output and ``/*index=5*/`` operand
    comments, and XLA's op names sorting kernels into the step's parts."""
    import gpu_aot

    triton_call = (
        "  %pallas_call.8 = (f32[4,4096]{1,0}, f32[4,4096]{1,0}) custom-call(%bitcast.1, %w.1, /*index=2*/%y.1), "
        'custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(compile_loss)/pallas_call"}'
    )
    text = "\n".join(
        [
            "HloModule jit_step, entry_computation_layout={(bf16[4096,256]{1,0})->f32[4096]{0}}",
            "",
            "%fused_convert (param_0: bf16[4096,256]) -> f32[4096,256] {",
            "  %param_0 = bf16[4096,256]{1,0} parameter(0)",
            "  ROOT %c = f32[4096,256]{1,0} convert(%param_0)",
            "}",
            "",
            "ENTRY %main.1 (h.1: bf16[4096,256], w.1: bf16[30720,256], y.1: s32[4096]) -> f32[4096] {",
            "  %h.1 = bf16[4096,256]{1,0} parameter(0)",
            "  %w.1 = bf16[30720,256]{1,0} parameter(1)",
            "  %y.1 = s32[4096]{0} parameter(2)",
            "  %bitcast.1 = bf16[4096,256]{1,0} bitcast(%h.1)",
            triton_call,
            "  %g = f32[4,4096]{1,0} get-tuple-element(%pallas_call.8), index=0",
            "  %loop_convert_fusion = f32[4096,256]{1,0} fusion(%h.1), kind=kLoop, calls=%fused_convert, "
            'metadata={op_name="jit(step)/jvp(encoder)/transformer_layer_0/convert_element_type"}',
            "  ROOT %r = f32[4096]{0} fusion(%g), kind=kInput, calls=%fused_convert",
            "}",
        ]
    )
    launched = {k["name"]: k for k in gpu_aot.kernels(text)}
    assert set(launched) == {"pallas_call.8", "loop_convert_fusion", "r"}
    triton = launched["pallas_call.8"]
    assert triton["triton"] and not launched["loop_convert_fusion"]["triton"]
    assert triton["bytes"] == 2 * 4 * 4 * 4096 + 2 * 4096 * 256 + 2 * 30720 * 256 + 4 * 4096
    assert launched["r"]["bytes"] == 4 * 4096 + 4 * 4 * 4096  # a tuple element as its operand
    assert [gpu_aot.part_of(launched[n]["op_name"]) for n in ("pallas_call.8", "loop_convert_fusion", "r")] == [
        "head+loss",
        "encoder",
        "other",
    ]
    assert gpu_aot.part_of("jit(step)/adam_w_4/sub") == "optimizer"


def test_gpu_aot_cells_and_table():
    import gpu_aot

    assert gpu_aot.parse_cell("mixed_bfloat16,128") == {
        "precision": "mixed_bfloat16",
        "batch_size": 128,
        "mlm_loss": "keras",
        "vocab_size": 30522,
    }
    assert gpu_aot.parse_cell("float32, 64, fused, 30592")["vocab_size"] == 30592
    with pytest.raises(Exception, match="precision,batch"):
        gpu_aot.parse_cell("float32")
    assert [gpu_aot.parse_cell(c)["mlm_loss"] for c in gpu_aot.DEFAULT_CELLS].count("keras") == 5
    ok = {**gpu_aot.parse_cell("mixed_bfloat16,128"), "blocks": None, "compile_s": 15.0, "kernels": 394}
    ok.update(argument_bytes=109 * 2**20, temp_bytes=1166 * 2**20, triton_kernels=0, kernel_bytes=8.41e9)
    ok["bytes_by_part"] = dict(zip(gpu_aot.PARTS, (2.48e9, 4.2e9, 0.32e9, 1.41e9)))
    bad = {**gpu_aot.parse_cell("mixed_bfloat16,128,fused"), "blocks": "vocab=256", "error": "E: a | b"}
    rows = [r for r in gpu_aot.markdown("h", [ok, bad], 3.35232e12).splitlines() if r.startswith("| mixed")]
    assert rows[0].endswith("| 394 | 0 | 8.41 | 2.48 / 4.20 / 0.32 / 1.41 | 2.51 |")
    assert "| 1.25 |" in rows[0]  # (109 + 1,166) MiB in GiB
    assert "| vocab=256 | NO: E: a / b |" in rows[1] and rows[1].count("|") == rows[0].count("|")


def test_gpu_aot_without_a_cuda_plugin_says_how_to_get_one():
    """This venv's jax has no CUDA plugin: the script stops before building anything and names the fix."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_aot.py"), "--preset", "smoke", "--cell", "float32,16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "cannot compile for CUDA without a GPU" in proc.stderr and "make gpu-aot" in proc.stderr
    assert "h100_sxm.txtpb" in proc.stderr and "gpu_aot:" not in proc.stdout


def refusal(capsys, parse, argv) -> str:
    """What ``parse(argv)`` says when it refuses: exit 2 and one line of its own below the usage."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--batch-size", "0"], "--batch-size 0: expected whole numbers >= 1"),
        (["--batch-size", "128,abc"], "--batch-size abc:"),
        (["--set", "foo=bar"], "--set foo=bar: unknown config key 'foo'"),
        (["--set", "pretrain.batch_size=0"], "pretrain.batch_size"),
        (["--loss-run", "-5", "--only-loss-run"], "--loss-run -5:"),
        (["--loss-run", "10"], f"give >= {synthetic.MIN_LOSS_RUN} steps, or 0"),
        (["--only-loss-run"], "would run nothing"),
        (["--precision", "float32,float64"], "--precision float64: expected one or more of auto, float32"),
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--vocab-size", "8"], "--vocab-size 8"),
        (["--min-drop", "1"], "--min-drop 1.0"),
    ],
)
def test_synthetic_refuses_bad_arguments_in_one_line(argv, said, capsys):
    assert said in refusal(capsys, synthetic.parse_args, ["--preset", "smoke", *argv])


def test_synthetic_arguments_unfold_and_the_loss_run_takes_the_first_batch():
    args = synthetic.parse_args(["--precision", "float32", "--precision", "mixed_bfloat16", "--batch-size", "16,4"])
    assert args.precisions == ["float32", "mixed_bfloat16"] and args.batches == [16, 4]
    assert synthetic.parse_args(["--preset", "smoke"]).batches == [from_overrides("smoke").pretrain.batch_size]


def test_synthetic_header_states_the_steps_that_ran():
    """fit runs whole calls of steps_per_execution: the steps asked round up, and the header gives
    the rounded count and the reason; without rounding it says nothing of it."""
    assert synthetic.planned_steps(1, 1, 16) == {"timed": 16, "fit_first": 16, "fit_warmup": 16, "bare_warmup": 1}
    assert synthetic.planned_steps(20, 3, 16)["timed"] == 32 and synthetic.planned_steps(20, 3, 16)["fit_warmup"] == 32
    note = synthetic.steps_note(20, 3, 3, 16)
    assert "timed: 3 x 32 steps each" in note and "--steps 20" in note and "steps_per_execution=16" in note
    assert "fit 32 steps" in note and "bare step 3" in note
    # gpu.sh's counts: the timed steps are whole calls already; fit's first call alone runs 16 steps.
    gpu = synthetic.steps_note(64, 5, 3, 16)
    assert "timed: 3 x 64 steps each" in gpu and "fit 32 steps" in gpu and "--steps" not in gpu
    assert "(fit's warm-up of 5 rounded up" in gpu
    assert "rounded" not in synthetic.steps_note(64, 5, 3, 1)


def test_synthetic_ctrl_c_exits_130_with_one_line(tmp_path):
    """Ctrl-C while a cell's own process runs: no traceback from either process, one line, exit 130."""
    cmd = [sys.executable, str(BENCH / "train.py"), "--synthetic", "--preset", "smoke", "--batch-size", "8,4"]
    cmd += ["--steps", "1", "--warmup", "1", "--repeats", "1", "--pool", "2", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Its own process group, as a terminal's Ctrl-C reaches every process of the foreground job.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout.readline().startswith("synthetic: ")  # the first cell's process is starting
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["train.py --synthetic: interrupted (Ctrl-C); no table written"]
    assert not (tmp_path / "out").exists()


def test_gpu_check_refuses_too_few_loss_steps_before_any_cell(tmp_path):
    """Under 20 steps the loss run records one loss, which cannot fall: refused at once, naming the knob."""
    for bad in ("5", "19", "ten"):
        env = {**os.environ, "GPU_CHECK_LOSS_STEPS": bad, "PYTHON": "false"}  # no Python may start
        proc = subprocess.run(
            ["bash", str(BENCH / "gpu.sh"), str(tmp_path / "out")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert f"GPU_CHECK_LOSS_STEPS={bad}" in proc.stderr and "20 or more" in proc.stderr
        assert not (tmp_path / "out").exists()


def fake_guide(path: Path, **changes) -> Path:
    """A seed_guide.py stand-in with the guide's constants (``changes`` replace some; ``None`` drops one)."""
    values = {"PRETRAINING_BATCH_SIZE": 128, "FINETUNING_BATCH_SIZE": 32, "SEQ_LENGTH": 128,
              "PREDICTIONS_PER_SEQ": 32, "NUM_LAYERS": 3, "MODEL_DIM": 256, "INTERMEDIATE_DIM": 512,
              "NUM_HEADS": 4, **changes}  # fmt: skip
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items() if v is not None) + "print('guide')\n")
    return path


def test_peer_finds_the_guide_script_by_environment_and_reads_its_setup(tmp_path, monkeypatch):
    import peer

    script = fake_guide(tmp_path / "guide.py")
    monkeypatch.setenv(peer.GUIDE_ENV, str(script))
    assert peer.guide_script() == script.resolve()
    assert peer.guide_setup() == {"pretrain_batch": 128, "finetune_batch": 32, "seq_length": 128,
                                  "predictions_per_seq": 32, "num_layers": 3, "model_dim": 256,
                                  "intermediate_dim": 512, "num_heads": 4}  # fmt: skip
    assert peer.guide_setup(fake_guide(tmp_path / "other.py", NUM_LAYERS=None))["num_layers"] is None
    monkeypatch.setenv(peer.GUIDE_ENV, str(tmp_path / "nope.py"))
    with pytest.raises(peer.GuideMissing, match=f"{tmp_path / 'nope.py'} does not exist; set {peer.GUIDE_ENV}"):
        peer.guide_script()


def offline_tree(root: Path) -> Path:
    """Every file the benchmarks read from an offline folder, empty: enough to pass their checks."""
    import peer

    for member in peer.OFFLINE_MEMBERS:
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_text("")
    return root


def test_train_data_mode_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys):
    import train

    data = offline_tree(tmp_path / "data")
    monkeypatch.setenv("ENCODERFLOW_GUIDE_SCRIPT", str(fake_guide(tmp_path / "guide.py")))
    ok = ["--data-dir", str(data), "--preset", "smoke"]
    args = train.parse_args(ok)
    assert args.guide_plan == ((2, 8), (10, 110)) and args.data_dir == data.resolve()
    for argv, said in [
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--finetune-steps", "0"], "--finetune-steps 0: must be >= 1"),
        (["--guide-steps", "2,8"], "--guide-steps '2,8': expected 'pretrain_short"),
        (["--guide-steps", "2,8:10,10"], "finetune counts 10,10 must be >= 1 with the second larger"),
        (["--guide-steps", "0,8:10,110"], "pretrain counts 0,8"),
        (["--set", "foo=bar"], "unknown config key 'foo'"),
    ]:
        assert said in refusal(capsys, train.parse_args, ok + argv), argv
    # This script never downloads: the message is its own, not the pipeline's "leave it empty to download".
    said = refusal(capsys, train.parse_args, ["--data-dir", str(tmp_path / "nope")])
    assert f"--data-dir {tmp_path / 'nope'} does not exist" in said and "download" not in said
    (data / "SST-2" / "dev.tsv").unlink()
    assert "lacks SST-2/dev.tsv" in refusal(capsys, train.parse_args, ok)
    offline_tree(data)
    monkeypatch.setenv("ENCODERFLOW_GUIDE_SCRIPT", str(tmp_path / "gone.py"))
    said = refusal(capsys, train.parse_args, ok)
    assert "gone.py does not exist" in said and "ENCODERFLOW_GUIDE_SCRIPT" in said and "--no-guide" in said
    assert train.parse_args([*ok, "--no-guide"]).no_guide


def test_train_data_mode_home_and_errors(tmp_path):
    """A given ENCODERFLOW_HOME means no temporary home at all; without one, the temporary home goes
    at the end. An error of the pipeline's (here: text with no usable line) is one line, exit 2."""
    data = offline_tree(tmp_path / "data")
    cmd = [sys.executable, str(BENCH / "train.py"), "--data-dir", str(data), "--preset", "smoke", "--no-guide"]
    for home in (str(tmp_path / "home"), None):
        tmp = tmp_path / f"tmp-{home is None}"
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "ENCODERFLOW_HOME"}
        env.update(TMPDIR=str(tmp), **({"ENCODERFLOW_HOME": home} if home else {}))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("train.py: ") and "Traceback" not in proc.stderr
        assert "nothing to pretrain on" in proc.stderr
        assert not list(tmp.glob("encoderflow-bench-*"))


def test_train_table_compares_like_with_like_only(tmp_path):
    """The guide's throughput is its own batch over its own step; against another preset (or batch)
    the table says the sides are not comparable and gives no speed-up; few steps are called noise."""
    import peer
    import train

    setup = peer.guide_setup(fake_guide(tmp_path / "guide.py"))
    ours = {"pretrain_step_s": 0.5, "finetune_step_s": 0.1}
    guide = {"pretrain_step_s": 4.0, "finetune_step_s": 0.8}
    many = {"encoderflow": (20, 200), "guide": (6, 100)}
    smoke = train.table(from_overrides("smoke"), ours, guide, setup, many, 3200)
    assert smoke[0].startswith("NOT COMPARABLE") and "preset smoke, not guide" in smoke[0]
    assert "pretraining batch 32 against the guide's 128" in smoke[0] and "layers 1 against the guide's 3" in smoke[0]
    rows = {line[:40].strip(): line[40:].split() for line in smoke[1:]}
    assert rows["pretrain throughput"][:4] == ["64.0", "seq/s", "32.0", "seq/s"]  # 32 / 0.5, 128 / 4.0
    assert rows["fine-tune epoch (steps x step)"][:4] == ["0.2", "min", "1.3", "min"]  # 100 x 0.1 s, 100 x 0.8 s
    assert all(r[-1] == "n/c" for name, r in rows.items() if name != "measure")
    same = train.table(from_overrides("guide"), ours, guide, setup, many, 3200)
    assert not any("COMPARABLE" in line or "noise" in line for line in same)
    rows = {line[:40].strip(): line[40:].split() for line in same}
    assert rows["pretrain step (batch 128)"][-1] == "8.00x" and rows["pretrain throughput"][-1] == "8.00x"
    # The same preset with another batch is another comparison, and a guide that does not say its batch too.
    bigger = from_overrides("guide", {"pretrain.batch_size": 256})
    assert "pretraining batch 256 against the guide's 128" in train.table(bigger, ours, guide, setup, many, 3200)[0]
    blind = peer.guide_setup(fake_guide(tmp_path / "blind.py", PRETRAINING_BATCH_SIZE=None))
    assert "against the guide's unknown" in train.table(from_overrides("guide"), ours, guide, blind, many, 3200)[0]
    few = train.table(from_overrides("guide"), ours, guide, setup, {"encoderflow": (2, 200), "guide": (1, 100)}, 3200)
    (noise,) = [line for line in few if "noise" in line]
    assert "encoderflow pretraining 2" in noise and "guide pretraining 1" in noise
    assert "--steps and --guide-steps" in noise
    alone = train.table(from_overrides("smoke"), ours, None, {}, {"encoderflow": (20, 200), "guide": (1, 1)}, 3200)
    assert not any("COMPARABLE" in line or "noise" in line for line in alone)


def test_train_shard_line_gives_a_rate_only_for_shards_built():
    import train

    assert train.build_line(0, 5, 0, 0.01) == "shards reused (5 already built, 0.0s to check them)"
    built = train.build_line(4, 1, 6000, 2.0)
    assert "4 built in 2.0s, 6,000 train+valid sequences (3,000 seq/s); 1 reused" in built


def test_shards_gate_and_finetune_refuse_bad_arguments(tmp_path, monkeypatch, capsys):
    import gate
    import peer
    import shards as shard_bench

    assert "--repeats 0: must be >= 1" in refusal(capsys, gate.main, ["--repeats", "0"])
    assert "--repeats -2" in refusal(capsys, gate.main, ["--repeats", "-2"])
    said = refusal(capsys, shard_bench.parse_args, ["--data-dir", str(tmp_path / "nope")])
    assert f"--data-dir {tmp_path / 'nope'} does not exist" in said
    data = offline_tree(tmp_path / "data")
    assert "--repeats 0" in refusal(capsys, shard_bench.parse_args, ["--data-dir", str(data), "--repeats", "0"])
    monkeypatch.setenv(peer.GUIDE_ENV, str(tmp_path / "gone.py"))
    assert peer.GUIDE_ENV in refusal(capsys, shard_bench.parse_args, ["--data-dir", str(data)])
    for env, argv, said in [
        ({}, [str(tmp_path / "none.keras")], "finetune.py: encoder " + str(tmp_path / "none.keras") + ": no such file"),
        ({"PRESET": "bogus"}, ["random"], "finetune.py: PRESET=bogus with no overrides: "),
        ({"DATA_DIR": str(tmp_path / "nope")}, ["random"], "finetune.py: DATA_DIR " + str(tmp_path / "nope")),
    ]:
        proc = subprocess.run(
            [sys.executable, str(BENCH / "finetune.py"), *argv, str(tmp_path / "out")],
            env={**os.environ, "DATA_DIR": str(data), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.strip().startswith(said), proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_quality_refuses_what_it_cannot_do_and_gives_no_verdict_across_models(tmp_path):
    import quality

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    base = [sys.executable, str(BENCH / "quality.py")]
    cases = [
        (["--table", str(tmp_path / "none.jsonl")], {}, f"--table {tmp_path / 'none.jsonl'}: no such file"),
        (["--data-dir", str(tmp_path), "--results", str(tmp_path / "r.jsonl")], {}, "and this run is neither"),
        (["--data-dir", str(tmp_path)], {"ENCODERFLOW_GUIDE_SCRIPT": str(tmp_path / "gone.py")}, "gone.py does not"),
    ]
    for argv, extra, said in cases:
        proc = subprocess.run([*base, *argv], capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("encoderflow-quality-*"))  # refused before its work folder exists
    ours, theirs = {"sst2": 0.84, "wall_s": 100.0}, {"sst2": 0.80, "wall_s": 200.0}
    assert quality.verdict("guide", ours, theirs).endswith("target >= +3.0 points in less wall time: met")
    smoke = quality.verdict("smoke", ours, theirs)
    assert "NOT COMPARABLE" in smoke and "met" not in smoke.replace("NOT COMPARABLE", "")
