"""The layer-normalized LSTM written by hand in NumPy: the floor for the generated module.

The same cell as symrnn/specs/layer_norm_lstm.toml (haste's LayerNormLSTM: LN of W x and
of R h over all 4 n_hidden units, gains gamma_x, gamma_r, bias b; LN of c with gamma_c,
beta_c; gates in the order i, g, f, o), written on the stacked (B, 4n) arrays the way a
person would: one operation per step for each normalization line, the layer-norm backward
in its closed form  d_a = rstd (d_n - mean(d_n) - n mean(d_n n)),  means as products with a
column of ones (as the generated modules do).  The input side's normalization is done step by
step inside the loops, on one step's (B, 4n) array while it is in cache: measured faster
(1.42x lstm against 1.56x) than over the whole (T, B, 4n) array before or after the loop, in
blocks of 8 steps or not (1.46x).  ``forward`` / ``backward`` take and give
what the generated module's do (params dict, x (T, B, I), state0 {h, c}; grad_outputs
{"h": ...}); the readout (V, b_y) is skipped: with grad_outputs on h only it is dead code
for the gradients compared (its parameters' gradients are zero).

benchmarks/layer_norm_cpu.py checks this against generated.layer_norm_lstm_numpy's gradients
before timing it (it is a measurement of what NumPy can do, not a second implementation
anybody imports).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def _mean(a):
    return (a @ np.ones((a.shape[-1], 1), a.dtype)) / a.shape[-1]


def _sum_rows(a):
    return np.ones(a.shape[0], a.dtype) @ a


def _sigmoid(a, out):
    np.negative(a, out=out)
    np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


def forward(p, x, state0):
    T, B, _ = x.shape
    n = p["R"].shape[1]
    dtype = x.dtype
    W, R, b, gx, gr, gc, bc = (p[k] for k in ("W", "R", "b", "gamma_x", "gamma_r", "gamma_c", "beta_c"))
    # the input side's product for every step at once; normalized step by step in the loop
    wx = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(T, B, 4 * n)
    nx = wx
    rstd_x = np.empty((T, B, 1), dtype)
    RT = np.ascontiguousarray(R.T)
    h_seq = np.empty((T + 1, B, n), dtype)
    c_seq = np.empty((T + 1, B, n), dtype)
    h_seq[0], c_seq[0] = state0["h"], state0["c"]
    nr_seq = np.empty((T, B, 4 * n), dtype)
    rstd_r_seq = np.empty((T, B, 1), dtype)
    gates = np.empty((T, B, 4 * n), dtype)
    cn_seq = np.empty((T, B, n), dtype)
    rstd_c_seq = np.empty((T, B, 1), dtype)
    th_seq = np.empty((T, B, n), dtype)
    tmp = np.empty((B, 4 * n), dtype)
    for t in range(T):
        rh = np.dot(h_seq[t], RT)
        rh -= _mean(rh)
        rstd_r = rstd_r_seq[t]
        np.power(_mean(rh * rh) + EPS, -0.5, out=rstd_r)
        nr = nr_seq[t]
        np.multiply(rh, rstd_r, out=nr)
        pre = gates[t]
        np.multiply(nr, gr, out=pre)
        wxt = nx[t]
        wxt -= _mean(wxt)
        np.power(_mean(wxt * wxt) + EPS, -0.5, out=rstd_x[t])
        wxt *= rstd_x[t]
        pre += wxt * gx
        pre += b
        _sigmoid(pre, tmp)
        pre[:, :n] = tmp[:, :n]
        np.tanh(pre[:, n:2 * n], out=pre[:, n:2 * n])
        pre[:, 2 * n:] = tmp[:, 2 * n:]
        i, g, f, o = pre[:, :n], pre[:, n:2 * n], pre[:, 2 * n:3 * n], pre[:, 3 * n:]
        c = c_seq[t + 1]
        np.multiply(f, c_seq[t], out=c)
        c += i * g
        cc = c - _mean(c)
        rstd_c = rstd_c_seq[t]
        np.power(_mean(cc * cc) + EPS, -0.5, out=rstd_c)
        cn = cn_seq[t]
        np.multiply(cc, rstd_c, out=cn)
        th = th_seq[t]
        np.multiply(cn, gc, out=th)
        th += bc
        np.tanh(th, out=th)
        np.multiply(o, th, out=h_seq[t + 1])
    cache = dict(p=p, x=x, nx=nx, rstd_x=rstd_x, h_seq=h_seq, c_seq=c_seq, nr_seq=nr_seq, rstd_r_seq=rstd_r_seq,
                 gates=gates, cn_seq=cn_seq, rstd_c_seq=rstd_c_seq, th_seq=th_seq)
    return {"h": h_seq[1:], "c": c_seq[1:]}, cache


def _ln_backward(d_n, nrm, rstd):
    """d_a of n = (a - mean a) rstd, given d_n (the closed form)."""
    return rstd * (d_n - _mean(d_n) - nrm * _mean(d_n * nrm))


def backward(p, cache, grad_outputs):
    x, h_seq, c_seq = cache["x"], cache["h_seq"], cache["c_seq"]
    T, B, _ = x.shape
    n = p["R"].shape[1]
    dtype = x.dtype
    W, R, gx, gr, gc = (p[k] for k in ("W", "R", "gamma_x", "gamma_r", "gamma_c"))
    nr_seq, rstd_r_seq, gates = cache["nr_seq"], cache["rstd_r_seq"], cache["gates"]
    cn_seq, rstd_c_seq, th_seq = cache["cn_seq"], cache["rstd_c_seq"], cache["th_seq"]
    d_h_seq = grad_outputs["h"]
    d_pre_seq = np.empty((T, B, 4 * n), dtype)
    d_rh_seq = np.empty((T, B, 4 * n), dtype)
    d_gamma_r = np.zeros_like(gr)
    d_gamma_x = np.zeros_like(gr)
    d_b = np.zeros_like(gr)
    d_gamma_c = np.zeros_like(gc)
    d_beta_c = np.zeros_like(gc)
    d_h = np.zeros((B, n), dtype)
    d_c_next = np.zeros((B, n), dtype)
    for t in reversed(range(T)):
        d_h = d_h + d_h_seq[t]
        i, g, f, o = (gates[t][:, k * n:(k + 1) * n] for k in range(4))
        th, cn = th_seq[t], cn_seq[t]
        d_pre = d_pre_seq[t]
        np.multiply(d_h, th, out=d_pre[:, 3 * n:])  # d_o
        d_th = d_h * o
        d_th *= 1 - th * th
        d_gamma_c += _sum_rows(d_th * cn)
        d_beta_c += _sum_rows(d_th)
        d_c = _ln_backward(d_th * gc, cn, rstd_c_seq[t])
        d_c += d_c_next
        np.multiply(d_c, c_seq[t], out=d_pre[:, 2 * n:3 * n])  # d_f
        np.multiply(d_c, g, out=d_pre[:, :n])  # d_i
        np.multiply(d_c, i, out=d_pre[:, n:2 * n])  # d_g
        d_c_next = d_c * f
        gt = gates[t]
        # through the activations: sigmoid' = s (1 - s) on i, f, o, tanh' = 1 - g^2 on g
        dact = gt * (1 - gt)
        dact[:, n:2 * n] = 1 - g * g
        d_pre *= dact
        d_nr = d_pre * gr
        d_gamma_r += _sum_rows(d_pre * nr_seq[t])
        d_rh = d_rh_seq[t]
        d_rh[...] = _ln_backward(d_nr, nr_seq[t], rstd_r_seq[t])
        d_h = np.dot(d_rh, R)
        d_gamma_x += _sum_rows(d_pre * cache["nx"][t])
        d_b += _sum_rows(d_pre)
        d_pre[...] = _ln_backward(d_pre * gx, cache["nx"][t], cache["rstd_x"][t])  # now d_wx at step t
    d_wx = d_pre_seq
    d_x = (d_wx.reshape(-1, 4 * n) @ W).reshape(x.shape)
    d_W = d_wx.reshape(-1, 4 * n).T @ x.reshape(-1, x.shape[-1])
    d_R = d_rh_seq.reshape(-1, 4 * n).T @ h_seq[:-1].reshape(-1, n)
    return {"W": d_W, "R": d_R, "b": d_b, "gamma_x": d_gamma_x, "gamma_r": d_gamma_r, "gamma_c": d_gamma_c,
            "beta_c": d_beta_c, "x": d_x, "h0": d_h, "c0": d_c_next}
