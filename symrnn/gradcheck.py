"""Gradient checking: one fixed recipe that the tests and ``symrnn check`` share.

For a generated module (anything with the module contract) and a random
problem (seeded parameters, input, initial states and output cotangents), the
scalar checked is L = sum over outputs of <cotangent, output>, so every output
path is exercised.  Checks:

* :func:`finite_differences`: central differences, float64, entry by entry,
  for every parameter, the input and every initial state;
* :func:`directional`: one seeded random direction through all of them at
  once (<grad, v> against a central difference along v);
* :func:`rtrl_vs_bptt`: the forward-mode (RTRL) gradients against backward;
* for cells with a loss, the same finite differences through ``loss_and_grads``.

Errors are relative: ||a - b|| / max(||a||, ||b||).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Problem", "Result", "random_problem", "finite_differences", "directional", "rtrl_vs_bptt", "check_module"]

#: default tolerances (float64)
FD_TOL = 1e-6
RTRL_TOL = 1e-10


@dataclass
class Problem:
    params: dict
    x: np.ndarray
    state0: dict
    grad_outputs: dict
    target: np.ndarray | None


@dataclass(frozen=True)
class Result:
    check: str
    name: str
    shape: tuple
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def random_problem(module, *, T=6, B=3, n_in=3, n_hidden=4, n_out=2, seed=0, dtype=np.float64) -> Problem:
    """A seeded random instance: parameters, input, non-zero initial states, cotangents."""
    fixed = module.FIXED_DIMS
    n_in, n_hidden, n_out = fixed.get("n_in", n_in), fixed.get("n_hidden", n_hidden), fixed.get("n_out", n_out)
    rng = np.random.default_rng(seed)
    params = {k: (v * 2.0).astype(dtype) for k, v in module.init_params(n_in, n_hidden, n_out, seed=seed).items()}
    x = rng.standard_normal((T, B, n_in)).astype(dtype)
    outputs, _ = module.forward(params, x)
    state0 = {s: (0.5 * rng.standard_normal(outputs[s].shape[1:])).astype(dtype) for s in module.STATES}
    outputs, _ = module.forward(params, x, state0)
    grad_outputs = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in outputs.items()}
    target = None
    if hasattr(module, "loss_and_grads"):
        target = rng.standard_normal(outputs[module.LOSS_TARGET].shape).astype(dtype)
    return Problem(params, x, state0, grad_outputs, target)


def _inputs(problem: Problem) -> dict[str, np.ndarray]:
    """Every array gradients are taken for, by the key ``grads`` uses."""
    arrays = dict(problem.params)
    arrays["x"] = problem.x
    arrays.update({f"{s}0": v for s, v in problem.state0.items()})
    return arrays


def _with(problem: Problem, key: str, value: np.ndarray) -> Problem:
    params, x, state0 = dict(problem.params), problem.x, dict(problem.state0)
    if key in params:
        params[key] = value
    elif key == "x":
        x = value
    else:
        state0[key[:-1]] = value
    return Problem(params, x, state0, problem.grad_outputs, problem.target)


def _objective(module, loss: bool):
    if loss:
        return lambda pr: float(module.loss_and_grads(pr.params, pr.x, pr.target, pr.state0)[0])

    def linear(pr):
        outputs, _ = module.forward(pr.params, pr.x, pr.state0)
        return float(sum(np.sum(outputs[k] * g) for k, g in pr.grad_outputs.items()))

    return linear


def _analytic(module, problem: Problem, loss: bool) -> dict:
    if loss:
        return module.loss_and_grads(problem.params, problem.x, problem.target, problem.state0)[1]
    _, cache = module.forward(problem.params, problem.x, problem.state0)
    return module.backward(problem.params, cache, problem.grad_outputs)


def finite_differences(module, problem: Problem, *, eps=1e-6, tol=FD_TOL, loss=False) -> list[Result]:
    """Central differences, entry by entry, against backward (or loss_and_grads)."""
    f = _objective(module, loss)
    grads = _analytic(module, problem, loss)
    results = []
    for key, value in _inputs(problem).items():
        num = np.zeros(np.shape(value))
        base = np.array(value, dtype=np.float64)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            num[idx] = (f(_with(problem, key, plus)) - f(_with(problem, key, minus))) / (2 * eps)
        check = "loss FD" if loss else "FD"
        results.append(Result(check, key, base.shape, rel_error(grads[key], num), tol))
    return results


def directional(module, problem: Problem, *, eps=1e-6, tol=FD_TOL, seed=1) -> Result:
    """<grad, v> against (L(p + eps v) - L(p - eps v)) / 2 eps for one random v through everything."""
    f = _objective(module, False)
    grads = _analytic(module, problem, False)
    rng = np.random.default_rng(seed)
    arrays = _inputs(problem)
    v = {k: rng.standard_normal(np.shape(a)) for k, a in arrays.items()}
    plus, minus = problem, problem
    for k, a in arrays.items():
        plus = _with(plus, k, a + eps * v[k])
        minus = _with(minus, k, a - eps * v[k])
    num = (f(plus) - f(minus)) / (2 * eps)
    ana = sum(float(np.sum(grads[k] * v[k])) for k in arrays)
    return Result("directional", "all", (), rel_error(ana, num), tol)


def rtrl_vs_bptt(module, problem: Problem, *, tol=RTRL_TOL) -> list[Result]:
    """Forward-mode sensitivities against the reverse-mode adjoints."""
    bptt = _analytic(module, problem, False)
    rtrl = module.rtrl_grads(problem.params, problem.x, problem.grad_outputs, problem.state0)
    return [Result("RTRL", k, np.shape(bptt[k]), rel_error(rtrl[k], bptt[k]), tol) for k in bptt]


def check_module(module, *, seed=0, T=6, B=3) -> list[Result]:
    """Every check on one random float64 instance."""
    problem = random_problem(module, seed=seed, T=T, B=B)
    results = finite_differences(module, problem)
    results.append(directional(module, problem))
    results += rtrl_vs_bptt(module, problem)
    if hasattr(module, "loss_and_grads"):
        results += finite_differences(module, problem, loss=True)
    return results


def report(cell: str, results: list[Result]) -> str:
    """A table: one line per check and quantity."""
    lines = [f"cell {cell}", f"  {'check':12s} {'quantity':16s} {'shape':14s} {'rel. error':>10s}  {'tol':>7s}  result"]
    for r in results:
        lines.append(
            f"  {r.check:12s} {r.name:16s} {str(r.shape):14s} {r.error:10.2e}  {r.tol:7.0e}  {'ok' if r.ok else 'FAIL'}"
        )
    bad = sum(not r.ok for r in results)
    lines.append(f"  {len(results) - bad} passed, {bad} failed")
    return "\n".join(lines)
