"""``symrnn verify``: the shipped transcriptions of the seeds, mutations, hostile claims files.

Each slip of a seed is listed here, independently of the claims files (their notes only
explain), with the step at which verify must find the first difference (in the seed's
numbering of steps) or, where the claim cannot even be evaluated, the reason.
"""

from __future__ import annotations

import ast
import re
import sys

import pytest

from conftest import ROOT
from symrnn.claims import ClaimsError, load_claims, parse_claims
from symrnn.cli import main
from symrnn.verify import format_report, markdown_report, verify

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CLAIMS = ROOT / "examples" / "claims"
FILES = sorted(p.name for p in CLAIMS.glob("*.toml"))

#: (file, scope, left side) -> the witness step (seed numbering), or the reason without one
SLIPS = {
    ("seed000_001.toml", "steps", "ds[l]/dU[i, j]"): 1,  # ds^t_m inside the sum, ds^{t-1}_m meant
    ("seed000_001.toml", "steps", "ds[l]/dW[i, j]"): "index j runs over",  # the W section repeats U's (x_j for s_j)
    ("seed002.toml", "steps", "at(dh/dw, 0)"): 1,  # dh^0/dw = sigma'(a^0) x^t, x^0 meant
    ("seed003_lstm.toml", "steps", "adj(pre(f))"): 1,  # Delta_{c,t-1} where Delta_{c,t} is meant
    ("seed003_lstm.toml", "steps", "adj(pre(i))"): 1,
    ("seed003_lstm.toml", "steps", "adj(pre(g))"): 1,
    ("seed003_lstm.toml", "steps", "adj(c)"): 1,  # no tanh'(c), no f_{t+1}, h at t+1
}
SIZE_SLIPS = {("seed000_001.toml", "z")}  # seed 000: Z in R^n, Z = U X + W S has the size of S

_REPORTS: dict[str, object] = {}


def report_of(name: str):
    if name not in _REPORTS:
        _REPORTS[name] = verify(load_claims(CLAIMS / name))
    return _REPORTS[name]


def test_every_seed_with_a_derivation_has_a_claims_file():
    assert {"seed000_001.toml", "seed002.toml", "seed003_lstm.toml"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_shipped_claims_correct_where_the_seed_is_right(name):
    report = report_of(name)
    for v in report.verdicts:
        key = (name, v.claim.scope, v.claim.key)
        assert v.correct == (key not in SLIPS), format_report(report)
    for s in report.sizes:
        assert s.correct == ((name, s.claim.name) not in SIZE_SLIPS)
    assert any(v.method == "symbolic" for v in report.verdicts) or name == "seed000_001.toml"


@pytest.mark.parametrize("key", sorted(SLIPS), ids=lambda k: f"{k[0]}:{k[2]}")
def test_each_slip_is_reported_with_its_witness(key):
    name, scope, lhs = key
    report = report_of(name)
    (v,) = [v for v in report.verdicts if (v.claim.scope, v.claim.key) == (scope, lhs)]
    assert not v.correct and v.method == "numeric"
    expected = SLIPS[key]
    if isinstance(expected, int):
        assert v.witness is not None and v.witness.step == expected
        assert v.witness.difference > 1e-6
        assert v.derived  # the derived formula is written beside it
        assert v.only_claim and v.only_derived  # and the terms that differ
    else:
        assert v.witness is None and expected in v.reason and v.derived


def test_the_reported_terms_are_the_slips():
    """The terms that differ are the slip itself, not the whole formula."""
    def verdict(name, key):
        return next(v for v in report_of(name).verdicts if v.claim.key == key)

    v = verdict("seed000_001.toml", "ds[l]/dU[i, j]")
    assert v.only_claim == ("sum(W[l, m]*ds[m]/dU[i, j], m)",) or "ds[m]/dU[i, j]" in v.only_claim[0]
    assert "prev(ds[m]/dU[i, j])" in v.only_derived[0]
    v = verdict("seed002.toml", "at(dh/dw, 0)")
    assert v.only_claim == ("x",) and v.only_derived == ("at(x, 0)",)
    v = verdict("seed003_lstm.toml", "adj(pre(f))")
    assert v.only_claim == ("prev(adj(c))",) and v.only_derived == ("adj(c)",)


# -- mutations of correct claims ------------------------------------------------------------------
def _flip_sign(text: str) -> str:
    return f"-({text})"


def _drop_term(text: str) -> str | None:
    """The expression with the last term of its first sum (outermost first) left out."""
    tree = ast.parse(re.sub(r"(\w+)'\(", r"\1_prime(", text), mode="eval")  # sigmoid'(a): sigmoid_prime(a)
    for node in ast.walk(tree):
        for field in ("body", "left", "right", "operand", "args", "elts", "value"):
            child = getattr(node, field, None)
            children = child if isinstance(child, list) else [child]
            for k, c in enumerate(children):
                if isinstance(c, ast.BinOp) and isinstance(c.op, (ast.Add, ast.Sub)):
                    kept = c.left
                    if isinstance(child, list):
                        child[k] = kept
                    else:
                        setattr(node, field, kept)
                    return ast.unparse(tree)
    return None


def _shift_time(text: str) -> str:
    if "prev(" in text:
        return text.replace("prev(", "next(", 1)
    if re.search(r"\b\w+_prev\b", text):
        return re.sub(r"\b(\w+)_prev\b", r"\1", text, count=1)
    return f"prev({text})"


MUTATIONS = {"flip a sign": _flip_sign, "drop a term": _drop_term, "shift a time index": _shift_time}


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mutated_file(name: str, mutate) -> tuple[str, list[tuple[str, str]]]:
    data = tomllib.loads((CLAIMS / name).read_text())
    head = []
    for table in ("claims", "names", "dims", "constants"):
        if table in data:
            head.append(f"[{table}]")
            for k, v in data[table].items():
                if isinstance(v, str):
                    v = _toml_string(v.replace(data["claims"].get("spec", "\0"), str(CLAIMS / v)) if k == "spec" else v)
                elif isinstance(v, list):
                    v = "[" + ", ".join(map(str, v)) + "]"
                head.append(f"{k} = {v}")
    mutated = []
    body = []
    for scope in ("steps", "first", "last", "initial", "total"):
        lines = []
        for key, value in data.get(scope, {}).items():
            text = value["expr"] if isinstance(value, dict) else value
            if (name, scope, key) in SLIPS or text.strip() == "0":
                continue
            new = mutate(text)
            if new is None or new == text:
                continue
            lines.append(f"{_toml_string(key)} = {_toml_string(new)}")
            mutated.append((scope, key))
        if lines:
            body += [f"[{scope}]", *lines]
    return "\n".join(head + body) + "\n", mutated


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("name", FILES)
def test_a_mutated_correct_claim_is_reported_wrong(name, mutation, tmp_path):
    text, mutated = _mutated_file(name, MUTATIONS[mutation])
    assert mutated
    path = tmp_path / name
    path.write_text(text)
    report = verify(load_claims(path))
    assert {(v.claim.scope, v.claim.key) for v in report.verdicts} == set(mutated)
    right = [f"[{v.claim.scope}] {v.claim.key} = {v.claim.text}" for v in report.verdicts if v.correct]
    assert not right, f"{mutation}: still judged correct: {right}"
    for v in report.verdicts:
        assert v.witness is not None or v.reason


# -- the command --------------------------------------------------------------------------------
def test_cli_exit_status_and_report(capsys):
    assert main(["verify", str(CLAIMS / "seed003_gru.toml")]) == 0
    out = capsys.readouterr().out
    assert "all claims are correct" in out and "[symbolic]" in out
    assert main(["verify", str(CLAIMS / "seed002.toml")]) == 1
    out = capsys.readouterr().out
    assert "WRONG [steps] at(dh/dw, 0)" in out and "witness: step t = 1" in out and "derived:" in out


def test_markdown_report_escapes_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[claims]\ncell = "single_sigmoid"\nsource = "<b>*x*</b>"\n[steps]\n"h" = { expr = "sigmoid(a)", '
                    'note = "a | b <i>" }\n')
    md = markdown_report(verify(load_claims(path)))
    assert "<b>" not in md and "<i>" not in md and "&lt;b&gt;" in md and "a \\| b" in md


# -- hostile claims files: one line, file:line, exit 2 ------------------------------------------
HEAD = '[claims]\ncell = "single_sigmoid"\n'
HOSTILE = [
    (HEAD + '[steps]\n"dh/db" = "hh * 2"\n', ":4:", "unknown symbol 'hh' (did you mean 'h'?)"),
    (HEAD + '[steps]\n"dh/db" = "h * (1 - h"\n', ":4:", "cannot parse"),
    (HEAD + '[steps]\n"dq/db" = "h"\n', ":4:", "has no value 'q'"),
    (HEAD + '[steps]\n"dh/dz" = "h"\n', ":4:", ""),
    (HEAD + '[steps]\n"dh/db" = "__import__(\'os\').system(\'touch PWNED\')"\n', ":4:", "cannot be called"),
    (HEAD + '[steps]\n"dh/db" = "h.__class__"\n', ":4:", "the only attribute in a claim is"),
    (HEAD + '[steps]\n"dh/db" = "lambda: 1"\n', ":4:", "not allowed"),
    (HEAD + '[steps]\n"dh/db" = "' + "(" * 200 + "h" + ")" * 200 + '"\n', ":4:", ""),
    (HEAD + '[steps]\n"dh/db" = "' + " + ".join(["h"] * 5000) + '"\n', ":4:", "at most"),
    (HEAD + '[steps]\n"dh/db" = 3\n', ":4:", "expected a formula in quotes"),
    (HEAD + '[steps]\n"h + 1" = "h"\n', ":4:", "the left side must be one quantity"),
    (HEAD + '[steps]\n"dL/db" = "h"\n', ":4:", "[total]"),
    (HEAD + '[total]\n"dL/db" = "h"\n', ":4:", "has no step"),
    (HEAD + '[steps]\n"dh/db" = "sum_t(h)"\n', ":4:", "belongs in [total]"),
    (HEAD + '[steps]\n"dh/db" = "h[m]"\n', ":4:", "index 'm' is free"),
    (HEAD + '[steps]\n"dh/db" = "h[b]"\n', ":4:", "index 'b' is a name of cell"),
    (HEAD + '[steps]\n"adj(pre(a))" = "h"\n', ":4:", "has no pre-activation"),
    (HEAD + '[steps]\n"dh/db" = "prev(h, 2)"\n', ":4:", "takes 1 argument"),
    (HEAD + '[steps]\n"dh/db" = "at(h, k)"\n', ":4:", "step number"),
    (HEAD + '[steps]\n"dh/db" = "sinh(h)"\n', ":4:", "not allowed"),
    (HEAD + '[steps]\n"dh/db" = "h ^ 2"\n', ":4:", "use ** for powers"),
    (HEAD + '[steps]\n"dL_t/da" = "h"\n', ":4:", "by an output"),
    (HEAD + '[stepz]\n"dh/db" = "h"\n', ":3:", "unknown table (did you mean 'steps'?)"),
    (HEAD + 'foo = 1\n[steps]\n"h" = "h"\n', ":3:", "unknown key"),
    ('[claims]\ncell = "lstn"\n[steps]\n"h" = "h"\n', ":2:", "unknown cell 'lstn' (did you mean 'lstm'?)"),
    ('[claims]\nspec = "no_such.toml"\n[steps]\n"h" = "h"\n', ":2:", "does not exist"),
    ('[claims]\n[steps]\n"h" = "h"\n', ":1:", "name the cell"),
    ('[steps]\n"h" = "h"\n', "", "missing table [claims]"),
    (HEAD, "", "no claims"),
    (HEAD + '[names]\nyy = "nope"\n[steps]\n"h" = "h"\n', ":4:", "is not a name of cell"),
    (HEAD + 'initial_states = "some"\n[steps]\n"h" = "h"\n', ":3:", "\"random\" or \"zero\""),
    (HEAD + 'steps = 100000\n[steps]\n"h" = "h"\n', ":3:", "integer from 2 to 50"),
    (HEAD + '[sizes]\nh = "n_hidden + m"\n', ":4:", "unknown dimension"),
    (HEAD + '[steps]\n"h" = "h"\n"h" = "a"\n', ":5:", "not valid TOML"),
    ('[claims]\ncell = "lstm"\n[steps]\n"dh/dW_f" = "h"\n', ":4:", "name its entry"),
    ('[claims]\ncell = "lstm"\n[steps]\n"h" = "W_f"\n', ":4:", "a matrix alone is not a value"),
    ('[claims]\ncell = "lstm"\n[steps]\n"h" = "W_f.T"\n', ":4:", ""),
    (HEAD + '[steps]\n"h" = { expr = "h", note = "a\\u202eb" }\n', ":4:", "note contains the character"),
    (HEAD + '[steps]\n"h" = "h # \\u001b[31m red"\n', ":4:", "the formula contains the character"),
]


@pytest.mark.parametrize("text, where, message", HOSTILE, ids=[f"hostile{k}" for k in range(len(HOSTILE))])
def test_a_hostile_claims_file_is_one_line(text, where, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "claims.toml"
    path.write_text(text)
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("symrnn: error: "), err
    assert f"claims.toml{where}" in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"x" * 1_000_001, "larger than"),
])
def test_a_claims_file_that_is_no_text(content, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_and_folder(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_claims_error_is_a_user_error():
    from symrnn.errors import UserError

    with pytest.raises(ClaimsError) as info:
        parse_claims('[claims]\ncell = "elman"\n[steps]\n"s" = "tanh(zz)"\n', "x.toml")
    assert isinstance(info.value, UserError) and str(info.value).startswith("x.toml:4:")


def test_the_seeds_page_is_up_to_date(capsys, monkeypatch):
    """docs/seeds.md is the Markdown report of the shipped claims files (CI fails when stale)."""
    monkeypatch.chdir(ROOT)
    files = [f"examples/claims/{name}" for name in FILES]
    assert main(["verify", "--format", "md", *files]) == 1  # the seeds have slips
    page = (ROOT / "docs" / "seeds.md").read_text()
    assert capsys.readouterr().out == page, f"docs/seeds.md is stale; run: symrnn verify --format md {' '.join(files)} > docs/seeds.md"
    assert "## Where the hand derivations are wrong" in page and "<script" not in page


# -- cells with reductions over units (mean, sum, logsumexp) -----------------------------------
from test_reductions import LN_GRU, RMS_ELMAN  # noqa: E402

#: per cell: (its equations file or None for a built-in cell, correct claims, {claim: a wrong
#: right side}): the reduction's value, the adjoint of a reduction's value (one number: the sum of
#: its units' shares), the adjoint of its operand (through w * dL/dr), a gradient
REDUCTION_CLAIMS = {
    "layer_norm_lstm": (None, {
        "mu_c": "mean(c)",
        "adj(mu_c)": "sum(-gamma_c * (var_c + eps)**-0.5 * adj(c_norm))",
        "adj(c)": "gamma_c * (var_c + eps)**-0.5 * adj(c_norm) + adj(mu_c) / n_hidden"
                  " + 2 * (c - mu_c) * adj(var_c) / n_hidden + next(f) * next(adj(c))",
    }, {"adj(c)": "gamma_c * (var_c + eps)**-0.5 * adj(c_norm) + adj(mu_c) + 2 * (c - mu_c) * adj(var_c) / n_hidden"
                  " + next(f) * next(adj(c))"}),  # the mean's 1/n left out
    "elman_classifier": (None, {
        "logp": "z - logsumexp(z)",
        "adj(z)": "adj(logp) - exp(logp) * sum(adj(logp))",
    }, {"adj(z)": "adj(logp) - exp(logp)"}),  # sum_k dL/dlogp_k taken as 1
    "ln_gru": (LN_GRU, {
        "adj(ah_n)": "(mean((ah_n - mean(ah_n))**2) + eps)**-0.5 * (gr[2] * adj(lh_n) - mean(gr[2] * adj(lh_n)))"
                     " - (mean((ah_n - mean(ah_n))**2) + eps)**-1.5 * (ah_n - mean(ah_n))"
                     " * mean(gr[2] * adj(lh_n) * (ah_n - mean(ah_n)))",
    }, {"adj(ah_n)": "(mean((ah_n - mean(ah_n))**2) + eps)**-0.5 * (gr[2] * adj(lh_n) - mean(gr[2] * adj(lh_n)))"}),
    "rms_elman": (RMS_ELMAN, {
        "adj(a)": "(mean(a**2) + 1e-6)**-0.5 * g * adj(pre(h)) - (mean(a**2) + 1e-6)**-1.5 * a * mean(g * a * adj(pre(h)))",
        "dL/dg": "sum_t(a * (mean(a**2) + 1e-6)**-0.5 * adj(pre(h)))",
    }, {"adj(a)": "(mean(a**2) + 1e-6)**-0.5 * g * adj(pre(h))"}),  # the RMS's own derivative left out
}


def _reduction_claims(name: str, claims: dict, tmp_path, constants: str = ""):
    spec, _, _ = REDUCTION_CLAIMS[name]
    where = f'cell = "{name}"'
    if spec is not None:
        (tmp_path / f"{name}.toml").write_text(spec)
        where = f'spec = "{name}.toml"'
    scope = {k: v for k, v in claims.items() if not k.startswith("dL/d")}
    total = {k: v for k, v in claims.items() if k.startswith("dL/d")}
    # eps is the cell's constant (its equations file's [constants]): the claims use it undeclared
    text = f"[claims]\n{where}\nsteps = 4\nseeds = [1]\n\n{constants}[steps]\n"
    text += "".join(f"{_toml_string(k)} = {_toml_string(v)}\n" for k, v in scope.items())
    text += "\n[total]\n" + "".join(f"{_toml_string(k)} = {_toml_string(v)}\n" for k, v in total.items())
    path = tmp_path / "claims.toml"
    path.write_text(text)
    return verify(load_claims(path))


@pytest.mark.parametrize("name", sorted(REDUCTION_CLAIMS))
def test_claims_about_reductions_are_judged(name, tmp_path):
    _, right, wrong = REDUCTION_CLAIMS[name]
    report = _reduction_claims(name, right | {f"{k} ": v for k, v in wrong.items()}, tmp_path)
    verdicts = {v.claim.key: v for v in report.verdicts}
    for key in right:
        assert verdicts[key].correct, format_report(report)
    for key in wrong:
        v = verdicts[f"{key} "]
        assert not v.correct and v.witness is not None, format_report(report)
        assert v.derived, format_report(report)  # the derived formula (through the reductions) agreed with the truth


def test_the_adjoint_of_a_reductions_value_is_one_number(tmp_path):
    report = _reduction_claims("layer_norm_lstm", {"adj(mu_c)": "-gamma_c * (var_c + eps)**-0.5 * adj(c_norm)",
                                                   "mu_c": "mean(c_norm)", "var_c": "mean(adj(mu_c))"}, tmp_path)
    reasons = {v.claim.key: (v.correct, v.reason) for v in report.verdicts}
    assert reasons["adj(mu_c)"] == (False, "the right side is a vector where the left side is not")
    assert reasons["var_c"] == (False, "mean(...) reduces a vector over its units, not a number")
    assert not reasons["mu_c"][0] and next(v for v in report.verdicts if v.claim.key == "mu_c").witness is not None


@pytest.mark.parametrize("name", ["layer_norm_lstm", "ln_gru"])
def test_claims_use_the_cells_constants(name, tmp_path):
    """A claim may name the equations file's constants (eps); repeating one with its value is
    allowed, with another value it is refused in one line (the claim would be about another cell)."""
    claim = {"layer_norm_lstm": {"c_norm": "gamma_c * (c - mu_c) * (var_c + eps)**-0.5 + beta_c"},
             "ln_gru": {"lh_n": "gr[2] * (ah_n - mean(ah_n)) * (mean((ah_n - mean(ah_n))**2) + eps)**-0.5"}}[name]
    for constants in ("", "[constants]\neps = 1e-5\n\n"):
        report = _reduction_claims(name, claim, tmp_path, constants)
        assert all(v.correct for v in report.verdicts), format_report(report)
    # the same claim with another eps is wrong: the cell's value is the one used
    wrong = {k: v.replace("eps", "1e-3") for k, v in claim.items()}
    assert not any(v.correct for v in _reduction_claims(name, wrong, tmp_path).verdicts)
    with pytest.raises(ClaimsError, match=r"claims\.toml:\d+: \[constants\] 'eps': already a constant of cell "
                       rf"'{name}' \(= 1e-05\); a claim uses the cell's value: leave it out"):
        _reduction_claims(name, claim, tmp_path, "[constants]\neps = 0.001\n\n")
