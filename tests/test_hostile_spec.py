"""Hostile equations files and cells: nothing in them is evaluated, and what cannot work
is refused at load with the place, one line, exit status 2 and nothing written.

(Issue "Trust", items 1 and 2: sizes and free text.)
"""

from __future__ import annotations

import re

import pytest
import sympy

from conftest import ROOT
from symrnn import Cell, params, tanh
from symrnn.cli import main
from symrnn.errors import CellError
from symrnn.lower import lower, parse_size
from symrnn.spec import SpecError, load_spec, parse_spec
from test_spec import BASE, line_of, snapshot, spec

COMMANDS = ["show", "check", "generate", "latex"]


def toml_str(value: str) -> str:
    """A TOML basic string holding exactly ``value`` (control characters as \\u escapes)."""
    body = "".join(ch if ch.isprintable() and ch not in '"\\' else f"\\u{ord(ch):04x}" for ch in value)
    return f'"{body}"'


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.py").write_text("# the user's file\n")
    return folder


def run(command: str, path, out, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(out)  # latex writes into the current folder by default
    argv = [command, "--spec", str(path)] + (["--out", str(out)] if command == "generate" else [])
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("table, key", [("inputs", "x"), ("states", "h"), ("params", "b")])
def test_a_size_is_never_evaluated(command, table, key, tmp_path, out, monkeypatch, capsys):
    canary = tmp_path / "PWNED"
    payload = f"__import__('os').system('touch {canary}') or n_hidden"
    old = {"inputs": 'x = "n_in"', "states": 'h = "n_hidden"', "params": 'b = ["n_hidden"]'}[table]
    new = {"params": f'b = ["{payload}"]'}.get(table, f'{key} = "{payload}"')
    text = BASE.replace(old, new)
    before = snapshot(out)
    code, err = run(command, spec(tmp_path, text), out, monkeypatch, capsys)
    assert code == 2 and not canary.exists()
    assert err.count("\n") == 1 and f"toy.toml:{line_of(text, payload)}:" in err and "is not allowed" in err
    assert snapshot(out) == before


BAD_SIZES = ["n_hidden - n_in", "0", "-1", "n_hidden/2", "1e9", "[1, 2]", "n_hidden * n_in", "n_hidden ** 2",
             "n_hiden", "2.0 * n_hidden", "99999999999", "", "n_hidden if 1 else n_in", "True", "(n_hidden,)",
             "n_hidden.real", "abs(n_hidden)"]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_sizes_that_cannot_work_are_refused_at_load_with_the_line(size, tmp_path):
    text = BASE.replace('x = "n_in"', f'x = "{size}"')
    with pytest.raises(SpecError) as info:
        load_spec(spec(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'toy.toml'}:{line_of(text, 'x = ')}: cell 'toy', inputs['x']: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size, expected", [("n_in", "n_in"), ("4*n_hidden", "4*n_hidden"), ("n_hidden + n_in", "n_hidden + n_in"),
                                            ("2 * (n_hidden + 1)", "2*n_hidden + 2"), ("3", "3"), (" n_out ", "n_out")])
def test_sizes_that_work(size, expected):
    assert str(parse_size(size)) == expected


@pytest.mark.parametrize("size", [0, -3, True, 2.5, sympy.Symbol("n_in") - sympy.Symbol("n_in"), sympy.Rational(1, 2),
                                  sympy.Symbol("k"), "n_in - 1"])
def test_the_python_api_checks_sizes_the_same_way(size):
    h, h_prev = sympy.symbols("h h_prev")
    (W,) = params("W")
    cell = Cell(name="api", inputs={"x": size}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden")},
                equations={"h": tanh(W @ h_prev)})
    with pytest.raises(CellError, match=r"cell 'api', inputs\['x'\]: "):
        lower(cell)


def test_the_python_api_never_parses_a_string_equation(tmp_path):
    canary = tmp_path / "PWNED"
    (W,) = params("W")
    cell = Cell(name="api", inputs={"x": "n_in"}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden")},
                equations={"h": f"__import__('os').system('touch {canary}')"})
    with pytest.raises(CellError, match="equation 'h': is a string"):
        lower(cell)
    with pytest.raises(TypeError, match="not a string"):
        W @ f"__import__('os').system('touch {canary}')"
    assert not canary.exists()


@pytest.mark.parametrize("field, value, message", [
    ("source", "x\nimport os", "contains the character '\\n'"),
    ("description", "x\r\nos.system('id')", "contains the character '\\r'"),
    ("source", "ESC \x1b[31mred", "contains the character '\\x1b'"),
    ("source", "Trojan \u202e source", "right-to-left override"),
    ("description", "line\u2028separator", "line separator"),
    ("source", "x" * 501, "at most 500"),
])
def test_free_text_with_control_characters_is_refused(field, value, message, tmp_path):
    text = BASE.replace('name = "toy"', f'name = "toy"\n{field} = {toml_str(value)}')
    with pytest.raises(SpecError) as info:
        load_spec(spec(tmp_path, text))
    assert f"toy.toml:{line_of(text, field + ' = ')}: cell 'toy', {field}: " in str(info.value)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["abc\n", "../escape", "a/b", "", "x" * 65, "1abc", "a-b", "é", "a b", "a\x00"])
def test_cell_names_are_checked_whole_from_a_spec_and_from_python(name, tmp_path):
    text = BASE.replace('name = "toy"', f"name = {toml_str(name)}")
    with pytest.raises(SpecError, match="not a valid cell name"):
        load_spec(spec(tmp_path, text))
    h, h_prev = sympy.symbols("h h_prev")
    (W,) = params("W")
    cell = Cell(name=name, inputs={"x": "n_in"}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden")},
                equations={"h": tanh(W @ h_prev)})
    with pytest.raises(CellError, match="not a valid cell name"):
        lower(cell)


@pytest.mark.parametrize("table, line", [("states", 'h = "n_hidden"\n"h\\n" = "n_hidden"'),
                                         ("params", 'b = ["n_hidden"]\n"b\\u001b[2J" = ["n_hidden"]'),
                                         ("params", 'b = ["n_hidden"]\n"lambda" = ["n_hidden"]')])
def test_names_are_checked_whole_and_shown_escaped(table, line, tmp_path, capsys):
    old = {"states": 'h = "n_hidden"', "params": 'b = ["n_hidden"]'}[table]
    path = spec(tmp_path, BASE.replace(old, line))
    assert main(["show", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "is not a valid name" in err or "is a Python keyword" in err


def test_a_python_api_cell_named_to_escape_writes_nothing_outside(tmp_path):
    h, h_prev = sympy.symbols("h h_prev")
    (W,) = params("W")
    cell = Cell(name="../escape", inputs={"x": "n_in"}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden")},
                equations={"h": tanh(W @ h_prev)})
    from symrnn.pipeline import generate

    with pytest.raises(CellError):
        generate([cell], tmp_path / "out")
    assert not any(tmp_path.rglob("*escape*"))


@pytest.mark.parametrize("argv", [["generate", "elman", "--out", ""], ["latex", "elman", "-o", ""]])
def test_an_empty_output_name_is_refused(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_constant_set_to_a_non_number_is_named_as_the_setting(value, capsys):
    path = ROOT / "symrnn" / "specs" / "lstm_forget_bias.toml"
    assert main(["show", "--spec", str(path), "--set", f"forget_bias={value}"]) == 2
    err = capsys.readouterr().err
    assert "--set forget_bias=" in err and "is not allowed; a constant is a finite number" in err
    assert "complex" not in err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_constant_in_the_file_that_is_not_finite_names_its_line(value, tmp_path):
    text = BASE.replace("[equations]", f"[constants]\nk = {value}\n[equations]").replace("+ b\"", "+ k * b\"")
    with pytest.raises(SpecError, match=rf"toy.toml:{line_of(text, 'k = ')}: \[constants\] k: .*finite"):
        parse_spec(text, "toy.toml")


@pytest.mark.parametrize("expr, message", [
    ("9**9**9 * h_prev", "'9**9**9' is beyond the range of a float64"),  # SymPy would compute it exactly, for ever
    ("h_prev * 10**400", "'10**400' is beyond the range of a float64"),
    ("h_prev * 1e999", "the number '1e999' is beyond the range of a float64"),
    ("h_prev * 1e200 * 1e200", "is beyond the range of a float64"),
    ("h_prev / 0", "the expression divides by zero"),
    ("0**-1 + h_prev", "'0**-1' divides by zero"),
    ("(-8)**0.5 * h_prev", "'(-8)**0.5' is not a real number"),
])
def test_numbers_that_cannot_work_are_refused_quickly(expr, message, tmp_path):
    text = BASE.replace('h = "tanh(a)"', f'h = "tanh(a) + {expr}"')
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        load_spec(spec(tmp_path, text))
    line = line_of(text, 'h = "tanh')
    assert f"toy.toml:{line}:" in str(info.value)


def test_small_and_tiny_powers_of_numbers_are_kept():
    text = BASE.replace('h = "tanh(a)"', 'h = "tanh(2**3 * a + (-2)**3 * b) + 2**-1000 * tanh(a)"')
    h = parse_spec(text, "toy.toml").equations["h"]
    assert {8, -8} <= set(h.atoms(sympy.Integer)) and any(0 < f < 1e-300 for f in h.atoms(sympy.Float)), h


@pytest.mark.parametrize("path", ["/dev/zero", "/bin/sh"])
def test_a_spec_path_that_is_no_text_file_is_one_line(path, capsys):
    assert main(["show", "--spec", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("larger than" in err or "not UTF-8 text" in err)


def test_deeply_nested_functions_generate_in_seconds(tmp_path):
    """23 nested sigmoids (the deepest the nesting limit allows): the derivation's
    statements are checked for linearity without an exponential expand."""
    import subprocess
    import sys

    inner = "h_prev"
    for _ in range(23):
        inner = f"sigmoid(h_prev + {inner})"
    path = spec(tmp_path, BASE.replace('h = "tanh(a)"', f'h = "tanh(a + {inner})"'))
    proc = subprocess.run([sys.executable, "-m", "symrnn", "check", "--spec", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stderr[-2000:]
