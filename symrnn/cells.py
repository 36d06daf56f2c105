"""Built-in cells, each traced to the document its equations come from.

Seeds 000-004 are the lecture-note documents in ``shared/seeds``; the
``*_torch`` cells follow PyTorch's ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (gate
order, two biases, parameter names and shapes), so weights can be exchanged
with a torch module's ``state_dict()`` (layer 0).  The cells of
:data:`SPEC_CELLS` are spec files shipped in ``symrnn/specs/`` (MGU, IndRNN,
minGRU, peephole LSTM, LSTM with a forget-gate bias, AntisymmetricRNN, Griffin's
RG-LRU), each citing its paper in its header.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable

import sympy

from .cell import Cell, Loss, Param, params
from .errors import UserError, suggest
from .ops import sigmoid, tanh

__all__ = ["BUILTIN", "SPEC_CELLS", "builtin", "builtin_names", "spec_path"]

#: built-in cells written as spec files (``symrnn/specs/<name>.toml``)
SPEC_CELLS = ("mgu", "indrnn", "mingru", "lstm_peephole", "lstm_forget_bias", "antisymmetric_rnn", "rg_lru",
              "layer_norm_lstm", "elman_classifier")


def spec_path(name: str):
    """The shipped spec file of a built-in cell (a path-like resource of the package)."""
    return importlib.resources.files("symrnn.specs") / f"{name}.toml"


def _shipped(name: str) -> Callable[[], Cell]:
    def factory() -> Cell:
        from .spec import parse_spec

        return parse_spec(spec_path(name).read_text(encoding="utf-8"), f"symrnn/specs/{name}.toml")

    return factory


def _syms(names: str):
    return sympy.symbols(names)


def elman() -> Cell:
    x, s_prev, s, z, y, target = _syms("x s_prev s z y target")
    U, W, V = params("U W V")
    return Cell(
        name="elman",
        source="seeds 000/001",
        description="Elman RNN: Z = U X + W S^{t-1}, S = tanh(Z), Y = V S; squared error summed over time",
        inputs={"x": "n_in"},
        states={"s": "n_hidden"},
        params={"U": ("n_hidden", "n_in"), "W": ("n_hidden", "n_hidden"), "V": ("n_out", "n_hidden")},
        equations={"z": U @ x + W @ s_prev, "s": tanh(z)},
        readout={"y": V @ s},
        loss=Loss((y - target) ** 2, reduction="sum"),
    )


def single_sigmoid() -> Cell:
    x, h_prev, h, a, y, target = _syms("x h_prev h a y target")
    w, v, b, u, d = params("w v b u d")
    return Cell(
        name="single_sigmoid",
        source="seed 002",
        description="one sigmoid hidden unit: a = w x + v h^{t-1} + b, h = sigma(a), y = u h + d; "
        "L = mean over time of (target - y)^2 / 2",
        inputs={"x": "n_in"},
        states={"h": "n_hidden"},
        params={name: () for name in ("w", "v", "b", "u", "d")},
        equations={"a": w * x + v * h_prev + b, "h": sigmoid(a)},
        readout={"y": u * h + d},
        loss=Loss((target - y) ** 2 / 2, reduction="mean"),
        dims={"n_in": 1, "n_hidden": 1, "n_out": 1},
    )


def lstm(bias: bool = True) -> Cell:
    """LSTM of seed 003 (gates from [h_{t-1}; x_t], with biases) or, with
    ``bias=False``, of seed 004 (separate input and recurrent matrices, no biases)."""
    x, h_prev, c_prev, h, c = _syms("x h_prev c_prev h c")
    if not bias:
        f, i, c_tilde, o = _syms("f i c_tilde o")
        W = params("W_fx W_fh W_ix W_ih W_cx W_ch W_ox W_oh")
        W_fx, W_fh, W_ix, W_ih, W_cx, W_ch, W_ox, W_oh = W
        return Cell(
            name="lstm_nobias",
            source="seed 004",
            description="LSTM without biases: f, i, o = sigma(W_*x x + W_*h h), c~ = tanh(W_cx x + W_ch h), "
            "c = f c + i c~, h = o tanh(c)",
            inputs={"x": "n_in"},
            states={"h": "n_hidden", "c": "n_hidden"},
            params={p.name: ("n_hidden", "n_in" if p.name.endswith("x") else "n_hidden") for p in W},
            equations={
                "f": sigmoid(W_fx @ x + W_fh @ h_prev),
                "i": sigmoid(W_ix @ x + W_ih @ h_prev),
                "c_tilde": tanh(W_cx @ x + W_ch @ h_prev),
                "c": f * c_prev + i * c_tilde,
                "o": sigmoid(W_ox @ x + W_oh @ h_prev),
                "h": o * tanh(c),
            },
        )
    f, i, o, g = _syms("f i o g")
    W_f, W_i, W_o, W_g, b_f, b_i, b_o, b_g = params("W_f W_i W_o W_g b_f b_i b_o b_g")
    hx = (h_prev, x)
    return Cell(
        name="lstm",
        source="seed 003",
        description="LSTM: f, i, o = sigma(W_* [h_{t-1}; x_t] + b_*), g = tanh(W_g [h_{t-1}; x_t] + b_g), "
        "c = f c + i g, h = o tanh(c)",
        inputs={"x": "n_in"},
        states={"h": "n_hidden", "c": "n_hidden"},
        params={
            **{f"W_{k}": ("n_hidden", "n_hidden + n_in") for k in "fiog"},
            **{f"b_{k}": ("n_hidden",) for k in "fiog"},
        },
        equations={
            "f": sigmoid(W_f @ hx + b_f),
            "i": sigmoid(W_i @ hx + b_i),
            "o": sigmoid(W_o @ hx + b_o),
            "g": tanh(W_g @ hx + b_g),
            "c": f * c_prev + i * g,
            "h": o * tanh(c),
        },
    )


def gru(bias: bool = True) -> Cell:
    """GRU of seed 003 (reset gate applied before the matrix product, with
    biases) or, with ``bias=False``, of seed 004 (no biases)."""
    x, h_prev, h, z, r, h_tilde = _syms("x h_prev h z r h_tilde")
    if not bias:
        W = params("W_zx W_zh W_rx W_rh W_hx W_hh")
        W_zx, W_zh, W_rx, W_rh, W_hx, W_hh = W
        return Cell(
            name="gru_nobias",
            source="seed 004",
            description="GRU without biases: z, r = sigma(W_*x x + W_*h h), h~ = tanh(W_hx x + W_hh (r h)), "
            "h = (1 - z) h + z h~",
            inputs={"x": "n_in"},
            states={"h": "n_hidden"},
            params={p.name: ("n_hidden", "n_in" if p.name.endswith("x") else "n_hidden") for p in W},
            equations={
                "z": sigmoid(W_zx @ x + W_zh @ h_prev),
                "r": sigmoid(W_rx @ x + W_rh @ h_prev),
                "h_tilde": tanh(W_hx @ x + W_hh @ (r * h_prev)),
                "h": (1 - z) * h_prev + z * h_tilde,
            },
        )
    W_rz, b_rz, W_h, b_h = params("W_rz b_rz W_h b_h")
    return Cell(
        name="gru",
        source="seed 003",
        description="GRU: (z; r) = sigma(W_rz [h_{t-1}; x_t] + b_rz), h~ = tanh(W_h [r h_{t-1}; x_t] + b_h), "
        "h = (1 - z) h + z h~",
        inputs={"x": "n_in"},
        states={"h": "n_hidden"},
        params={
            "W_rz": Param(("2*n_hidden", "n_hidden + n_in"), blocks=2),
            "b_rz": Param(("2*n_hidden",), blocks=2),
            "W_h": ("n_hidden", "n_hidden + n_in"),
            "b_h": ("n_hidden",),
        },
        equations={
            "z": sigmoid(W_rz[0] @ (h_prev, x) + b_rz[0]),
            "r": sigmoid(W_rz[1] @ (h_prev, x) + b_rz[1]),
            "h_tilde": tanh(W_h @ (r * h_prev, x) + b_h),
            "h": (1 - z) * h_prev + z * h_tilde,
        },
    )


def elman_out() -> Cell:
    x, h_prev, h, y, target = _syms("x h_prev h y target")
    W_x, W_h, b_h, W_y, b_y = params("W_x W_h b_h W_y b_y")
    return Cell(
        name="elman_out",
        source="seed 004",
        description="Elman RNN with output nonlinearity: h = tanh(W_x x + W_h h + b_h), y = tanh(W_y h + b_y); "
        "L = mean over time of (y - target)^2 / 2",
        inputs={"x": "n_in"},
        states={"h": "n_hidden"},
        params={
            "W_x": ("n_hidden", "n_in"),
            "W_h": ("n_hidden", "n_hidden"),
            "b_h": ("n_hidden",),
            "W_y": ("n_out", "n_hidden"),
            "b_y": ("n_out",),
        },
        equations={"h": tanh(W_x @ x + W_h @ h_prev + b_h)},
        readout={"y": tanh(W_y @ h + b_y)},
        loss=Loss((y - target) ** 2 / 2, reduction="mean"),
    )


def _torch_params(gates: int) -> dict[str, Param]:
    return {
        "weight_ih_l0": Param((f"{gates}*n_hidden", "n_in"), blocks=gates),
        "weight_hh_l0": Param((f"{gates}*n_hidden", "n_hidden"), blocks=gates),
        "bias_ih_l0": Param((f"{gates}*n_hidden",), blocks=gates),
        "bias_hh_l0": Param((f"{gates}*n_hidden",), blocks=gates),
    }


def rnn_tanh_torch() -> Cell:
    x, h_prev = _syms("x h_prev")
    W_ih, W_hh, b_ih, b_hh = params("weight_ih_l0 weight_hh_l0 bias_ih_l0 bias_hh_l0")
    return Cell(
        name="rnn_tanh_torch",
        source="PyTorch nn.RNN(nonlinearity='tanh')",
        description="h = tanh(W_ih x + b_ih + W_hh h + b_hh)",
        inputs={"x": "n_in"},
        states={"h": "n_hidden"},
        params=_torch_params(1),
        equations={"h": tanh(W_ih[0] @ x + b_ih[0] + W_hh[0] @ h_prev + b_hh[0])},
    )


def lstm_torch() -> Cell:
    x, h_prev, c_prev, i, f, g, o, c = _syms("x h_prev c_prev i f g o c")
    W_ih, W_hh, b_ih, b_hh = params("weight_ih_l0 weight_hh_l0 bias_ih_l0 bias_hh_l0")

    def pre(k):
        return W_ih[k] @ x + b_ih[k] + W_hh[k] @ h_prev + b_hh[k]

    return Cell(
        name="lstm_torch",
        source="PyTorch nn.LSTM",
        description="gates i, f, g, o stacked in that order; c = f c + i g, h = o tanh(c)",
        inputs={"x": "n_in"},
        states={"h": "n_hidden", "c": "n_hidden"},
        params=_torch_params(4),
        equations={
            "i": sigmoid(pre(0)),
            "f": sigmoid(pre(1)),
            "g": tanh(pre(2)),
            "o": sigmoid(pre(3)),
            "c": f * c_prev + i * g,
            "h": o * tanh(c),
        },
    )


def gru_torch() -> Cell:
    x, h_prev, r, z, n = _syms("x h_prev r z n")
    W_ih, W_hh, b_ih, b_hh = params("weight_ih_l0 weight_hh_l0 bias_ih_l0 bias_hh_l0")
    return Cell(
        name="gru_torch",
        source="PyTorch nn.GRU",
        description="gates r, z, n stacked in that order; reset applied after the recurrent product, "
        "h = (1 - z) n + z h",
        inputs={"x": "n_in"},
        states={"h": "n_hidden"},
        params=_torch_params(3),
        equations={
            "r": sigmoid(W_ih[0] @ x + b_ih[0] + W_hh[0] @ h_prev + b_hh[0]),
            "z": sigmoid(W_ih[1] @ x + b_ih[1] + W_hh[1] @ h_prev + b_hh[1]),
            "n": tanh(W_ih[2] @ x + b_ih[2] + r * (W_hh[2] @ h_prev + b_hh[2])),
            "h": (1 - z) * n + z * h_prev,
        },
    )


#: name -> factory, in the order ``symrnn list`` prints them
BUILTIN: dict[str, Callable[[], Cell]] = {
    "elman": elman,
    "single_sigmoid": single_sigmoid,
    "lstm": lstm,
    "lstm_nobias": lambda: lstm(bias=False),
    "gru": gru,
    "gru_nobias": lambda: gru(bias=False),
    "elman_out": elman_out,
    "rnn_tanh_torch": rnn_tanh_torch,
    "lstm_torch": lstm_torch,
    "gru_torch": gru_torch,
    **{name: _shipped(name) for name in SPEC_CELLS},
}


def builtin_names() -> list[str]:
    """The names of the built-in cells, in the order ``symrnn list`` prints them."""
    return list(BUILTIN)


def builtin(name: str) -> Cell:
    """The built-in cell ``name``; a UserError listing the valid names otherwise."""
    try:
        return BUILTIN[name]()
    except KeyError:
        raise UserError(
            f"unknown cell '{name}'{suggest(name, BUILTIN)}; built-in cells: {', '.join(BUILTIN)}"
        ) from None
