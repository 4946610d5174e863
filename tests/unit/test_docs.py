"""The two design documents stay true to the tree.

- docs/ARCHITECTURE.md §11 names every module of the package, and only modules that exist;
- the real imports follow its layering rules (§12), read from the same table;
- docs/svid-profile.md defines, once each, every rule id the code, the tests and the docs cite;
- every Markdown file that the code, the tests, bench/, deploy/, certs/, docs/ or README.md mention exists in the
  repository, and every `docs/ARCHITECTURE.md §N` or `docs/svid-profile.md §N` cited names a section there.

What counts as a citation of a Markdown file: any relative path ending in `.md` (`docs/ARCHITECTURE.md`, or
`deploy/README.md's`, or a link relative to the file it is in), resolved against the repository root or against the
directory of the file that mentions it, and found inside the repository. A path inside a URL (a whitespace-free
word containing `://`, such as a link to a public standard) is not a citation: public specs are linked by URL.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtlsmesh import errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mtlsmesh"
ARCHITECTURE = ROOT / "docs/ARCHITECTURE.md"
PROFILE = ROOT / "docs/svid-profile.md"

# Where citations are looked for, and which files there are text worth reading.
CITING = ("mtlsmesh", "tests", "bench", "deploy", "certs", "docs", "README.md")
TEXT_SUFFIXES = frozenset({".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".golden", ".pem"})

# A row of the module table: | `mtlsmesh/relay.py` | shell | ... |
_MODULE_ROW = re.compile(r"^\| `(mtlsmesh/[^`]*)` \| (\w+) \|", re.MULTILINE)
WINGS = ("core", "shell", "lab", "cli")
# What each wing may import (docs/ARCHITECTURE.md §12).
MAY_IMPORT = {
    "core": {"core"},
    "shell": {"core", "shell"},
    "lab": {"core", "lab"},
    "cli": {"core", "shell", "lab", "cli"},
}
LAB_LOADER = "mtlsmesh.cli.demo"  # the one module that may import the lab, and only inside a function
NEVER_TOGETHER = ("mtlsmesh.inbound", "mtlsmesh.outbound")
IO_MODULES = frozenset({"trio", "socket", "ssl", "OpenSSL", "subprocess", "asyncio"})

# A rule id as messages and comments cite it (ID-4, L-1, V-7, ...), and as the profile defines it: first in a row.
RULE_ID = re.compile(r"\b(?:ID|L|S|V|B)-[0-9]+\b")
_RULE_ROW = re.compile(r"^\| ((?:ID|L|S|V|B)-[0-9]+) \|", re.MULTILINE)

# A relative path to a Markdown file; `#anchor` and trailing punctuation are not part of it.
MD_PATH = re.compile(r"[\w./-]*[\w-]\.md\b")


def _text_files() -> Iterator[Path]:
    for name in CITING:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for path in sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and _is_text(path):
                yield path


def _is_text(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.name.startswith("Dockerfile")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------------------------------
# The module table


def module_table() -> list[tuple[str, str]]:
    """(path, wing) of each row of docs/ARCHITECTURE.md §11, in order; a package is its directory (`mtlsmesh/cli/`)."""
    text = ARCHITECTURE.read_text()
    start = text.index("\n## 11. ")
    end = text.find("\n## ", start + 1)
    return [(m[1], m[2]) for m in _MODULE_ROW.finditer(text[start : end if end != -1 else None])]


def module_files() -> list[str]:
    """Every module of the package as the table names it: `mtlsmesh/x.py`, or `mtlsmesh/sub/` for a package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        out.append(_rel(path.parent) + "/" if path.name == "__init__.py" else _rel(path))
    return out


def dotted(name: str) -> str:
    """`mtlsmesh/cli/ca.py` → `mtlsmesh.cli.ca`; `mtlsmesh/cli/` → `mtlsmesh.cli`."""
    return name.removesuffix("/").removesuffix(".py").replace("/", ".")


def test_the_module_table_names_every_module_and_only_those() -> None:
    table = [name for name, _ in module_table()]
    files = module_files()
    assert table, "no module table found in docs/ARCHITECTURE.md §11"
    repeated = sorted({name for name in table if table.count(name) > 1})
    assert not repeated, f"named twice in docs/ARCHITECTURE.md §11: {repeated}"
    missing = [name for name in files if name not in table]
    assert not missing, f"modules without a line in docs/ARCHITECTURE.md §11: {missing}"
    gone = [name for name in table if name not in files]
    assert not gone, f"docs/ARCHITECTURE.md §11 names modules that do not exist: {gone}"


def test_every_row_names_a_known_wing() -> None:
    odd = [(name, wing) for name, wing in module_table() if wing not in WINGS]
    assert not odd, f"wings are {', '.join(WINGS)}: {odd}"


# ---------------------------------------------------------------------------------------------------------------
# Layering


def _imports(module: str, source: str) -> Iterator[tuple[str, bool, int]]:
    """(imported name, whether at module level rather than inside a function, line) for every import in `source`;
    `from a import b` yields `a.b` (the caller decides whether that is a module or a name in `a`)."""
    is_package = module == "mtlsmesh" or (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists()

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((alias.name, top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                yield base, top, child.lineno
                yield from ((f"{base}.{alias.name}", top, child.lineno) for alias in child.names)
            else:
                inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, inner)

    yield from walk(ast.parse(source), True)


def layering_violations() -> list[str]:
    table = module_table()
    order = {dotted(name): index for index, (name, _) in enumerate(table)}
    wing = {dotted(name): kind for name, kind in table}
    problems: list[str] = []
    for name in module_files():
        module = dotted(name)
        if module not in order:
            problems.append(f"{name}: not in the module table (docs/ARCHITECTURE.md §11)")
            continue
        path = ROOT / (name + "__init__.py" if name.endswith("/") else name)
        for target, top, line in _imports(module, path.read_text()):
            where = f"{name}:{line}"
            root_name = target.split(".")[0]
            if root_name != "mtlsmesh":
                if wing[module] == "core" and root_name in IO_MODULES:
                    problems.append(f"{where}: the pure core imports {target}")
                continue
            if target not in order:
                continue  # a name inside a module (`from mtlsmesh.errors import MeshError`): its module is checked
            if order[target] >= order[module]:
                problems.append(f"{where}: imports {target}, which is not above it in the table")
            if wing[target] not in MAY_IMPORT[wing[module]]:
                problems.append(f"{where}: a {wing[module]} module imports {target} ({wing[target]})")
            if wing[target] == "lab" and wing[module] != "lab" and (module != LAB_LOADER or top):
                problems.append(f"{where}: imports the lab {target}; only {LAB_LOADER} may, inside a function")
            if {module, target} == set(NEVER_TOGETHER):
                problems.append(f"{where}: inbound and outbound never import each other")
    return problems


def test_imports_follow_the_layering_rules() -> None:
    problems = layering_violations()
    assert not problems, "against docs/ARCHITECTURE.md §12:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# Rule ids


def defined_rules() -> list[str]:
    return _RULE_ROW.findall(PROFILE.read_text())


def test_messages_point_at_the_rules_document() -> None:
    assert (ROOT / errors.RULES_DOC).resolve() == PROFILE
    assert errors.with_rules_doc("bad (L-1, V-6)") == f"bad (L-1, V-6); see {errors.RULES_DOC}"
    assert errors.with_rules_doc("bad (ID-4)") == f"bad (ID-4); see {errors.RULES_DOC}"
    assert errors.with_rules_doc("no rule here, not even certs/L-1/x") == "no rule here, not even certs/L-1/x"


def test_every_rule_is_defined_once() -> None:
    rules = defined_rules()
    assert rules, "no rule rows found in docs/svid-profile.md"
    repeated = sorted({rule for rule in rules if rules.count(rule) > 1})
    assert not repeated, f"defined more than once in docs/svid-profile.md: {repeated}"


def test_every_cited_rule_id_is_defined() -> None:
    defined = set(defined_rules())
    undefined = sorted(
        f"{_rel(path)}:{line}: {rule}"
        for path in _text_files()
        for line, text in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for rule in RULE_ID.findall(text)
        if rule not in defined
    )
    assert not undefined, "rule ids that docs/svid-profile.md does not define:\n" + "\n".join(undefined)


# ---------------------------------------------------------------------------------------------------------------
# Cited Markdown files


def md_citations(text: str) -> list[str]:
    """The relative Markdown paths `text` mentions, in order; paths inside URLs are left out."""
    found = []
    for word in text.split():
        if "://" in word:
            continue
        found += MD_PATH.findall(word)
    return found


@pytest.mark.parametrize(
    ("text", "cited"),
    [
        ("see docs/ARCHITECTURE.md §3", ["docs/ARCHITECTURE.md"]),
        ("[the profile](docs/svid-profile.md#1-the-spiffe-id).", ["docs/svid-profile.md"]),
        ("as deploy/README.md's check does", ["deploy/README.md"]),
        ("[up](../../README.md)", ["../../README.md"]),
        ("<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>", []),
        ("[the standard](https://example.org/a/b.md) and *.md globs", []),
    ],
)  # fmt: skip
def test_what_counts_as_a_citation(text: str, cited: list[str]) -> None:
    assert md_citations(text) == cited


def _exists_in_repository(cited: str, citing: Path) -> bool:
    for base in (ROOT, citing.parent):
        target = (base / cited).resolve()
        if target.is_relative_to(ROOT) and target.is_file():
            return True
    return False


_SECTION_CITATION = re.compile(r"\b(docs/ARCHITECTURE|docs/svid-profile)\.md §([0-9]+)")


def test_every_cited_section_exists() -> None:
    numbers = {
        name: set(re.findall(r"^## ([0-9]+)\. ", (ROOT / f"{name}.md").read_text(), re.MULTILINE))
        for name in ("docs/ARCHITECTURE", "docs/svid-profile")
    }
    missing = sorted(
        f"{_rel(path)}:{line}: {name}.md §{number}"
        for path in _text_files()
        for line, text in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for name, number in _SECTION_CITATION.findall(text)
        if number not in numbers[name]
    )
    assert not missing, "sections cited but not in the document:\n" + "\n".join(missing)


def test_every_cited_markdown_file_exists() -> None:
    missing = sorted(
        f"{_rel(path)}:{line}: {cited}"
        for path in _text_files()
        for line, text in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for cited in md_citations(text)
        if not _exists_in_repository(cited, path)
    )
    assert not missing, "Markdown files cited but not in the repository:\n" + "\n".join(missing)
