"""The library never imports the stages: ``pipeline/`` is components, ``stages/`` the recipes
over them. Checked on the source (any import statement, and any ``stages`` module name given to
importlib, find_spec or runpy); a module's ``if __name__ == "__main__":`` block may
forward to a stage's command line (``python -m pipeline.cluster``)."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def _main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


IMPORTERS = {"import_module", "find_spec", "run_module", "__import__"}


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _leading_text(arg: ast.expr) -> str:
    """A string argument's literal text, or an f-string's leading literal part."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values:
        return _leading_text(arg.values[0])
    return ""


def stage_references(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for each place a module refers to the stages package, outside __main__."""
    found: list[tuple[int, str]] = []
    skip = {id(n) for top in tree.body if _main_guard(top) for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "stages"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stages":
            found.append((node.lineno, f"from {node.module}"))
        elif isinstance(node, ast.Call) and _callee(node) in IMPORTERS and node.args:
            name = _leading_text(node.args[0])
            if name == "stages" or name.startswith("stages."):
                found.append((node.lineno, f"{_callee(node)}({name!r}...)"))
    return found


def test_library_never_imports_stages() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        for line, what in stage_references(ast.parse(path.read_text(), str(path)))
    ]
    assert not offenders, "pipeline/ refers to stages/:\n" + "\n".join(offenders)


def test_the_check_finds_a_stage_import() -> None:
    source = (
        "import stages.train\n"
        "from stages import score\n"
        "import importlib\n"
        "importlib.import_module('stages.evaluate')\n"
        "importlib.util.find_spec(f'stages.{name}')\n"
        "print(f'cluster.stages.{name}')\n"
        "if __name__ == '__main__':\n"
        "    import stages.cluster\n"
    )
    assert [line for line, _ in stage_references(ast.parse(source))] == [1, 2, 4, 5]
