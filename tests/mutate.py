"""A small mutation harness: `python -m tests.mutate records` (or `sniff`) mutates the module one change at a time and
runs its unit tests against each mutant; a mutant the tests fail on is killed, one they pass is a survivor. Prints
the survivors (line and change) and the score, killed / all.

The changes: a comparison turned into its neighbour (< and <=, == and !=, in and not in, is and is not), an
arithmetic or bitwise operator into another (+ -, << >>, & |, ^ |, // *), `and` into `or`, a `not` dropped, an
integer constant moved by one, True and False swapped, an augmented assignment's operator flipped. Strings are left
alone (they are messages). Some mutants are equivalent (no test can tell them apart: a bound that is never reached
exactly, a message's number): the survivors are listed so that each can be judged.

Each mutant runs in a copy of the package in a temporary directory (the tree itself is never touched), with
`-x`, a timeout, and `--jobs` at a time (default 2). Bounded: at most `--limit` mutants (default all).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {
    "records": ["tests/unit/test_records.py", "tests/unit/test_records_wire.py", "tests/unit/test_properties.py"],
    "sniff": ["tests/unit/test_sniff.py", "tests/unit/test_sniff_bounds.py", "tests/unit/test_properties.py"],
}
TIMEOUT = 60.0

_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip
_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr,
           ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr, ast.FloorDiv: ast.Mult, ast.Mult: ast.FloorDiv,
           ast.Mod: ast.FloorDiv}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Mutant:
    index: int  # which mutable spot, in ast.walk order
    line: int
    change: str


def _inert(tree: ast.AST, source: str) -> set[int]:
    """Nodes no mutation should touch: annotations (strings under `from __future__ import annotations`),
    decorators, and the lines marked `pragma: no cover` (unreachable by design: a 2^64 sequence number)."""
    lines = source.splitlines()
    skipped: set[int] = set()
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            roots += node.decorator_list
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            roots.append(node.returns)
        if isinstance(node, ast.arg) and node.annotation is not None:
            roots.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        line = getattr(node, "lineno", 0)
        if line and "pragma: no cover" in lines[line - 1]:
            roots.append(node)
    for root in roots:
        skipped.update(id(n) for n in ast.walk(root))
    return skipped


def _spots(tree: ast.AST, source: str) -> Iterator[tuple[ast.AST, str]]:
    """Every node a mutation applies to, with its description; the same order every time (ast.walk)."""
    inert = _inert(tree, source)
    for node in ast.walk(tree):
        if id(node) in inert:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE:
                    yield node, f"compare {i}: {type(op).__name__} -> {_COMPARE[type(op)].__name__}"
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINARY:
            yield node, f"{type(node.op).__name__} -> {_BINARY[type(node.op)].__name__}"
        elif isinstance(node, ast.BoolOp):
            yield node, f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not dropped"
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, f"{node.value} -> {not node.value}"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, f"{node.value} -> {node.value + 1}"


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    return [Mutant(i, getattr(node, "lineno", 0), change) for i, (node, change) in enumerate(_spots(tree, source))]


def mutate(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, change = list(_spots(tree, source))[index]
    if isinstance(node, ast.Compare):
        i = int(change.split(":")[0].split()[1])
        node.ops[i] = _COMPARE[type(node.ops[i])]()
    elif isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = _BINARY[type(node.op)]()
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        replacement = copy.deepcopy(node.operand)
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, replacement)
                elif isinstance(value, list):
                    value[:] = [replacement if item is node else item for item in value]
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        node.value = not node.value
    elif isinstance(node, ast.Constant):
        node.value = node.value + 1
    return ast.unparse(ast.fix_missing_locations(tree))


def run_one(module: str, source: str, mutant: Mutant, workdir: Path) -> bool:
    """Whether the tests kill `mutant` (fail, error or time out)."""
    copy_dir = Path(tempfile.mkdtemp(dir=workdir))
    try:
        shutil.copytree(ROOT / "mtlsmesh", copy_dir / "mtlsmesh")
        shutil.copytree(ROOT / "tests", copy_dir / "tests", ignore=shutil.ignore_patterns("e2e", "__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy_dir / "pyproject.toml")
        (copy_dir / "mtlsmesh" / f"{module}.py").write_text(mutate(source, mutant.index))
        env = dict(os.environ, PYTHONPATH=str(copy_dir), PYTHONDONTWRITEBYTECODE="1")
        args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS[module]]
        try:
            done = subprocess.run(args, cwd=copy_dir, env=env, capture_output=True, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return True
        return done.returncode != 0
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", choices=sorted(TESTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    source = (ROOT / "mtlsmesh" / f"{args.module}.py").read_text()
    todo = mutants(source)[: args.limit]
    survivors: list[Mutant] = []
    with tempfile.TemporaryDirectory() as workdir, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda m: (m, run_one(args.module, source, m, Path(workdir))), todo)
        for mutant, killed in results:
            if not killed:
                survivors.append(mutant)
                print(f"survived: line {mutant.line}: {mutant.change}", flush=True)
    killed = len(todo) - len(survivors)
    print(f"{args.module}: {killed}/{len(todo)} mutants killed ({100 * killed / max(len(todo), 1):.1f} %)")


if __name__ == "__main__":
    main()
