"""The house: the project's modules import each other in one direction (no circle), only at their top."""
import ast

from conftest import REPO

MODULES = ("data", "model", "sample", "evaluate", "record", "train_dit")


def project_imports(name):
    """(imports at module level, imports inside functions) of the project's own modules by `name`."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else {node.module.split(".")[0]}
            (top if node in tree.body else nested).update(names & set(MODULES))
    return top, nested


def test_the_modules_import_each_other_at_their_top_and_in_one_direction():
    graph = {}
    for name in MODULES:
        top, nested = project_imports(name)
        assert not nested, f"{name}.py imports {sorted(nested)} inside a function"
        graph[name] = top
    done, path = set(), []

    def visit(name):  # depth first: meeting a module on the current path is a circle
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        if name not in done:
            path.append(name)
            for other in sorted(graph[name]):
                visit(other)
            path.pop()
            done.add(name)
    for name in MODULES:
        visit(name)
    assert not graph["data"] and graph["model"] == {"data"} and "evaluate" not in graph["sample"]
