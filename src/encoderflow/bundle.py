"""The model bundle: the one folder that is registered, downloaded, verified and served.

A bundle holds everything needed to score sentences, and nothing from training::

    classifier.keras   encoder + pooling + sigmoid unit (Keras safe mode loads it)
    encoder.keras      the pretrained encoder it was fine-tuned from
    vocab.txt          the WordPiece vocabulary
    bundle.json        config, tokenizer settings, val_accuracy, sha256 of each file above

Fine-tuning writes it (:func:`write`), the registry checks a downloaded one (:func:`verify`),
the gate and ``encoderflow predict`` score with it (:class:`Scorer`). This module imports no
ML library at load time: the registry imports it, and the Airflow plugin imports the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoderflow import layout, runtime
from encoderflow.errors import EncoderflowError
from encoderflow.results import SST2_LABELS

if TYPE_CHECKING:
    import numpy as np

    from encoderflow.config import Config

CLASSIFIER, ENCODER, VOCAB = "classifier.keras", "encoder.keras", "vocab.txt"
FILES = (CLASSIFIER, ENCODER, VOCAB)
META = "bundle.json"


def seal(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``bundle.json``: ``meta`` plus the sha256 of each bundle file present in ``folder``.

    Args:
        folder: a folder holding some or all of :data:`FILES`.
        meta: the other ``bundle.json`` fields (config, tokenizer settings, accuracy).

    Returns:
        The path of ``bundle.json``.
    """
    folder = Path(folder)
    files = {name: layout.sha256_file(folder / name) for name in FILES if (folder / name).exists()}
    return layout.write_json(folder / META, {**(meta or {}), "files": files})


def write(
    path: str | os.PathLike,
    classifier,
    encoder_path: str | os.PathLike,
    vocab_path: str | os.PathLike,
    cfg: Config,
    val_accuracy: float,
    labels: Sequence[str] = SST2_LABELS,
) -> Path:
    """Save a bundle at ``path``, replacing any bundle there, atomically.

    The bundle is assembled in a temporary folder beside ``path`` and renamed into place, so a
    reader (a retry, the promote step) sees the old bundle, none, or the complete new one.

    Args:
        path: the bundle folder to create.
        classifier: the fine-tuned ``keras.Model``.
        encoder_path: the pretrained ``encoder.keras`` it started from (linked or copied in:
            :func:`~encoderflow.layout.link_or_copy`).
        vocab_path: the vocabulary it was tokenized with (likewise).
        cfg: the run's config; its data settings are the tokenizer settings serving uses.
        val_accuracy: dev accuracy, recorded in ``bundle.json``.
        labels: the label set in class-index order (SST-2: ``0``, ``1``), recorded for serving.

    Returns:
        ``path``.
    """
    from encoderflow.data.tokenizer import Vocab

    path = Path(path)
    old = path.parent / f".{path.name}-old-{os.getpid()}"
    # Under the folder's writer lock; what a killed writer left (.bundle-*) is swept as this one starts.
    with layout.temp_dir(path.parent, f".{path.name}-") as tmp:
        _without_training_state(classifier).save(tmp / CLASSIFIER)
        layout.link_or_copy(encoder_path, tmp / ENCODER)  # one encoder on disk per run, not two
        layout.link_or_copy(vocab_path, tmp / VOCAB)
        vocab = Vocab.load(vocab_path)
        seal(
            tmp,
            {
                "config": cfg.to_dict(),
                "seq_length": cfg.data.seq_length,
                "lowercase": cfg.data.lowercase,
                "strip_accents": cfg.data.strip_accents,
                "vocab_size": vocab.size,
                "pad_id": vocab.pad_id,
                "val_accuracy": float(val_accuracy),
                "labels": list(labels),
            },
        )
        # A folder cannot be renamed onto a non-empty one, and deleting the old bundle in place
        # could leave it half-deleted if killed; renaming it aside first is atomic.
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def _without_training_state(classifier):
    """The classifier's graph and weights as a model never compiled: a ``.keras`` file saves a compiled
    model's optimizer state (twice the weights again, under AdamW), Keras 3 has no switch to leave it
    out, and ``clone_model`` compiles its clone too. Nothing reads it back: a warm start compiles a
    new optimizer."""
    if getattr(classifier, "optimizer", None) is None:
        return classifier
    keras = runtime.keras()
    return keras.Model(classifier.inputs, classifier.outputs, name=classifier.name)


def metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's ``bundle.json``.

    Raises:
        FileNotFoundError: ``path`` has no ``bundle.json``.
    """
    meta_path = Path(path) / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not a model bundle (no bundle.json)")
    return layout.read_json(meta_path)


# bundle.json fields that record how a model was made, not what it is: a bundle reused by a run of
# another config is the same model. (Files trained again differ anyway: Keras stamps each with its time.)
_HISTORY_FIELDS = ("config", "val_accuracy")


def identity(path: str | os.PathLike) -> str:
    """The model's identity: a sha256 over ``bundle.json`` less its config and accuracy, i.e. each
    file's sha256, the tokenizer settings and the labels.

    The gate records it in ``gate.json`` and the registry on the model version (``bundle.sha256``), so
    a decision and a version are matched to the very model they were made for, and a candidate that
    is a registered model again is known as such.
    """
    meta = metadata(path)
    return layout.sha256_json({k: v for k, v in meta.items() if k not in _HISTORY_FIELDS})


def content_identity(path: str | os.PathLike) -> str:
    """The model's identity by what its files hold: :func:`identity` with each ``.keras`` file hashed
    member by member, less what differs between two saves of the same model: the save time
    (``metadata.json``'s ``date_saved``), the memory addresses in ``config.json``
    (``shared_object_id``) and the numbering of the weights' group names (:func:`_weights_sha256`).

    A model trained again to the same weights (a forced run, a code change that leaves the numbers
    alone: training is seeded and deterministic on one device) has files of other bytes, so another
    :func:`identity`, but this one: the registry and the gate know it as the model it is.
    """
    path = Path(path)
    meta = metadata(path)
    files = meta.get("files") or {}
    held = {name: _content_sha256(path / name) if name.endswith(".keras") else sha for name, sha in files.items()}
    kept = {k: v for k, v in meta.items() if k not in (*_HISTORY_FIELDS, "files")}
    return layout.sha256_json({**kept, "contents": held})


def _content_sha256(file: Path) -> str:
    """A ``.keras`` file's members (architecture, weights) without its save time; a file that is not
    a zip archive (a test's stand-in) by its bytes."""
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        return layout.sha256_file(file)
    members = {}
    with archive:
        for name in sorted(archive.namelist()):
            data = archive.read(name)
            if name == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif name == "config.json":
                data = json.dumps(_renumbered(json.loads(data), {}), sort_keys=True).encode()
            elif name.endswith(".h5"):
                members[name] = _weights_sha256(data)
                continue
            members[name] = hashlib.sha256(data).hexdigest()
    return layout.sha256_json(members)


_NUMBERED = re.compile(r"^(.*?)(?:_(\d+))?$")


def _weights_sha256(data: bytes) -> str:
    """The weights of a Keras ``.weights.h5`` by their arrays, under group names less Keras's automatic
    numbering: a sub-layer Keras names itself (``dropout``, ``softmax``) is ``dropout_1`` in a process
    that built one before, with the same weights. Siblings keep their order (``dense`` before ``dense_1``
    before ``dense_10``), so two layers of one name stay apart."""
    import h5py
    import numpy as np

    def order(name: str) -> tuple[str, int]:
        base, number = _NUMBERED.match(name).groups()
        return base, -1 if number is None else int(number)

    arrays: list[list[Any]] = []

    def walk(group, path: str) -> None:
        for name in sorted(group.keys(), key=order):
            item, here = group[name], f"{path}/{order(name)[0]}"
            if isinstance(item, h5py.Dataset):
                value = np.asarray(item[()])
                arrays.append([here, str(value.dtype), list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()])
            else:
                walk(item, here)

    try:
        f = h5py.File(io.BytesIO(data), "r")
    except OSError:  # not HDF5 (a test's stand-in): its bytes
        return hashlib.sha256(data).hexdigest()
    with f:
        walk(f, "")
    return layout.sha256_json(arrays)


def _renumbered(node: Any, seen: dict[Any, int]) -> Any:
    """A Keras config with each ``shared_object_id`` (the Python ``id()`` of an object that layers
    share, a memory address that differs in every process) numbered by first appearance instead."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "shared_object_id" and not isinstance(value, (dict, list)):
                out[key] = seen.setdefault(value, len(seen))
            else:
                out[key] = _renumbered(value, seen)
        return out
    if isinstance(node, list):
        return [_renumbered(v, seen) for v in node]
    return node


def labels_of(meta: dict[str, Any]) -> list[str]:
    """A ``bundle.json``'s label set in class-index order; bundles written before it was recorded are SST-2's."""
    return list(meta.get("labels") or SST2_LABELS)


def verify(path: str | os.PathLike) -> Path:
    """Check every file of a bundle (a downloaded one, say) against the sha256s in its ``bundle.json``.

    Returns:
        ``path``, for chaining.

    Raises:
        EncoderflowError: no ``bundle.json``, one that does not list every file of :data:`FILES`, or a
            file missing or differing from its recorded sha256; the message names the file.
    """
    path = Path(path)
    if why := damage(path):
        raise EncoderflowError(f"{path}/{why}")
    return path


def damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the bundle at ``path``, naming the file inside it (``vocab.txt: missing or
    altered ...``), or None when every file matches ``bundle.json``."""
    path = Path(path)
    if not (path / META).exists():
        return f"{META}: missing: incomplete model bundle (no bundle.json)"
    files = layout.read_json(path / META).get("files", {})
    if unlisted := [name for name in FILES if name not in files]:
        return f"{META}: lists no sha256 for {', '.join(unlisted)}; the bundle is incomplete (write it again)"
    for fname, digest in files.items():
        file = path / fname
        if not file.exists() or layout.sha256_file(file) != digest:
            return f"{fname}: missing or altered (sha256 differs from bundle.json); the bundle is incomplete"
    return None


def _check_sentences(sentences: Any) -> None:
    """What :class:`Scorer` scores is a sequence of strings: one string would be scored a character at
    a time, and a None or number failed deep in TensorFlow."""
    if isinstance(sentences, (str, bytes)):
        raise TypeError(f"sentences must be a list of strings, got one {type(sentences).__name__}: pass [text]")
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentences[{i}] is {type(sentence).__name__} {sentence!r:.60}, not a string")


class Scorer:
    """Score sentences with a saved bundle: its own tokenizer settings, Keras safe mode.

    It does not re-hash the files; :func:`verify` a bundle that came from elsewhere first
    (``registry.download_version`` does).

    Args:
        bundle_dir: the bundle folder.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``bundle.json``.
    """

    def __init__(self, bundle_dir: str | os.PathLike):
        from encoderflow import model as models  # imports Keras on JAX

        self.bundle_dir: Path | None = Path(bundle_dir)
        meta = metadata(self.bundle_dir)
        self._setup(models.load(self.bundle_dir / CLASSIFIER), self.bundle_dir / VOCAB, meta)

    @classmethod
    def for_classifier(cls, classifier, vocab_path: str | os.PathLike, cfg: Config, labels: Sequence[str]) -> Scorer:
        """A Scorer of a classifier still in memory, scoring exactly as one of its bundle will.

        Fine-tuning records this score as ``val_accuracy``, so the gate compares a candidate and the
        champion (re-scored from its bundle) measured the same way.
        """
        scorer = cls.__new__(cls)
        scorer.bundle_dir = None
        meta = {
            "seq_length": cfg.data.seq_length,
            "lowercase": cfg.data.lowercase,
            "strip_accents": cfg.data.strip_accents,
            "labels": list(labels),
        }
        scorer._setup(classifier, vocab_path, meta)
        return scorer

    def _setup(self, classifier, vocab_path: str | os.PathLike, meta: dict[str, Any]) -> None:
        from encoderflow.data.tokenizer import make_tokenizer

        self.meta, self.classifier, self.vocab_path = meta, classifier, Path(vocab_path)
        # Padded to the length it was trained on: the guide's model (no padding mask) depends on it.
        self.tokenizer = make_tokenizer(vocab_path, meta["seq_length"], meta["lowercase"], meta["strip_accents"])

    @property
    def labels(self) -> list[str]:
        """The label set in class-index order; bundles written before it was recorded are SST-2's."""
        return labels_of(self.meta)

    def probabilities(self, sentences: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Two classes: P(class 1) per sentence, shape ``[n]``; more: one row of class probabilities each.

        An empty or blank sentence is scored as the model sees it: a row of [PAD] ids only (the
        classifier's tokenizer adds no [CLS] or [SEP]).

        Raises:
            TypeError: ``sentences`` is one string (it would be scored a character at a time) or holds
                something other than a string; ``batch_size`` is not an int.
            ValueError: ``batch_size`` is below 1.
        """
        import numpy as np

        from encoderflow.data.tokenizer import tokenize

        _check_sentences(sentences)
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        out = []
        for i in range(0, len(sentences), batch_size):
            ids = tokenize(self.tokenizer, list(sentences[i : i + batch_size]))
            probs = np.asarray(self.classifier.predict(ids, verbose=0))
            out.append(probs.reshape(-1) if len(self.labels) <= 2 else probs)
        if not out:
            return np.zeros((0,) if len(self.labels) <= 2 else (0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out)

    def truncated(self, sentences: Sequence[str]) -> int:
        """How many ``sentences`` hold more WordPiece tokens than ``seq_length``: only their first
        ``seq_length`` tokens are scored (the model was trained on no more)."""
        from encoderflow.data.tokenizer import make_tokenizer

        _check_sentences(sentences)
        if not sentences:
            return 0
        tf = runtime.tensorflow()
        whole = make_tokenizer(self.vocab_path, None, self.meta["lowercase"], self.meta["strip_accents"])
        return sum(len(ids) > self.meta["seq_length"] for ids in whole(tf.constant(list(sentences))))

    def predict(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per sentence, the predicted class index and its probability."""
        return self._classes(self.probabilities(sentences))

    def _classes(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        if len(self.labels) <= 2:
            # Keras's binary accuracy (what fine-tuning reports) counts 0.5 as class 0: so do we.
            predicted = (probs > 0.5).astype(np.int32)
            return predicted, np.where(predicted == 1, probs, 1 - probs)
        return probs.argmax(axis=-1), probs.max(axis=-1)

    def correct(self, sentences: Sequence[str], labels) -> np.ndarray:
        """Per sentence, whether the predicted class (0.5 threshold for two) equals its label index (bool array)."""
        import numpy as np

        return self.predict(sentences)[0] == np.asarray(labels)

    def accuracy(self, sentences: Sequence[str], labels) -> float:
        """Share of sentences classified correctly (:meth:`correct`)."""
        return float(self.correct(sentences, labels).mean())

    def evaluate(self, sentences: Sequence[str], labels) -> tuple[float, float]:
        """Accuracy (as :meth:`accuracy`) and fine-tuning's loss (binary cross-entropy for two classes,
        sparse categorical for more) of labeled sentences, from one pass of the classifier."""
        import numpy as np

        keras = runtime.keras()
        probs, labels = self.probabilities(sentences), np.asarray(labels)
        if len(self.labels) <= 2:
            loss = keras.losses.BinaryCrossentropy()(labels.astype(np.float32)[:, None], probs[:, None])
        else:
            loss = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
        return float((self._classes(probs)[0] == labels).mean()), float(loss)
