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

A problem with ``lengths`` (and ``reverse``, ``grad_final``) checks the variable-length
contract: L then also holds <grad_final, final states>, and every call passes them on.

Errors are relative: ||a - b|| / max(||a||, ||b||).

The random instance stays inside the cell's declared domain: a parameter or
initial state with a declared init (``PARAM_INITS``, ``STATE_INITS`` of the
module) is drawn as declared.  An instance that is not finite anyway (NaN or
inf in the outputs, the loss or the gradients) is reported once, by
:func:`nonfinite`, instead of as a failure of every check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from .ops import OPS, Op

__all__ = ["Problem", "Result", "random_problem", "with_lengths", "nonfinite", "finite_differences", "directional", "rtrl_vs_bptt",
           "check_module"]

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
    lengths: np.ndarray | None = None
    reverse: bool = False
    grad_final: dict | None = None

    @property
    def steps(self) -> dict:
        """The keywords of the variable-length contract this problem uses (none without)."""
        return {"lengths": self.lengths, "reverse": True} if self.reverse else \
            {"lengths": self.lengths} if self.lengths is not None else {}


def with_lengths(module, problem: Problem, lengths, reverse: bool = False, seed: int = 0) -> Problem:
    """``problem`` with variable lengths, ``reverse``, and random cotangents of the final states."""
    rng = np.random.default_rng(seed)
    B = problem.x.shape[1]
    grad_final = {s: rng.standard_normal((B,) + np.shape(v)[1:]) for s, v in problem.state0.items()}
    return replace(problem, lengths=None if lengths is None else np.asarray(lengths), reverse=reverse,
                   grad_final=grad_final)


@dataclass(frozen=True)
class Result:
    check: str
    name: str
    shape: tuple
    error: float
    tol: float
    #: a diagnosis that replaces the checks (the random instance is not finite)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def random_problem(module, *, T=6, B=3, n_in=3, n_hidden=4, n_out=2, seed=0, dtype=np.float64) -> Problem:
    """A seeded random instance: parameters, input, non-zero initial states, cotangents.

    A parameter without a declared init is ``init_params``' value times 2 (PyTorch's
    range, doubled, drives the nonlinearities harder); one with a declared init keeps
    ``init_params``' value, drawn inside its range.  x has ``module.input_size(...)``
    columns.  An initial state is 0.5 N(0, 1), or drawn as declared (``init_state0``)."""
    fixed = module.FIXED_DIMS
    n_in, n_hidden, n_out = fixed.get("n_in", n_in), fixed.get("n_hidden", n_hidden), fixed.get("n_out", n_out)
    rng = np.random.default_rng(seed)
    declared = getattr(module, "PARAM_INITS", {})
    params = {k: (v if k in declared else v * 2.0).astype(dtype)
              for k, v in module.init_params(n_in, n_hidden, n_out, seed=seed).items()}
    width = module.input_size(n_in, n_hidden, n_out) if hasattr(module, "input_size") else n_in
    x = rng.standard_normal((T, B, width)).astype(dtype)
    with np.errstate(all="ignore"):  # a non-finite instance is reported by nonfinite()
        outputs, _ = module.forward(params, x)
    declared = getattr(module, "STATE_INITS", {})
    drawn = module.init_state0(B, n_in, n_hidden, n_out, seed=seed + 1, dtype=dtype) if declared else {}
    state0 = {s: drawn[s] if s in declared else (0.5 * rng.standard_normal(outputs[s].shape[1:])).astype(dtype)
              for s in module.STATES}
    with np.errstate(all="ignore"):
        outputs, _ = module.forward(params, x, state0)
    grad_outputs = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in outputs.items()}
    target = None
    if hasattr(module, "loss_and_grads"):
        target = rng.standard_normal(outputs[module.LOSS_TARGET].shape).astype(dtype)
    return Problem(params, x, state0, grad_outputs, target)


def nonfinite(module, problem: Problem) -> str | None:
    """Why ``problem`` cannot be checked: one sentence if its outputs, its loss or its
    gradients hold NaN or inf, else None."""
    cell = getattr(module, "CELL", "?")
    declared = bool(getattr(module, "PARAM_INITS", {}) or getattr(module, "STATE_INITS", {}))
    hint = ("its declared inits do not keep it finite; narrow them" if declared else
            "declare an init range for its parameters (or initial states), e.g. init = \"uniform(0.9, 0.999)\"")
    hint += _domains(module) + ", see docs/spec-format.md"
    with np.errstate(all="ignore"):
        outputs, cache = module.forward(problem.params, problem.x, problem.state0)
        first = None
        for name, value in outputs.items():
            bad = ~np.isfinite(np.asarray(value)).reshape(value.shape[0], -1).all(axis=1)
            if bad.any() and (first is None or int(np.argmax(bad)) < first[0]):
                first = (int(np.argmax(bad)), name)
        if first is not None:
            return (f"cell '{cell}': the random instance gives non-finite outputs (first at step t = {first[0]}, "
                    f"output '{first[1]}'); {hint}")
        grads = module.backward(problem.params, cache, problem.grad_outputs)
        loss, loss_grads = None, {}
        if problem.target is not None and hasattr(module, "loss_and_grads"):
            loss, loss_grads = module.loss_and_grads(problem.params, problem.x, problem.target, problem.state0)
    bad = [k for k, v in grads.items() if not np.all(np.isfinite(v))]
    if bad:
        return f"cell '{cell}': the random instance gives non-finite gradients (first: '{bad[0]}'); {hint}"
    if loss is not None and not np.isfinite(loss):
        return f"cell '{cell}': the random instance gives a non-finite loss ({float(loss)}); {hint}"
    bad = [k for k, v in loss_grads.items() if not np.all(np.isfinite(v))]
    if bad:
        return f"cell '{cell}': the random instance gives non-finite gradients of the loss (first: '{bad[0]}'); {hint}"
    return None


def _domains(module) -> str:
    """'' or ' (log and sqrt are defined on (0, inf) only)' for the ops of a restricted
    domain (ops.Op.domain) that the module's equations (its docstring) apply."""
    doc = module.__doc__ or ""
    used = [name for name, op in sorted(OPS.items()) if op.domain != Op.domain and re.search(rf"\b{name}\(", doc)]
    if not used:
        return ""
    spans = sorted({f"{OPS[n].domain[0]:g}, {OPS[n].domain[1]:g}" for n in used})
    names = " and ".join(used)
    return f" ({names} {'is' if len(used) == 1 else 'are'} defined on ({'), ('.join(spans)}) only)"


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
    return replace(problem, params=params, x=x, state0=state0)


def _objective(module, loss: bool):
    if loss:
        return lambda pr: float(module.loss_and_grads(pr.params, pr.x, pr.target, pr.state0, **pr.steps)[0])

    def linear(pr):
        outputs, cache = module.forward(pr.params, pr.x, pr.state0, **pr.steps)
        total = sum(np.sum(outputs[k] * g) for k, g in pr.grad_outputs.items())
        if pr.grad_final:
            final = module.final_states(cache)
            total += sum(np.sum(final[k] * g) for k, g in pr.grad_final.items())
        return float(total)

    return linear


def _analytic(module, problem: Problem, loss: bool) -> dict:
    if loss:
        return module.loss_and_grads(problem.params, problem.x, problem.target, problem.state0, **problem.steps)[1]
    _, cache = module.forward(problem.params, problem.x, problem.state0, **problem.steps)
    if problem.grad_final:
        return module.backward(problem.params, cache, problem.grad_outputs, problem.grad_final)
    return module.backward(problem.params, cache, problem.grad_outputs)


#: the rounding error of one evaluation of the objective L, in units of eps_machine * |L|
#: (a central difference then carries about FD_ROUNDING * eps_machine * |L| / step of it)
FD_ROUNDING = 8.0


def fd_error(analytic, numeric, values: list[float], eps: float, tol: float) -> float:
    """||a - n|| / max(||a||, ||n||, floor / tol): relative, except below the floor, the
    rounding a central difference of step ``eps`` cannot resolve (sqrt(size) entries of
    FD_ROUNDING * eps_machine * max|L| / eps each).  A gradient far smaller than the
    objective (a parameter with a weak path to L) is then judged by what differences
    can see; BPTT = RTRL checks it to 1e-10 independently of this."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    floor = math.sqrt(max(a.size, 1)) * FD_ROUNDING * np.finfo(np.float64).eps * max(map(abs, values)) / eps
    scale = max(np.linalg.norm(a), np.linalg.norm(n), floor / tol)
    return 0.0 if scale == 0 else float(np.linalg.norm(a - n) / scale)


def finite_differences(module, problem: Problem, *, eps=1e-6, tol=FD_TOL, loss=False) -> list[Result]:
    """Central differences, entry by entry, against backward (or loss_and_grads); the
    error is :func:`fd_error` (relative, above the differences' rounding floor)."""
    f = _objective(module, loss)
    grads = _analytic(module, problem, loss)
    results = []
    for key, value in _inputs(problem).items():
        num = np.zeros(np.shape(value))
        base = np.array(value, dtype=np.float64)
        values = [f(problem)]
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            values += [f(_with(problem, key, plus)), f(_with(problem, key, minus))]
            num[idx] = (values[-2] - values[-1]) / (2 * eps)
        check = "loss FD" if loss else "FD"
        results.append(Result(check, key, base.shape, fd_error(grads[key], num, values, eps, tol), tol))
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
    values = [f(plus), f(minus)]
    num = (values[0] - values[1]) / (2 * eps)
    ana = sum(float(np.sum(grads[k] * v[k])) for k in arrays)
    return Result("directional", "all", (), fd_error(ana, num, values, eps, tol), tol)


def rtrl_vs_bptt(module, problem: Problem, *, tol=RTRL_TOL) -> list[Result]:
    """Forward-mode sensitivities against the reverse-mode adjoints."""
    bptt = _analytic(module, problem, False)
    final = {"grad_final": problem.grad_final} if problem.grad_final else {}
    rtrl = module.rtrl_grads(problem.params, problem.x, problem.grad_outputs, problem.state0, **problem.steps, **final)
    return [Result("RTRL", k, np.shape(bptt[k]), rel_error(rtrl[k], bptt[k]), tol) for k in bptt]


def check_module(module, *, seed=0, T=6, B=3, **sizes) -> list[Result]:
    """Every check on one random float64 instance (``sizes``: n_in, n_hidden, n_out as
    :func:`random_problem` takes them); one failed Result with a diagnosis (``detail``)
    instead when the instance is not finite (see :func:`nonfinite`)."""
    problem = random_problem(module, seed=seed, T=T, B=B, **sizes)
    why = nonfinite(module, problem)
    if why is not None:
        return [Result("instance", "finite", (), math.inf, 0.0, detail=why)]
    results = finite_differences(module, problem)
    results.append(directional(module, problem))
    results += rtrl_vs_bptt(module, problem)
    if hasattr(module, "loss_and_grads"):
        results += finite_differences(module, problem, loss=True)
    return results


def report(cell: str, results: list[Result]) -> str:
    """A table: one line per check and quantity."""
    lines = [f"cell {cell}"]
    if any(not r.detail for r in results):
        lines.append(f"  {'check':12s} {'quantity':16s} {'shape':14s} {'rel. error':>10s}  {'tol':>7s}  result")
    for r in results:
        if r.detail:
            lines.append(f"  {'FAIL' if not r.ok else 'note'}: {r.detail}")
            continue
        lines.append(
            f"  {r.check:12s} {r.name:16s} {str(r.shape):14s} {r.error:10.2e}  {r.tol:7.0e}  {'ok' if r.ok else 'FAIL'}"
        )
    bad = sum(not r.ok for r in results)
    lines.append(f"  {len(results) - bad} passed, {bad} failed")
    return "\n".join(lines)
