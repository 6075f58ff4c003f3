"""The MLM loss computed from the head's features, the logits never whole (issue 12).

Levers for ``benchmarks/train.py --synthetic --mlm-loss chunked|fused``, timed by
``benchmarks/gpu.sh`` beside the pipeline's step. On the H100 the guide step's 4,096 x 30,522
logits (written, cast to float32, read back for the loss and again for the gradient) cost ~40% of
the step (a 1,024-word vocabulary takes the step from 4.82 to 2.68 ms). Here the head stops before
its projection, and the loss multiplies the features by the tied embedding itself:

- ``chunked``: in XLA, ``CHUNK_ROWS`` rows at a time (a ``lax.scan`` over the chunks); the
  forward pass keeps one float per row and the backward pass makes each chunk's logits again;
- ``fused``: three Pallas kernels (Triton on a GPU; Pallas's interpreter elsewhere) in the manner
  of Pallas's own fused attention (``jax.experimental.pallas.ops.gpu.attention``): an online
  log-sum-exp over vocabulary blocks, then the features' gradient by row blocks and the
  embedding's and bias's by vocabulary blocks, the logits living only in registers.

No maintained JAX library ships either for GPUs (tokamax 0.0.12's
``linear_softmax_cross_entropy_loss`` has a TPU kernel and an XLA reference that materialises
the logits), hence this file. Both give the pipeline's value and gradients
(``tests/test_benchmarks.py``). Import it only after choosing the backend, as
``encoderflow.model`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from encoderflow import model as models
from encoderflow import runtime

keras = runtime.keras()
ops = keras.ops

# Rows of logits per chunk: 256 x 30,522 float32 logits are 31 MB, under the H100's 50 MB L2, so a
# chunk's logits need not go to HBM and back; 16 chunks per guide step (batch 128 x 32 positions).
CHUNK_ROWS = 256


def chunked_cross_entropy(features, embeddings, bias, labels, rows: int | None = None):
    """Per row, ``logsumexp(z) - z[label]`` with ``z = features @ embeddings.T + bias``, ``rows``
    rows at a time.

    The matmuls run in the features' dtype and the loss in float32, as the pipeline's head and
    loss do. The forward pass keeps one float per row (the log-sum-exp); the backward pass makes
    each chunk's logits again and turns them into that chunk's gradients at once, summing the
    embedding's and the bias's in float32 (a ``jax.custom_vjp``: autodiff would sum the chunks'
    bfloat16 embedding gradients in bfloat16).

    Args:
        features: ``(n, dim)``, the head's output before its projection.
        embeddings: ``(vocab, dim)``, the tied token embedding, in the features' dtype.
        bias: ``(vocab,)``, the head's output bias.
        labels: ``(n,)`` int32 token ids.
        rows: rows per chunk (default ``CHUNK_ROWS``); the last chunk is padded to it.

    Returns:
        ``(n,)`` float32 losses.
    """
    return _chunked(int(rows or CHUNK_ROWS), features, embeddings, bias, labels)


def _chunks(rows: int, *arrays):
    """Each array padded with zero rows to whole chunks and split into ``(chunks, rows, ...)``."""
    pad = -arrays[0].shape[0] % rows
    return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, rows, *a.shape[1:]) for a in arrays]


def _logits(h, w, b):
    return jnp.dot(h, w.T).astype(jnp.float32) + b.astype(jnp.float32)


def _is_label(z, y):
    return jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == y[:, None]


# The chunks run in a lax.scan, not a Python loop: unrolled, XLA merged the chunks' bias-gradient
# sums into one reduction over the logits' whole gradient and wrote that gradient (gpu_aot.py, guide
# step for an H100: 1,025 MiB of temporaries unrolled, 523 MiB in the scan, 469 MiB fused).
def _forward(rows, h, w, b, y):
    n = h.shape[0]

    def chunk(_, hy):
        z = _logits(hy[0], w, b)
        lse = jax.nn.logsumexp(z, axis=-1)
        return None, (lse - jnp.sum(jnp.where(_is_label(z, hy[1]), z, 0.0), axis=-1), lse)

    _, (losses, lses) = jax.lax.scan(chunk, None, _chunks(rows, h, y))
    return losses.reshape(-1)[:n], (h, w, b, y, lses.reshape(-1)[:n])


def _backward(rows, saved, g):
    h, w, b, y, lse = saved
    n = h.shape[0]
    real = jnp.ones(n, bool)

    def chunk(sums, xs):
        hi, yi, lse_i, g_i, real_i = xs
        z = _logits(hi, w, b)
        dz = (jnp.exp(z - lse_i[:, None]) - _is_label(z, yi)) * g_i[:, None]
        dz = jnp.where(real_i[:, None], dz, 0.0)  # padding rows: exp of an unmade log-sum-exp
        dz_low = dz.astype(h.dtype)
        dw, db = sums
        dw = dw + jnp.dot(dz_low.T, hi, preferred_element_type=jnp.float32)
        return (dw, db + jnp.sum(dz, axis=0)), jnp.dot(dz_low, w)

    sums = (jnp.zeros(w.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32))
    (dw, db), dh = jax.lax.scan(chunk, sums, _chunks(rows, h, y, lse, g, real))
    return dh.reshape(-1, h.shape[1])[:n], dw.astype(w.dtype), db.astype(b.dtype), None


_chunked = jax.custom_vjp(lambda rows, h, w, b, y: _forward(rows, h, w, b, y)[0], nondiff_argnums=(0,))
_chunked.defvjp(_forward, _backward)


@dataclasses.dataclass(frozen=True)
class FusedBlocks:
    """Block sizes of the fused kernels (powers of two, as Triton wants). Untuned: the first GPU run
    says what they are worth; ``ENCODERFLOW_FUSED_BLOCKS="vocab=64 stages=1"`` (any of the fields)
    overrides them for another try without an edit.

    The forward and features-gradient kernels run a grid of (row blocks of ``rows``) x (``split``
    slices of the vocabulary), each program stepping through its slice ``vocab`` words at a time
    (``grad_vocab`` in the gradient, whose accumulator and twice-read embedding block need more
    room): 4,096 rows make 64 x 4 = 256 programs for the H100's 132 SMs, and the slices' partial
    results are summed in XLA. The embedding-gradient kernel runs one program per ``grad_vocab``
    words, stepping through all rows. By our arithmetic, not yet a GPU's, at 8 warps the
    accumulators stay under ~64 registers a thread and the double-buffered embedding blocks
    (``stages=2``) under the H100's 227 KB of shared memory.
    """

    rows: int = 64
    vocab: int = 128
    grad_vocab: int = 64
    split: int = 4
    warps: int = 8
    stages: int = 2

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if name != "stages" and (value < 1 or value & (value - 1)):
                raise ValueError(f"fused blocks: {name}={value} is not a power of two")
        if self.stages < 1:
            raise ValueError(f"fused blocks: stages={self.stages} must be >= 1")

    @classmethod
    def from_env(cls, text: str | None = None) -> FusedBlocks:
        """Defaults, with ``ENCODERFLOW_FUSED_BLOCKS`` (``key=value``, space-separated) over them."""
        text = os.environ.get("ENCODERFLOW_FUSED_BLOCKS", "") if text is None else text
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            if not sep or key not in fields or not value.isdigit():
                raise ValueError(
                    f"ENCODERFLOW_FUSED_BLOCKS: {item!r} is not key=integer with key one of {', '.join(sorted(fields))}"
                )
            values[key] = int(value)
        return cls(**values)

    def words_multiple(self) -> int:
        """The padded vocabulary's multiple: whole slices of whole steps, whole gradient blocks."""
        return self.split * max(self.vocab, self.grad_vocab)


FUSED = FusedBlocks.from_env()
# The padded vocabulary rows' bias: their logits vanish from every exp, finitely (Pallas's
# attention masks with the same value).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def fused_cross_entropy(features, embeddings, bias, labels):
    """:func:`chunked_cross_entropy`'s result from fused Pallas kernels (blocks: ``FUSED``).

    Rows are padded to whole row blocks and the vocabulary to whole slices (padded words get a
    bias no logit survives); the dim stays as it is and must suit Triton (a power of two, at least
    16). Off a GPU the kernels run in Pallas's interpreter, which is how the tests check them.

    Args:
        features: ``(n, dim)``, the head's output before its projection.
        embeddings: ``(vocab, dim)``, the tied token embedding, in the features' dtype.
        bias: ``(vocab,)``, the head's output bias.
        labels: ``(n,)`` int32 token ids.

    Returns:
        ``(n,)`` float32 losses.
    """
    dim = features.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"--mlm-loss fused needs model.model_dim a power of two >= 16, got {dim}")
    return _fused(FUSED, features, embeddings, bias, labels)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _fused_inputs(blocks: FusedBlocks, h, w, b, y):
    """Padded to whole blocks; bias float32."""
    n, vocab = h.shape[0], w.shape[0]
    rows = _round_up(n, blocks.rows) - n
    words = _round_up(vocab, blocks.words_multiple()) - vocab
    b = b.astype(jnp.float32)
    if words:
        w = jnp.pad(w, ((0, words), (0, 0)))
        b = jnp.pad(b, (0, words), constant_values=_MASKED)
    if rows:
        h, y = jnp.pad(h, ((0, rows), (0, 0))), jnp.pad(y, (0, rows))
    return h, w, b, y


# gpu_aot.py compiles for a GPU this process does not have: Triton then, not the interpreter.
FORCE_TRITON = False


def _interpret() -> bool:
    return not FORCE_TRITON and jax.default_backend() != "gpu"


def _fused_logits(h, w, b):
    return plgpu.dot(h, w.T) + b[None, :]


def _fused_forward_kernel(h_ref, w_ref, b_ref, y_ref, m_ref, total_ref, picked_ref, *, step):
    """One row block against one vocabulary slice: the slice's max logit, sum of exp(logit - max)
    and label logit (0 where the label lies in another slice), online over ``step`` words."""
    h, y = h_ref[...], y_ref[...]
    rows = h.shape[0]
    first = pl.program_id(1) * w_ref.shape[0]

    def body(k, carry):
        m, total, picked = carry
        words = pl.ds(k * step, step)
        z = _fused_logits(h, w_ref[words, :], b_ref[words])
        m_next = jnp.maximum(m, jnp.max(z, axis=1))
        total = total * jnp.exp(m - m_next) + jnp.sum(jnp.exp(z - m_next[:, None]), axis=1)
        ids = first + k * step + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
        picked = picked + jnp.sum(jnp.where(ids == y[:, None], z, 0.0), axis=1)
        return m_next, total, picked

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    m, total, picked = jax.lax.fori_loop(0, w_ref.shape[0] // step, body, init)
    m_ref[...], total_ref[...], picked_ref[...] = m, total, picked


def _fused_logits_grad(h, w, b, y, lse, g, first_word):
    """d loss / d logits of one block: ``(softmax - onehot) * g``, float32."""
    z = _fused_logits(h, w, b)
    ids = first_word + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    return (jnp.exp(z - lse[:, None]) - (ids == y[:, None]).astype(jnp.float32)) * g[:, None]


def _fused_features_grad_kernel(h_ref, w_ref, b_ref, y_ref, lse_ref, g_ref, dh_ref, *, step):
    """One row block's features gradient from one vocabulary slice (float32, summed in XLA)."""
    h, y, lse, g = h_ref[...], y_ref[...], lse_ref[...], g_ref[...]
    first = pl.program_id(1) * w_ref.shape[0]

    def body(k, dh):
        words = pl.ds(k * step, step)
        w = w_ref[words, :]
        dz = _fused_logits_grad(h, w, b_ref[words], y, lse, g, first + k * step)
        return dh + plgpu.dot(dz.astype(w.dtype), w)

    dh_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0] // step, body, jnp.zeros(h.shape, jnp.float32))


def _fused_embedding_grad_kernel(h_ref, w_ref, b_ref, y_ref, lse_ref, g_ref, dw_ref, db_ref, *, rows):
    """One vocabulary block's embedding and bias gradients, over all rows ``rows`` at a time."""
    w, b = w_ref[...], b_ref[...]
    first_word = pl.program_id(0) * w.shape[0]

    def body(i, carry):
        dw, db = carry
        block = pl.ds(i * rows, rows)
        h = h_ref[block, :]
        dz = _fused_logits_grad(h, w, b, y_ref[block], lse_ref[block], g_ref[block], first_word)
        return dw + plgpu.dot(dz.astype(h.dtype).T, h), db + jnp.sum(dz, axis=0)

    init = (jnp.zeros(w.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32))
    dw, db = jax.lax.fori_loop(0, h_ref.shape[0] // rows, body, init)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    db_ref[...] = db


def _spec(shape, index_map):
    return pl.BlockSpec(shape, index_map)


def _call(blocks: FusedBlocks, kernel, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages),
        interpret=_interpret(),
        name=name,
    )


def _split_specs(blocks: FusedBlocks, hp, wp):
    """In-specs of a (row block, vocabulary slice) grid: rows, that slice's words and biases, and
    (for labels, log-sum-exps, cotangents) the rows' entries."""
    dim, per_slice = hp.shape[1], wp.shape[0] // blocks.split
    return [
        _spec((blocks.rows, dim), lambda i, j: (i, 0)),
        _spec((per_slice, dim), lambda i, j: (j, 0)),
        _spec((per_slice,), lambda i, j: (j,)),
    ], _spec((blocks.rows,), lambda i, j: (i,))


def _fused_forward(blocks: FusedBlocks, h, w, b, y):
    n = h.shape[0]
    hp, wp, bp, yp = _fused_inputs(blocks, h, w, b, y)
    (rows, words, biases), by_row = _split_specs(blocks, hp, wp)
    partial = jax.ShapeDtypeStruct((blocks.split, hp.shape[0]), jnp.float32)
    out_spec = _spec((pl.squeezed, blocks.rows), lambda i, j: (j, i))
    m, total, picked = _call(
        blocks,
        functools.partial(_fused_forward_kernel, step=blocks.vocab),
        (hp.shape[0] // blocks.rows, blocks.split),
        [rows, words, biases, by_row],
        [out_spec] * 3,
        [partial] * 3,
        "mlm_cross_entropy_forward",
    )(hp, wp, bp, yp)
    top = jnp.max(m, axis=0)
    lse = top + jnp.log(jnp.sum(total * jnp.exp(m - top), axis=0))
    loss = lse - jnp.sum(picked, axis=0)
    # The padded inputs are kept for the backward pass, not padded again there; the original bias
    # gives the vocabulary's size and its gradient's dtype.
    return loss[:n], (hp, wp, bp, yp, lse, b)


def _fused_backward(blocks: FusedBlocks, saved, g):
    hp, wp, bp, yp, lse, b = saved
    n, vocab = g.shape[0], b.shape[0]
    gp = jnp.pad(g.astype(jnp.float32), (0, hp.shape[0] - n))  # padded rows: no gradient
    args = (hp, wp, bp, yp, lse, gp)
    (rows, words, biases), by_row = _split_specs(blocks, hp, wp)
    dh = _call(
        blocks,
        functools.partial(_fused_features_grad_kernel, step=blocks.grad_vocab),
        (hp.shape[0] // blocks.rows, blocks.split),
        [rows, words, biases] + [by_row] * 3,
        _spec((pl.squeezed, blocks.rows, hp.shape[1]), lambda i, j: (j, i, 0)),
        jax.ShapeDtypeStruct((blocks.split,) + hp.shape, jnp.float32),
        "mlm_cross_entropy_features_grad",
    )(*args)
    word_block = _spec((blocks.grad_vocab, wp.shape[1]), lambda k: (k, 0))
    bias_block = _spec((blocks.grad_vocab,), lambda k: (k,))
    dw, db = _call(
        blocks,
        functools.partial(_fused_embedding_grad_kernel, rows=blocks.rows),
        (wp.shape[0] // blocks.grad_vocab,),
        [_spec(hp.shape, lambda k: (0, 0)), word_block, bias_block]
        + [_spec(x.shape, lambda k: (0,)) for x in (yp, lse, gp)],
        [word_block, bias_block],
        [jax.ShapeDtypeStruct(wp.shape, wp.dtype), jax.ShapeDtypeStruct(bp.shape, jnp.float32)],
        "mlm_cross_entropy_embedding_grad",
    )(*args)
    return jnp.sum(dh, axis=0)[:n].astype(hp.dtype), dw[:vocab], db[:vocab].astype(b.dtype), None


_fused = jax.custom_vjp(lambda blocks, h, w, b, y: _fused_forward(blocks, h, w, b, y)[0], nondiff_argnums=(0,))
_fused.defvjp(_fused_forward, _fused_backward)

KERNELS = {"chunked": chunked_cross_entropy, "fused": fused_cross_entropy}


def agreement(kernel: str, features, embeddings, bias, labels, weights) -> dict[str, float]:
    """How far ``KERNELS[kernel]`` lands from the whole logits through Keras's loss, here.

    The reference is the pipeline's head and loss: the matmul in the features' dtype, the bias
    added in float32, ``keras.losses.sparse_categorical_crossentropy(from_logits=True)``. Both
    weighted by ``weights`` and summed, then differentiated.

    Returns:
        Relative differences: ``loss``, and ``features``, ``embedding`` and ``bias`` for the
        gradients' largest absolute difference over the reference gradient's largest magnitude.
    """

    def total(fn):
        return lambda h, w, b: jnp.sum(weights * fn(h, w, b))

    def reference(h, w, b):
        z = jnp.dot(h, w.T).astype(jnp.float32) + b.astype(jnp.float32)
        return keras.losses.sparse_categorical_crossentropy(labels, z, from_logits=True)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
    mine, mine_grads = grad(total(lambda h, w, b: KERNELS[kernel](h, w, b, labels)))(features, embeddings, bias)
    ref, ref_grads = grad(total(reference))(features, embeddings, bias)
    out = {"loss": abs(float(mine) - float(ref)) / abs(float(ref))}
    for name, g, r in zip(("features", "embedding", "bias"), mine_grads, ref_grads):
        if g.shape != r.shape or g.dtype != r.dtype:
            raise ValueError(f"{kernel}: {name} gradient {g.shape} {g.dtype}, expected {r.shape} {r.dtype}")
        g, r = g.astype(jnp.float32), r.astype(jnp.float32)
        out[name] = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
    return out


def model_agreement(mlm, kernel: str, batch) -> dict[str, float]:
    """:func:`agreement` on one batch of a model of :func:`build_pretraining_model`, with the
    model's weights as they are (``benchmarks/synthetic.py`` reports it beside a lever's timing)."""
    x, labels, weights = batch
    features = mlm(x, training=False)
    features = jnp.reshape(features, (-1, features.shape[-1]))
    embeddings = ops.convert_to_tensor(models.token_embedding(mlm.get_layer("encoder")).embeddings)
    bias = ops.convert_to_tensor(mlm.get_layer("mlm_head").output_bias)
    labels = jnp.reshape(jnp.asarray(labels, jnp.int32), (-1,))
    weights = jnp.reshape(jnp.asarray(weights, jnp.float32), (-1,))
    return agreement(kernel, features, embeddings.astype(features.dtype), bias, labels, weights)


class MaskedLMFeatures(keras.layers.Layer):
    """``keras_hub.layers.MaskedLMHead`` without its projection to the vocabulary.

    The masked positions' encodings through the head's intermediate dense layer and layer norm.
    The output bias is a weight of this layer, applied by :class:`LinearCrossEntropy`.
    Sublayers, weights and their order are the head's, so the pretraining model's weights load
    into a model with this head.

    Args:
        vocabulary_size: rows of the tied token embedding (the output bias's length).
        intermediate_activation: the head's intermediate activation.
        layer_norm_epsilon: the head's layer norm epsilon.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).
    """

    def __init__(self, vocabulary_size, intermediate_activation="relu", layer_norm_epsilon=1e-05, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.intermediate_activation = keras.activations.get(intermediate_activation)
        self.layer_norm_epsilon = layer_norm_epsilon

    def build(self, inputs_shape, mask_positions_shape=None):
        dim = inputs_shape[-1]
        self.intermediate_dense = keras.layers.Dense(
            dim, activation=self.intermediate_activation, dtype=self.dtype_policy, name="intermediate_dense"
        )
        self.intermediate_layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="intermediate_layer_norm"
        )
        self.intermediate_dense.build((inputs_shape[0], None, dim))
        self.intermediate_layer_norm.build((inputs_shape[0], None, dim))
        self.output_bias = self.add_weight(
            name="output_bias", shape=[self.vocabulary_size], initializer="zeros", dtype=self.dtype
        )

    def call(self, inputs, mask_positions):
        x = ops.take_along_axis(inputs, ops.expand_dims(mask_positions, axis=-1), axis=1)
        return self.intermediate_layer_norm(self.intermediate_dense(x))

    def compute_output_shape(self, inputs_shape, mask_positions_shape):
        return (inputs_shape[0], mask_positions_shape[1], inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "intermediate_activation": keras.activations.serialize(self.intermediate_activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


class LinearCrossEntropy(keras.losses.Loss):
    """The pipeline's MLM loss from :class:`MaskedLMFeatures`' output, by one of ``KERNELS``.

    It reads the tied embedding and the head's bias when called: inside Keras's stateless JAX
    step (``fit``'s and the bare step's) those are the traced values, so gradients reach them.

    Args:
        token_embedding: the encoder's ``ReversibleEmbedding``.
        head: the model's :class:`MaskedLMFeatures`.
        kernel: ``chunked`` or ``fused``.
        name: the loss's name.
    """

    def __init__(self, token_embedding, head, kernel="chunked", name=None):
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
        super().__init__(name=name or f"{kernel}_cross_entropy")
        self.token_embedding = token_embedding
        self.head = head
        self.kernel = kernel

    @classmethod
    def for_model(cls, mlm, kernel="chunked"):
        """The loss for a model of :func:`build_pretraining_model`."""
        return cls(models.token_embedding(mlm.get_layer("encoder")), mlm.get_layer("mlm_head"), kernel)

    def call(self, y_true, y_pred):
        dtype = self.head.compute_dtype
        features = ops.cast(ops.reshape(y_pred, (-1, y_pred.shape[-1])), dtype)  # Loss.__call__: float32
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        embeddings = ops.cast(ops.convert_to_tensor(self.token_embedding.embeddings), dtype)
        bias = ops.convert_to_tensor(self.head.output_bias)
        losses = KERNELS[self.kernel](features, embeddings, bias, labels)
        return ops.reshape(losses, ops.shape(y_true))

    def get_config(self):
        return {"name": self.name, "kernel": self.kernel}


def build_pretraining_model(encoder, predictions_per_seq: int):
    """``encoderflow.model.build_pretraining_model`` with :class:`MaskedLMFeatures` as its head: it
    returns the masked positions' features; :class:`LinearCrossEntropy` makes the logits."""
    seq_length = models.max_length(encoder)
    inputs = {
        "token_ids": keras.Input(shape=(seq_length,), dtype="int32", name="token_ids"),
        "mask_positions": keras.Input(shape=(predictions_per_seq,), dtype="int32", name="mask_positions"),
    }
    encoded = encoder(inputs["token_ids"])
    vocab = int(models.token_embedding(encoder).input_dim)
    outputs = MaskedLMFeatures(vocab, name="mlm_head")(encoded, mask_positions=inputs["mask_positions"])
    return keras.Model(inputs, outputs, name="pretraining_model")
