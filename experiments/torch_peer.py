"""PyTorch eager as a peer of the benchmark: a jbp model as the ``torch.nn.Module`` a PyTorch
user would write, with the same weights, one eager Adam step, and a check that both compute
the same loss and gradients.

:func:`peer_of` walks the jbp layer tree (``Layer.layers`` of the composites, each layer's
constructor name, arguments and ``info``) and builds the module from standard parts:

=================  =====================================================================
jbp                PyTorch
=================  =====================================================================
serial, mlp        ``nn.Sequential``
dense              ``nn.Linear``: its weight (out, in) is jbp's W (in, out) transposed
relu, tanh, ...    ``nn.ReLU``, ``nn.Tanh``, ... (the activation of the same name)
conv               ``nn.Conv1d``/``Conv2d`` on channels-first (B, C, L) / (B, C, H, W);
                   kernel (*k, C/G, O) -> (O, C/G, *k); "SAME" at stride 1 -> ``"same"``
conv_transpose     ``nn.ConvTranspose1d``/``2d``; kernel (*k, O/G, C) -> (C, O/G, *k)
max_pool           ``nn.MaxPool1d``/``2d``
group_norm         ``nn.GroupNorm`` (scale -> weight, offset -> bias)
global_avg_pool    the mean over the positions (:class:`MeanOver`)
flatten            ``nn.Flatten``; channels-first flattens (C, H, W) where jbp flattens
                   (H, W, C), so the next dense layer's weight columns are permuted
parallel           :class:`Branches`: sum, or concatenation along the channels
rnn, gru, lstm     ``nn.RNN`` (tanh), ``nn.GRU``, ``nn.LSTM``, ``batch_first``; the last
                   step's output when jbp's ``return_sequences=False`` (:class:`Recurrent`)
attention          :class:`SelfAttention`: ``nn.Linear`` q, k (no bias), v, o and
                   ``F.scaled_dot_product_attention(is_causal=causal)``
=================  =====================================================================

The recurrent cells compute what PyTorch's fused modules compute. jbp's gate blocks are
PyTorch's (GRU [r, z, n], LSTM [i, f, g, o]); its GRU puts the reset gate after the recurrent
product, ``n = tanh(x W_n + b_n + r·(h W_hn + b_hn))``, as ``nn.GRU`` does; the state starts
at zero. One difference is of parametrisation, not of function: PyTorch gives every gate two
biases, ``b_ih + b_hh``, where jbp has one ``b`` (and the GRU's ``b_hn``). The peer starts
with ``b_ih = b``, ``b_hh = 0`` (GRU: ``b_hh = [0, 0, b_hn]``), so its outputs and the
gradients of every weight equal jbp's, and the gradient of each redundant ``b_hh`` block
equals that of ``b``'s block; Adam then steps both halves of the sum, so after the first
step the two trainings are no longer the same function (the cost per step is one more bias
vector).

The data layout: a convolutional model's input (B, *positions, C) is moved to channels-first
once (:func:`torch_input`), outside any timed step, as a PyTorch user's data would arrive.
Other models take jbp's layout as it is: (B, features) or (B, T, features).

Layers without a peer here (dropout, normalisations other than group_norm, embeddings,
masks and side inputs, learned or reversed recurrent states, ...) raise
``NotImplementedError``; the benchmark then shows "—" for that point.
"""

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import jbp
from jbp.layer import out_shape

CONV_LAYERS = ("conv", "conv_transpose", "max_pool", "group_norm")
OPTIMIZER = "torch.optim.Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)"
ACTIVATIONS = {"relu": lambda a: nn.ReLU(), "tanh": lambda a: nn.Tanh(),
               "sigmoid": lambda a: nn.Sigmoid(), "identity": lambda a: nn.Identity(),
               "gelu": lambda a: nn.GELU(), "silu": lambda a: nn.SiLU(),
               "softplus": lambda a: nn.Softplus(),
               "elu": lambda a: nn.ELU(a["alpha"]),
               "leaky_relu": lambda a: nn.LeakyReLU(a["negative_slope"])}


class MeanOver(nn.Module):
    """The mean over ``dims``: jbp's global_avg_pool, (B, C, *positions) -> (B, C) for a
    channels-first input, (B, T, F) -> (B, F) otherwise."""

    def __init__(self, dims: tuple):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(dim=self.dims)


class Branches(nn.Module):
    """jbp's parallel: every branch on the same input, outputs summed or concatenated
    along ``dim`` (the channels: 1 channels-first, −1 otherwise)."""

    def __init__(self, branches, combine: str, dim: int):
        super().__init__()
        self.branches, self.combine, self.dim = nn.ModuleList(branches), combine, dim

    def forward(self, x):
        ys = [branch(x) for branch in self.branches]
        return sum(ys[1:], ys[0]) if self.combine == "sum" else torch.cat(ys, dim=self.dim)


class Recurrent(nn.Module):
    """``nn.RNN``/``GRU``/``LSTM`` (batch_first) on (B, T, F): the outputs (B, T, H), or
    with ``last`` the last step's (B, H)."""

    def __init__(self, cell: nn.Module, last: bool):
        super().__init__()
        self.cell, self.last = cell, last

    def forward(self, x):
        y, _ = self.cell(x)
        return y[:, -1] if self.last else y


class SelfAttention(nn.Module):
    """jbp.attention: (B, T, d) -> (B, T, d). q, k, v (B, T, H·Dh) are split into heads
    (B, H, T, Dh) as jbp's split_heads does; SDPA scales by 1/√Dh, as jbp."""

    def __init__(self, d: int, heads: int, head_dim: int, causal: bool):
        super().__init__()
        width = heads * head_dim
        self.heads, self.causal = heads, causal
        self.q, self.k = nn.Linear(d, width), nn.Linear(d, width, bias=False)
        self.v, self.o = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        b, t, _ = x.shape

        def split(a):
            return a.view(b, t, self.heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=self.causal)
        return self.o(o.transpose(1, 2).reshape(b, t, -1))


class Peer(NamedTuple):
    """A jbp model's PyTorch twin. ``to_torch(tree, grads=False)``: jbp params (or, with
    ``grads``, jbp gradients) as ``{module parameter name: np.ndarray}`` in PyTorch's
    layout; ``channels_first``: the module takes (B, C, *positions)."""

    module: nn.Module
    channels_first: bool
    to_torch: Callable


# ---------------------------------------------------------------------------- the walk
# Each builder: (layer, shape, state) -> (module, out_shape, state, mapping), where shape is
# the per-example jbp shape (channels last), state = (channels_first, perm) with perm the jbp
# feature index of each torch feature after a channels-first flatten (None: the same order),
# and mapping(params, grads) -> {name: array} for this layer's own parameters.

def _args(layer) -> dict:
    return dict(layer.spec.key[1]) if layer.spec is not None else {}


def _kind(layer) -> str:
    return layer.spec.constructor if layer.spec is not None else layer.name


def _np(a):
    return np.asarray(a, np.float32)


def _per_axis(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _torch_kernel(W):
    """A jbp kernel (*k, a, b) as PyTorch's (b, a, *k) (conv and conv_transpose alike)."""
    W = _np(W)
    n = W.ndim - 2
    return W.transpose(n + 1, n, *range(n))


def _no_perm(layer, state):
    if state[1] is not None:
        raise NotImplementedError(f"torch_peer: {layer.name} after a channels-first flatten")


def _leaves(layer):
    return [layer] if not layer.layers else [leaf for c in layer.layers for leaf in _leaves(c)]


def _sequence(children, shape, state, prefix="", side_by_side=False):
    """The children's modules, the shape and state after them, and their joint param map
    (PyTorch names ``{prefix}{i}.…``); ``side_by_side``: each child takes ``shape`` and
    ``state`` (a parallel's branches), else each takes the one before's output."""
    modules, maps = [], []
    for child in children:
        m, out, new_state, f = _build(child, shape, state)
        modules.append(m)
        maps.append(f)
        if not side_by_side:
            shape, state = out, new_state

    def mapping(params, grads):
        return {f"{prefix}{i}.{k}": v for i, (f, p) in enumerate(zip(maps, params))
                for k, v in f(p, grads).items()}
    return modules, shape, state, mapping


def _build(layer, shape, state):
    kind, args, cf = _kind(layer), _args(layer), state[0]
    spatial = len(shape) > 1
    if kind in ("serial", "mlp"):  # remat_every changes what is kept, not the function
        modules, shape, state, mapping = _sequence(layer.layers, shape, state)
        return nn.Sequential(*modules), shape, state, mapping
    if kind in ACTIVATIONS:
        return ACTIVATIONS[kind](args), shape, state, lambda p, g: {}
    new_shape = tuple(out_shape(layer, shape))
    if kind == "dense":
        if spatial and cf:
            raise NotImplementedError("torch_peer: dense on a channels-first (B, C, ...) tensor")
        perm, n_in, n_out = state[1], shape[-1], new_shape[-1]

        def dense_map(p, grads):
            W = _np(p["W"])
            out = {"weight": (W if perm is None else W[perm]).T}
            return {**out, "bias": _np(p["b"])} if "b" in p else out
        return (nn.Linear(n_in, n_out, bias=args["use_bias"]), new_shape, (cf, None),
                dense_map)
    _no_perm(layer, state)
    if kind in ("conv", "conv_transpose"):
        info, n = layer.info, len(shape) - 1
        stride, dilation, size = (_per_axis(v, n) for v in (info.stride, info.dilation,
                                                            info.kernel_size))
        padding = info.padding
        if padding == "SAME" and not info.transposed and set(stride) == {1}:
            padding = "same"  # torch pads the smaller half in front, as jbp
        elif padding == "VALID":
            padding = 0
        elif isinstance(padding, tuple) and all(lo == hi for lo, hi in padding):
            padding = tuple(lo for lo, _ in padding)
        elif not isinstance(padding, int):
            raise NotImplementedError(f"torch_peer: {layer.name}: padding {padding!r}")
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=info.groups,
                  bias=args["use_bias"])
        if info.transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d)[n - 1]
            kw["output_padding"] = _per_axis(info.output_padding, n)
        else:
            cls = (nn.Conv1d, nn.Conv2d)[n - 1]
        module = cls(shape[-1], new_shape[-1], size, **kw)

        def conv_map(p, grads):
            out = {"weight": _torch_kernel(p["W"])}
            return {**out, "bias": _np(p["b"])} if "b" in p else out
        return module, new_shape, state, conv_map
    if kind == "max_pool":
        n = len(shape) - 1
        window, stride, padding = args["window"], args["stride"], args["padding"]
        if padding != "VALID":
            raise NotImplementedError(f"torch_peer: {layer.name}: padding {padding!r}")
        cls = (nn.MaxPool1d, nn.MaxPool2d)[n - 1]
        return cls(window, stride if stride is not None else window), new_shape, state, \
            lambda p, g: {}
    if kind == "group_norm":
        if spatial and not cf:
            raise NotImplementedError("torch_peer: group_norm on a channels-last tensor")
        return (nn.GroupNorm(args["groups"], shape[-1], eps=args["eps"]), new_shape, state,
                lambda p, g: {"weight": _np(p["scale"]), "bias": _np(p["offset"])})
    if kind == "global_avg_pool":
        dims = tuple(range(2, len(shape) + 1)) if cf else tuple(range(1, len(shape)))
        return MeanOver(dims), new_shape, state, lambda p, g: {}
    if kind == "flatten":
        perm = None
        if cf and spatial:  # torch flattens (C, *positions); jbp (*positions, C)
            perm = np.moveaxis(np.arange(math.prod(shape)).reshape(shape), -1, 0).ravel()
        return nn.Flatten(), new_shape, (cf, perm), lambda p, g: {}
    if kind == "parallel":
        branches, _, _, branch_map = _sequence(layer.layers, shape, state, "branches.",
                                               side_by_side=True)
        return (Branches(branches, args["combine"], 1 if cf else -1), new_shape, state,
                branch_map)
    if kind in ("rnn", "gru", "lstm"):
        return _recurrent(layer, kind, shape, new_shape, state)
    if kind == "attention":
        module = SelfAttention(shape[-1], args["heads"], args["head_dim"], args["causal"])

        def attention_map(p, grads):
            out = {}
            for name in ("q", "k", "v", "o"):
                out[f"{name}.weight"] = _np(p[name]["W"]).T
                if "b" in p[name]:
                    out[f"{name}.bias"] = _np(p[name]["b"])
            return out
        return module, new_shape, state, attention_map
    raise NotImplementedError(f"torch_peer: no PyTorch peer for {layer.name}")


def _recurrent(layer, kind, shape, new_shape, state):
    """nn.RNN/GRU/LSTM: weight_ih = W_xᵀ, weight_hh = W_hᵀ, bias_ih = b, bias_hh = 0 (GRU:
    [0, 0, b_hn]). As gradients, each redundant bias_hh block takes b's block (b_ih and b_hh
    enter every pre-activation as a sum)."""
    opts = layer.info
    if opts.initial_state != "zeros" or opts.reverse:
        raise NotImplementedError(f"torch_peer: {layer.name}: only a forward scan from a zero "
                                  f"state has a fused PyTorch peer here")
    features, H = shape[-1], opts.hidden
    cls = {"rnn": lambda: nn.RNN(features, H, nonlinearity="tanh", batch_first=True),
           "gru": lambda: nn.GRU(features, H, batch_first=True),
           "lstm": lambda: nn.LSTM(features, H, batch_first=True)}[kind]

    def mapping(p, grads):
        b = _np(p["b"])
        if kind == "gru":
            b_hh = np.concatenate([b[:2 * H] if grads else np.zeros(2 * H, np.float32),
                                   _np(p["b_hn"])])
        else:
            b_hh = b.copy() if grads else np.zeros_like(b)
        return {"cell.weight_ih_l0": _np(p["W_x"]).T, "cell.weight_hh_l0": _np(p["W_h"]).T,
                "cell.bias_ih_l0": b, "cell.bias_hh_l0": b_hh}
    return Recurrent(cls(), not opts.return_sequences), new_shape, state, mapping


# ---------------------------------------------------------------------------- the API

def peer_of(model: jbp.Layer, in_shape, params) -> Peer:
    """The PyTorch twin of ``model`` (per-example input ``in_shape``, jbp's layout) holding
    ``params`` (a pytree of arrays, as ``model.init`` gives them), as float32.

    A model with a convolution, transposed convolution, max pool or group norm takes its
    input channels-first; raises ``NotImplementedError`` for a layer without a peer.
    """
    shape = tuple(in_shape)
    leaves = {_kind(leaf) for leaf in _leaves(model)}
    cf = bool(leaves & set(CONV_LAYERS))
    if cf and leaves & {"rnn", "gru", "lstm", "attention"}:
        raise NotImplementedError("torch_peer: convolutions and sequence layers in one model")
    module, _, _, mapping = _build(model, shape, (cf, None))
    module = module.float()
    peer = Peer(module, cf, lambda tree, grads=False: mapping(tree, grads))
    load(peer, params)
    return peer


def load(peer: Peer, params) -> None:
    """Copy jbp ``params`` into the module (every parameter, strictly: a missing or extra
    name is an error)."""
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in peer.to_torch(params).items()}
    peer.module.load_state_dict(state, strict=True)


def torch_input(peer: Peer, x) -> torch.Tensor:
    """jbp's input ``x (B, *positions, C)`` as a float32 tensor in the module's layout:
    ``(B, C, *positions)`` channels-first, else unchanged. Copied once."""
    x = np.array(x, np.float32)  # a writable copy
    if peer.channels_first and x.ndim > 2:
        x = np.moveaxis(x, -1, 1)
    return torch.from_numpy(np.ascontiguousarray(x))


def torch_labels(y) -> torch.Tensor:
    """Integer labels ``(B,)`` as int64, what ``F.cross_entropy`` takes."""
    return torch.from_numpy(np.asarray(y).astype(np.int64))


def torch_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    """Adam as optax.adam(1e-3): betas (0.9, 0.999), eps 1e-8 added to √v̂."""
    return torch.optim.Adam(module.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def torch_step(module: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One eager training step on ``x`` (module layout) and labels ``y (B,)``: zero the
    gradients, forward, mean softmax cross-entropy, backward, Adam step. Returns the loss
    (``.item()``: the step has finished when it returns)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def _leaf_errors(got: dict, want: dict, rms: float) -> dict:
    """``max|got − want| / max(max|want|, rms)`` per parameter named on either side (inf:
    missing from one, or misshapen)."""
    errors = {}
    for name in want.keys() | got.keys():
        g, ref = got.get(name), want.get(name)
        if g is None or ref is None or g.shape != ref.shape:
            errors[name] = math.inf
            continue
        scale = max(float(np.abs(ref).max()), rms, np.finfo(np.float32).tiny)
        errors[name] = float(np.abs(g - ref).max()) / scale
    return errors


def agreement(peer: Peer, x: torch.Tensor, y: torch.Tensor, loss_jbp, grads_jbp, *,
              rtol: float = 1e-3, grads_exact=None) -> dict:
    """Does the module compute jbp's loss and gradients at its current weights?

    ``x, y``: the batch (:func:`torch_input`, :func:`torch_labels`); ``loss_jbp``,
    ``grads_jbp``: jbp's at the params the module was loaded with. Each parameter's error is
    ``max|g_torch − g_jbp| / max(max|g_jbp|, rms)`` (jbp's gradient mapped to PyTorch's
    layout): relative to the leaf's largest entry, floored at the root mean square of every
    entry of jbp's gradient, since a leaf whose exact gradient is zero (a conv bias before a
    group norm of one channel per group) holds rounding noise on both sides (the leaves the
    floor judged are listed in ``floored``). The loss's error is relative. ``ok``: all at
    most ``rtol``.

    ``grads_exact``: jbp's gradient in float64 at the same params, where two float32
    gradients of a large point differ by more than ``rtol`` through rounding alone (sums
    over 10⁵ terms in another order). Then both float32 gradients are judged against it,
    and a parameter passes whose torch error is at most ``max(rtol, 10 ×`` jbp's own float32
    error``)`` (``exact`` in the result). Leaves no gradients behind.
    """
    module = peer.module
    module.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    got = {name: p.grad.detach().numpy().astype(np.float64)
           for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    want = {k: v.astype(np.float64) for k, v in peer.to_torch(grads_jbp, grads=True).items()}
    rms = math.sqrt(sum(float(np.sum(v * v)) for v in want.values())
                    / max(sum(v.size for v in want.values()), 1))
    floored = [k for k, v in want.items() if float(np.abs(v).max()) < rms]
    if grads_exact is None:
        errors = _leaf_errors(got, want, rms)
        bounds, exact = dict.fromkeys(errors, rtol), None
    else:
        truth = {k: v.astype(np.float64)
                 for k, v in peer.to_torch(grads_exact, grads=True).items()}
        errors, jbp_errors = _leaf_errors(got, truth, rms), _leaf_errors(want, truth, rms)
        bounds = {k: max(rtol, 10 * jbp_errors.get(k, 0.0)) for k in errors}
        exact = {"torch_max_err": max(errors.values()), "jbp_max_err": max(jbp_errors.values())}
    loss_jbp, loss_torch = float(loss_jbp), float(loss.item())
    loss_err = abs(loss_torch - loss_jbp) / max(abs(loss_jbp), np.finfo(np.float32).tiny)
    worst = max(errors, key=lambda k: errors[k] / bounds[k])
    return {"loss_jbp": loss_jbp, "loss_torch": loss_torch, "loss_rel_err": loss_err,
            "max_rel_grad_err": errors[worst], "worst_param": worst, "floored": floored,
            "rtol": rtol, "exact": exact,
            "ok": bool(loss_err <= rtol and all(errors[k] <= bounds[k] for k in errors))}


def about() -> dict:
    """What the PyTorch column ran on: version, threads, optimizer."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "optimizer": OPTIMIZER,
            "mode": "eager", "dtype": "float32"}
