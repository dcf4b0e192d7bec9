"""jbp: backpropagation by hand and by ``jax.grad``, side by side.

A network is a :class:`Layer` of pure functions (``init``, ``forward``, ``backward``,
``apply``). Every layer's ``backward`` is written by hand in ``jax.numpy``; the same
forward is also differentiated by ``jax.grad``. Both gradients share one signature,
``(params, x, y) -> (loss, grads)``, so either can drive training or a benchmark.

>>> import jax, jbp
>>> model = jbp.mlp([4, 8, 3], activation="tanh")
>>> _, params = model.init(jax.random.key(0), (4,))
>>> x, y = jax.numpy.ones((2, 4)), jax.numpy.array([0, 2])
>>> loss = jbp.losses.softmax_cross_entropy
>>> manual = jbp.manual_value_and_grad(model, loss)(params, x, y)[1]
>>> auto = jbp.autodiff_value_and_grad(model, loss)(params, x, y)[1]
>>> jbp.compare_grads(manual, auto).ok
True
"""

from jbp import checkpoint, data, losses
from jbp.layers import activations
from jbp.layers.activations import (elementwise, elu, gelu, identity, leaky_relu, relu, sigmoid, silu,
                             softplus, tanh)
from jbp.bridge import as_custom_vjp
from jbp.layers.attention import attention
from jbp.check import (GradComparison, compare_grads, finite_difference_grad,
                       numerical_value_and_grad)
from jbp.check_layer import LayerReport, check_layer
from jbp.curvature import ggn_diagonal, hvp
from jbp.layers.branches import parallel, residual
from jbp.layers.conv import conv, conv_transpose
from jbp.layers.dense import dense
from jbp.layers.dropout import dropout
from jbp.layers.embedding import embedding
from jbp.layers.flatten import flatten
from jbp.grads import autodiff_value_and_grad, backprop, manual_value_and_grad
from jbp.kfac import kfac
from jbp.kronecker import kronecker_factors
from jbp.layer import EXAMPLEWISE, Layer, PerExampleRule, constructor
from jbp.losses import IGNORE_LABEL, Loss
from jbp.layers.maxout import maxout
from jbp.layers.memory import remat, reversible, reversible_serial
from jbp.layers.norm import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from jbp.layers.pool import avg_pool, global_avg_pool, global_max_pool, max_pool
from jbp.layers.recurrent import bidirectional, gru, lstm, rnn
from jbp.per_example import (clipped_grad_mean, per_example_grad_norms, per_example_grad_variance,
                             per_example_grads)
from jbp.layers.serial import mlp, serial
from jbp.layers.seq2seq import cross_attention, decoder_block, encoder_decoder, on_target
from jbp.layers.transformer import positional_embedding, transformer_block
from jbp.layers.upsample import upsample
from jbp.train import fit
from jbp.saving import load_model, predict, register_constructor, save_model
from jbp.model_summary import print_summary, summary
from jbp import data_parallel, distributed
from jbp.data_parallel import data_mesh, data_parallel_value_and_grad

__version__ = "0.1.0"

__all__ = [
    # modules
    "activations", "checkpoint", "data", "losses",
    # the layer protocol and the layers
    "Layer", "PerExampleRule", "EXAMPLEWISE", "constructor", "check_layer", "LayerReport",
    "dense", "dropout", "flatten", "maxout", "serial", "mlp", "residual", "parallel",
    "remat", "reversible", "reversible_serial",
    "conv", "conv_transpose", "upsample", "max_pool", "avg_pool", "global_avg_pool",
    "global_max_pool", "layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm",
    "embedding",
    "rnn", "gru", "lstm", "bidirectional",
    "attention", "positional_embedding", "transformer_block",
    "cross_attention", "decoder_block", "encoder_decoder", "on_target",
    "elementwise",
    "elu", "gelu", "identity", "leaky_relu", "relu", "sigmoid", "silu", "softplus", "tanh",
    # gradients and checking them
    "Loss", "IGNORE_LABEL", "manual_value_and_grad", "autodiff_value_and_grad", "backprop",
    "numerical_value_and_grad", "finite_difference_grad", "compare_grads", "GradComparison",
    # training, saving, inference, a model's table
    "fit", "save_model", "load_model", "predict", "register_constructor", "summary",
    "print_summary",
    # beyond the gradient
    "as_custom_vjp", "per_example_grads", "per_example_grad_norms", "per_example_grad_variance",
    "clipped_grad_mean", "hvp", "ggn_diagonal", "kronecker_factors", "kfac",
    # data parallelism over devices and hosts
    "data_parallel", "distributed", "data_mesh", "data_parallel_value_and_grad",
]
