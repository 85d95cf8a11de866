"""The layout shows the architecture (docs/architecture.md): one direction of imports,
no cycles, no private names across modules, and a core that knows no plug-in's job type.
Read from the source itself (`ast`), so a new module is checked the day it is added."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from supervisor_app.metrics import METRIC_NAMES
from supervisor_app.migrate import discover, sql_dir
from workers.core import plugins

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("supervisor_app", "workers")
# What the core must not name (issue #13): the learning pipeline's types and domain.
# (LEARNING_DATABASE_URL is the worker role's variable: a contract of DESIGN.md, kept.)
APP_WORDS = re.compile(r"\b(pdf|vision|feedback|submissions?|owner sub|learning)\b",
                       re.IGNORECASE)
CONTRACT_NAMES = ("LEARNING_DATABASE_URL",)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import, in functions too; not
    those under `if TYPE_CHECKING:`, which never run (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [a.name for a in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a `from pkg import mod` counts as mod)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if module in MODULES and len(targets) < len(names) or module in MODULES and not names:
                targets.append(module)
            graph[name] |= {t for t in targets if t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_cycle_and_the_real_edges() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _edges()
    assert "workers.core.queue" in graph["supervisor_app.duties"]
    assert "supervisor_app.cli.batches" in graph["supervisor_app.cli.jobs"]


def test_no_import_cycles_in_supervisor_app_or_workers() -> None:
    assert _cycles(_edges()) == []


def test_dependencies_point_one_way() -> None:
    """supervisor_app -> workers.{learning,backup} -> workers.core, never back."""
    wrong = []
    for name, targets in _edges().items():
        for t in targets:
            if name.startswith("workers") and t.startswith("supervisor_app"):
                wrong.append((name, t))
            if name.startswith("workers.core") and t.startswith(("workers.learning",
                                                                  "workers.backup")):
                wrong.append((name, t))
            if name.startswith("workers.learning") and t.startswith("workers.backup") or \
                    name.startswith("workers.backup") and t.startswith("workers.learning"):
                wrong.append((name, t))
            if name.startswith("supervisor_app") and t.startswith(("workers.learning",
                                                                    "workers.backup")):
                wrong.append((name, t))  # the supervisor reaches plug-ins by entry point
    assert wrong == []


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [(name, module, n) for name, path in MODULES.items()
               for module, names in _imports(path)
               if module.split(".")[0] in PACKAGES
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def _code_words(path: Path) -> list[str]:
    """Identifiers and string constants of a module, docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.arg):
            words.append(node.arg)
    return [w for w in words if w not in CONTRACT_NAMES]


def test_the_core_and_the_supervisor_name_no_job_type_of_the_learning_pipeline() -> None:
    named = {str(path.relative_to(REPO)): hits for name, path in MODULES.items()
             if name.startswith(("workers.core", "supervisor_app"))
             if (hits := sorted({m.group(0) for w in _code_words(path)
                                 for m in APP_WORDS.finditer(w.replace("_", " "))}))}
    assert named == {}


def test_the_core_migrations_create_nothing_of_the_learning_pipeline() -> None:
    for m in discover(sql_dir()):
        code = "\n".join(line.split("--", 1)[0] for line in m.sql.splitlines())
        assert not APP_WORDS.search(code), (m.path.name, APP_WORDS.search(code).group(0))


def test_the_core_metrics_are_the_cores_and_the_apps_come_from_its_plug_in() -> None:
    assert not [n for n in METRIC_NAMES if not n.startswith("jobvisor_")]
    learning = plugins.for_type("vision")
    assert learning is not None and learning.name == "learning" and learning.metrics


def test_jobvisors_own_plug_ins_declare_what_the_issue_lists() -> None:
    by_name = {p.name: p for p in plugins.installed()}
    learning, backup = by_name["learning"], by_name["backup"]
    assert learning.types == {"pdf", "vision", "feedback"}
    assert [m.name for m in discover(learning.migrations_dir())][:3] == \
        ["learning", "clock_times", "outcomes"]
    assert learning.commands and learning.job_settings and learning.outcomes
    assert "/internal/health/learning-worker" in learning.probes
    assert backup.types == {"backup"} and backup.commands and backup.migrations is None
    # Every spec a plug-in names resolves (a typo fails here, not at a scrape or a crash).
    for plugin in by_name.values():
        for spec in [*plugin.handlers.values(), *plugin.probes.values(), plugin.commands,
                     plugin.metrics, plugin.job_settings, plugin.outcomes]:
            if spec:
                assert callable(plugins.resolve(spec, what=plugin.name)), spec


def test_no_module_grows_past_about_500_lines_without_a_reason() -> None:
    # The reason for each exception is in docs/architecture.md ("Module sizes").
    allowed = {"workers/core/queue.py", "workers/core/runtime.py", "workers/backup/dump.py",
               "workers/learning/pdf_render.py", "supervisor_app/dashboard.py",
               "supervisor_app/config.py"}
    big = {str(p.relative_to(REPO)) for p in MODULES.values()
           if len(p.read_text(encoding="utf-8").splitlines()) > 520}
    assert big <= allowed, big - allowed
