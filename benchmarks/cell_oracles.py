"""The benchmarked cells written by hand from their equations, for JAX and torch.

Each cell is ``cell(p, m, H) -> (pre, step)`` over an array namespace ``m`` (``sigmoid``,
``tanh``, ``relu``, ``sqrt``, ``mean`` over the units: :func:`namespace`), so that the same lines run in
``jax.lax.scan`` and in torch (eager, or ``torch.compile`` of ``step``):

* ``pre(xs)``: what depends on the input only, every step at once (the input projections:
  one GEMM each, as the generated modules and benchmarks/rnn_cpu.py's JAX oracle do it);
* ``step(s, a)``: one step, the states ``s`` and step t of ``pre``'s arrays ``a`` -> new states;
* ``READOUTS[cell](p, m, hs)``: the readouts, every step at once from h of every step (cells
  that have them).

The benchmarks' loss is the sum of h and of every readout over all steps (every value the
modules compute is then needed: a readout the loss ignored would be dead code to JAX and torch).

``p`` holds the parameters under the generated modules' names and shapes (symrnn/specs/*.toml;
the torch-convention cells as torch documents nn.RNN/nn.LSTM/nn.GRU).  They are written from
the equations, not from symrnn's output; custom_cpu.py checks each against the NumPy module's
gradients before timing it.
"""

from __future__ import annotations

from types import SimpleNamespace


def namespace(kind: str):
    """The array functions the cells use, in JAX or torch."""
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        return SimpleNamespace(sigmoid=jax.nn.sigmoid, tanh=jnp.tanh, relu=jax.nn.relu, sqrt=jnp.sqrt, eye=jnp.eye,
                               mean=lambda v: jnp.mean(v, axis=-1, keepdims=True),
                               logsumexp=lambda v: jax.nn.logsumexp(v, axis=-1, keepdims=True))
    import torch

    return SimpleNamespace(sigmoid=torch.sigmoid, tanh=torch.tanh, relu=torch.relu, sqrt=torch.sqrt,
                           eye=lambda n, dtype: torch.eye(n, dtype=dtype), mean=lambda v: v.mean(-1, keepdim=True),
                           logsumexp=lambda v: torch.logsumexp(v, -1, keepdim=True))


def _split(w, H):
    """W @ (h_prev, x) = W[:, :H] @ h_prev + W[:, H:] @ x."""
    return w[:, :H], w[:, H:]


def rnn_tanh_torch(p, m, H):
    def pre(xs):
        return {"x": xs @ p["weight_ih_l0"].T + p["bias_ih_l0"]}

    def step(s, a):
        return {"h": m.tanh(a["x"] + s["h"] @ p["weight_hh_l0"].T + p["bias_hh_l0"])}
    return pre, step


def lstm_torch(p, m, H):
    def pre(xs):
        return {"x": xs @ p["weight_ih_l0"].T + p["bias_ih_l0"]}

    def step(s, a):
        z = a["x"] + s["h"] @ p["weight_hh_l0"].T + p["bias_hh_l0"]
        i, f, g, o = m.sigmoid(z[:, :H]), m.sigmoid(z[:, H:2 * H]), m.tanh(z[:, 2 * H:3 * H]), m.sigmoid(z[:, 3 * H:])
        c = f * s["c"] + i * g
        return {"h": o * m.tanh(c), "c": c}
    return pre, step


def gru_torch(p, m, H):
    def pre(xs):
        return {"x": xs @ p["weight_ih_l0"].T + p["bias_ih_l0"]}

    def step(s, a):
        hh = s["h"] @ p["weight_hh_l0"].T + p["bias_hh_l0"]
        r = m.sigmoid(a["x"][:, :H] + hh[:, :H])
        z = m.sigmoid(a["x"][:, H:2 * H] + hh[:, H:2 * H])
        n = m.tanh(a["x"][:, 2 * H:] + r * hh[:, 2 * H:])
        return {"h": (1 - z) * n + z * s["h"]}
    return pre, step


def mgu(p, m, H):
    (wfh, wfx), (whh, whx) = _split(p["W_f"], H), _split(p["W_h"], H)

    def pre(xs):
        return {"f": xs @ wfx.T + p["b_f"], "h": xs @ whx.T + p["b_h"]}

    def step(s, a):
        h = s["h"]
        f = m.sigmoid(h @ wfh.T + a["f"])
        h_tilde = m.tanh((f * h) @ whh.T + a["h"])
        return {"h": (1 - f) * h + f * h_tilde}
    return pre, step


def indrnn(p, m, H):
    def pre(xs):
        return {"x": xs @ p["W"].T + p["b"]}

    def step(s, a):
        return {"h": m.relu(a["x"] + p["u"] * s["h"])}
    return pre, step


def mingru(p, m, H):
    def pre(xs):
        return {"z": m.sigmoid(xs @ p["W_z"].T + p["b_z"]), "h": xs @ p["W_h"].T + p["b_h"]}

    def step(s, a):
        return {"h": (1 - a["z"]) * s["h"] + a["z"] * a["h"]}
    return pre, step


def _lstm_gates(p, H):
    gates = "ifgo"
    split = {g: _split(p[f"W_{g}"], H) for g in gates}

    def pre(xs):
        return {g: xs @ split[g][1].T + p[f"b_{g}"] for g in gates}

    def rec(s, a, g):
        return s["h"] @ split[g][0].T + a[g]
    return pre, rec


def lstm_peephole(p, m, H):
    pre, rec = _lstm_gates(p, H)

    def step(s, a):
        c_prev = s["c"]
        i = m.sigmoid(rec(s, a, "i") + p["p_i"] * c_prev)
        f = m.sigmoid(rec(s, a, "f") + p["p_f"] * c_prev)
        g = m.tanh(rec(s, a, "g"))
        c = f * c_prev + i * g
        o = m.sigmoid(rec(s, a, "o") + p["p_o"] * c)
        return {"h": o * m.tanh(c), "c": c}
    return pre, step


def lstm_forget_bias(p, m, H, forget_bias=1.0):
    pre, rec = _lstm_gates(p, H)

    def step(s, a):
        i = m.sigmoid(rec(s, a, "i"))
        f = m.sigmoid(rec(s, a, "f") + forget_bias)
        g = m.tanh(rec(s, a, "g"))
        o = m.sigmoid(rec(s, a, "o"))
        c = f * s["c"] + i * g
        return {"h": o * m.tanh(c), "c": c}
    return pre, step


def antisymmetric_rnn(p, m, H, eps=0.1, gamma=0.01):
    def pre(xs):
        return {"x": xs @ p["V"].T + p["b"]}

    def step(s, a):
        w = p["W"] - p["W"].T - gamma * m.eye(H, dtype=p["W"].dtype)
        return {"h": s["h"] + eps * m.tanh(s["h"] @ w.T + a["x"])}
    return pre, step


def rg_lru(p, m, H, c=8):
    def pre(xs):
        return {"r": m.sigmoid(xs @ p["W_a"].T + p["b_a"]), "ix": m.sigmoid(xs @ p["W_x"].T + p["b_x"]) * xs}

    def step(s, a):
        a_t = m.sigmoid(p["Lambda"]) ** (c * a["r"])
        return {"h": a_t * s["h"] + m.sqrt(1 - a_t ** 2) * a["ix"]}
    return pre, step


def elman_classifier(p, m, H):
    def pre(xs):
        return {"x": xs @ p["W"].T + p["b"]}

    def step(s, a):
        return {"h": m.tanh(a["x"] + s["h"] @ p["U"].T)}
    return pre, step


def layer_norm_lstm(p, m, H, eps=1e-5):
    blocks = range(4)  # W[k], R[k], b[k], gamma_x[k], gamma_r[k]: i, g, f, o

    def block(w, k):
        return w[k * H:(k + 1) * H]

    def norm(parts):
        mu = sum(m.mean(v) for v in parts) / 4
        var = sum(m.mean((v - mu) ** 2) for v in parts) / 4
        return [(v - mu) * (var + eps) ** -0.5 for v in parts]

    def pre(xs):
        wx = norm([xs @ block(p["W"], k).T for k in blocks])
        return {str(k): block(p["gamma_x"], k) * wx[k] + block(p["b"], k) for k in blocks}

    def step(s, a):
        rh = norm([s["h"] @ block(p["R"], k).T for k in blocks])
        z = [a[str(k)] + block(p["gamma_r"], k) * rh[k] for k in blocks]
        i, g, f, o = m.sigmoid(z[0]), m.tanh(z[1]), m.sigmoid(z[2]), m.sigmoid(z[3])
        c = f * s["c"] + i * g
        mu_c = m.mean(c)
        c_norm = p["gamma_c"] * (c - mu_c) * (m.mean((c - mu_c) ** 2) + eps) ** -0.5 + p["beta_c"]
        return {"h": o * m.tanh(c_norm), "c": c}
    return pre, step


CELLS = {f.__name__: f for f in (rnn_tanh_torch, lstm_torch, gru_torch, mgu, indrnn, mingru, lstm_peephole,
                                 lstm_forget_bias, antisymmetric_rnn, rg_lru, elman_classifier, layer_norm_lstm)}


def _affine(name, bias=None):
    """A readout name = V @ h (+ bias)."""
    def readout(p, m, hs):
        return {name: hs @ p["V"].T + (p[bias] if bias else 0)}
    return readout


def _classifier(p, m, hs):
    z = hs @ p["V"].T + p["c"]
    return {"z": z, "logp": z - m.logsumexp(z)}


READOUTS = {"mgu": _affine("y", "b_y"), "mingru": _affine("y"), "lstm_forget_bias": _affine("y", "b_y"),
            "layer_norm_lstm": _affine("y", "b_y"), "elman_classifier": _classifier}
