"""The submission's code: train_gpt.py's minifier and the self-extracting script (wrapper) that holds the sources."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

import train_gpt as tg

SOURCE = '''#!/usr/bin/env python
"""Module docstring,
two lines."""
from __future__ import annotations  # a future import must stay first

import re

PIECE = "▁"  # non-ASCII before a comment: tokenize counts characters
TEMPLATE = """not a docstring: # stays

  indented, with trailing blanks   
"""


class Empty(RuntimeError):
    """Only a docstring: the body keeps `...`."""


class Point:
    """Docstring with non-ASCII at its end: ünïcode"""  # and a comment

    def norm(self) -> float:
        \'\'\'Single-quoted docstring.\'\'\'
        # a comment line
        return 1.0 # two words "# not a comment" after it


async def fetch():
    "A plain-string docstring."
    return re.sub("#", "", "a#b")
'''

EXPECTED = '''


from __future__ import annotations

import re

PIECE = "▁"
TEMPLATE = """not a docstring: # stays

  indented, with trailing blanks   
"""


class Empty(RuntimeError):
    ...


class Point:


    def norm(self) -> float:


        return 1.0


async def fetch():

    return re.sub("#", "", "a#b")
'''


def test_minified_drops_comments_and_docstrings_and_nothing_else():
    assert tg.minified(SOURCE) == EXPECTED
    assert tg.minified(EXPECTED) == EXPECTED


def without_docstrings(tree: ast.AST) -> ast.AST:
    """The reference: docstrings removed from the syntax tree (`...` where one was a whole body)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            doc = node.body[0]
            node.body = node.body[1:] or [ast.Expr(ast.Constant(...), lineno=doc.lineno, col_offset=doc.col_offset)]
    return tree


def statement_lines(tree: ast.AST) -> list[tuple[str, int]]:
    return [(type(n).__name__, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.stmt)]


@pytest.mark.parametrize("path", ["train_gpt.py", *sorted(p.relative_to(REPO).as_posix()
                                                          for p in (REPO / "kernels").glob("*.py"))])
def test_minified_project_files_run_the_same_code_on_the_same_lines(path):
    """What runs is unchanged: the minified file's syntax tree is the original's without its docstrings, every
    statement on its original line (tracebacks point at the repository's lines); minifying again changes nothing."""
    source = (REPO / path).read_text()
    small = tg.minified(source)
    reference = without_docstrings(ast.parse(source))
    assert ast.dump(ast.parse(small)) == ast.dump(reference)
    assert statement_lines(ast.parse(small)) == statement_lines(reference)
    assert tg.minified(small) == small
    assert "#" not in "".join(line.split('"')[0].split("'")[0] for line in small.splitlines()), "a comment is left"
    assert len(small) < 0.9 * len(source)


def run_python(python: str, folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-I", "-B", *args], cwd=folder, capture_output=True, text=True, timeout=300,
                          env=env)


FAKE_MAIN = '''
import hashlib, inspect
import pkg
from pkg.sub import double, fails


def main():
    print("main", double(21), pkg.LAZY, hashlib.sha256(__loader__.get_source(__name__).encode()).hexdigest())
    print(inspect.getsource(double).strip().splitlines()[0])
    fails()


if __name__ == "__main__":
    main()
'''
FAKE_PKG = "import importlib\nLAZY = importlib.import_module('.sub', __name__).__name__\n"
FAKE_SUB = '''def double(x):
    return 2 * x
{noise}

def fails():
    raise ValueError("raised from line 6 of pkg/sub.py")
'''


def fake_wrapper(folder: Path) -> bytes:
    """A wrapper of a fake script and package, with 24 KB of random bytes in the sources so that the compressed
    stream holds every byte value, the ones the literal must escape included."""
    rng = random.Random(0)
    noise = "NOISE = " + repr(bytes(rng.randrange(256) for _ in range(24_000)))
    sources = {"train_gpt.py": FAKE_MAIN, "pkg/__init__.py": FAKE_PKG, "pkg/sub.py": FAKE_SUB.format(noise=noise)}
    code = tg.code_wrapper(sources)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_bytes(code)
    return code


def other_pythons() -> list[str]:
    """Python 3.11-3.13 interpreters on PATH that run (the script must run under each the project supports)."""
    found = [shutil.which(f"python3.{m}") for m in (11, 12, 13)]
    runs = [subprocess.run([p, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
            for p in found if p]
    return [r.stdout.strip() for r in runs if r.returncode == 0]


PYTHONS = sorted({sys.executable, *other_pythons()})


@pytest.mark.parametrize("python", PYTHONS)
def test_wrapper_runs_its_script_and_serves_its_modules(tmp_path, python):
    code = fake_wrapper(tmp_path / "sub")
    for escaped in (b"\\x00", b"\\0", b"\\n", b"\\r", b"\\'", b"\\\\"):  # in the literal
        assert escaped in code, escaped
    assert b"\0" not in code and b"\r" not in code and code.count(b"\n") == tg.WRAPPER.count(b"\n")
    r = run_python(python, tmp_path / "sub", "train_gpt.py")
    sha = hashlib.sha256(FAKE_MAIN.encode()).hexdigest()  # the loader gives the source it holds, not the file's
    assert r.stdout.splitlines() == [f"main 42 pkg.sub {sha}", "def double(x):"], r.stderr
    # a traceback names the module inside the script and the line of its source
    assert f'{tmp_path / "sub" / "train_gpt.py" / "pkg" / "sub.py"}", line 6, in fails' in r.stderr
    assert "ValueError: raised from line 6 of pkg/sub.py" in r.stderr and r.returncode == 1
    imported = run_python(python, tmp_path / "sub", "-c",
                          "import sys; sys.path.insert(0, '.'); import train_gpt; print(train_gpt.double(4))")
    assert imported.stdout == "8\n", imported.stderr  # imported, not run: main() does not run


KERNEL_CHECK = textwrap.dedent('''
    import inspect, sys, torch
    sys.path.insert(0, ".")
    import train_gpt as tg
    tg.use_fused_kernels("mlp,qkv,loss,norm")
    import kernels
    from kernels import mlp, qkv, rmsnorm, cross_entropy
    assert kernels.triton_available("cpu")
    for m in (kernels, mlp, qkv, rmsnorm, cross_entropy):
        assert m.__file__.startswith(tg.__file__ + "/kernels/"), m.__file__
    assert "@triton.jit" in inspect.getsource(mlp) and "#" not in inspect.getsource(rmsnorm.rms_norm)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    torch.manual_seed(0)
    x, w1, w2 = torch.randn(65, 96), torch.randn(256, 96) / 96 ** 0.5, torch.randn(96, 256) / 16
    assert mlp._use_triton(x, w1, w2)
    print("mlp", rel(tg.RELU2_MLP(x, w1, w2), mlp.relu2_mlp_reference(x.double(), w1.double(), w2.double())))
    q = torch.randn(2, 5, (8 + 2 * 4) * 64) * 3
    angles = torch.rand(5, 8) * 6.3
    gain, ve = torch.rand(8) + 0.5, torch.randn(2, 5, 4 * 64)
    assert qkv._use_triton(q, 8, 4)
    got = tg.QKV_HEADS(q, angles.cos(), angles.sin(), gain, ve, 8, 4)
    want = qkv.qkv_heads_reference(q.double(), angles.cos().double(), angles.sin().double(), gain.double(),
                                   ve.double(), 8, 4)
    print("qkv", max(rel(a, b) for a, b in zip(got, want)))
    h = torch.randn(33, 64)
    print("norm", rel(tg.RMS_NORM(h), rmsnorm.rms_norm_reference(h.double())))
    w, t = torch.randn(1000, 64) / 2, torch.randint(0, 1000, (33,))
    print("loss", rel(tg.LM_HEAD_LOSS(h, w, t, 30.0, "mean"),
                      tg.torch_lm_head_loss(h.double(), w.double(), t, 30.0, "mean")))
    own = open(tg.__file__, "rb").read()  # counted, and what this machine builds from the sources it holds
    print("counted", tg.submission_code()[1] == own == tg.code_wrapper(tg.submission_code()[0]))
''')


@pytest.mark.skipif(not tg.importlib.util.find_spec("triton"), reason="needs triton (its interpreter on a CPU)")
def test_wrapper_kernels_run_in_triton_interpreter(tmp_path):
    """A wrapper holding every kernel module, built the way a CUDA run builds it; in a fresh interpreter that sees
    only the wrapper, Triton's @jit reads the kernels' source from it and the kernels compute what the torch
    references compute; the run counts the wrapper's own bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    build = subprocess.run([sys.executable, "-c", "import sys, train_gpt as tg; tg.use_fused_kernels('mlp,qkv,loss,norm');"
                            " sys.stdout.buffer.write(tg.submission_code()[1])"], cwd=REPO, env=env,
                           capture_output=True, timeout=300)
    assert build.returncode == 0, build.stderr.decode()[-2000:]
    (tmp_path / "train_gpt.py").write_bytes(build.stdout)
    r = run_python(sys.executable, tmp_path, "-c", KERNEL_CHECK, env=dict(env, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    errors = dict(line.split() for line in r.stdout.splitlines())
    assert errors.pop("counted") == "True"
    assert set(errors) == {"mlp", "qkv", "norm", "loss"}
    for op, err in errors.items():
        assert float(err) < 2e-5, (op, err)


def test_a_running_wrapper_counts_its_own_file(tmp_path):
    """Another machine's lzma may code the same sources to other bytes: what counts is the file that runs. Here one
    escape of the literal is spelled another way (same string, two bytes more)."""
    sources = {"train_gpt.py": tg.minified((REPO / "train_gpt.py").read_text())}  # what a CPU run's wrapper holds
    code = tg.code_wrapper(sources)
    at = code.index(b"\\0", code.index(b"lzma.decompress("))
    while code[at + 2:at + 3].isdigit() or code[at - 1:at] == b"\\":
        at = code.index(b"\\0", at + 1)
    other = code[:at] + b"\\x00" + code[at + 2:]
    (tmp_path / "train_gpt.py").write_bytes(other)
    r = run_python(sys.executable, tmp_path, "-c", "import hashlib, json, sys; sys.path.insert(0, '.'); "
                   "import train_gpt as tg; s, c = tg.submission_code(); print(len(c), hashlib.sha256(c).hexdigest(), "
                   "hashlib.sha256(json.dumps(s).encode()).hexdigest())")
    held = hashlib.sha256(json.dumps(sources).encode()).hexdigest()  # the sources it holds, as this run minified them
    assert r.stdout.split() == [str(len(code) + 2), hashlib.sha256(other).hexdigest(), held], r.stderr[-2000:]
