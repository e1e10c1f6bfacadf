"""coat's modules stand in layers, and every import points down: the import graph read from the source (imports
inside functions included) has no edge from a layer to a higher one, so a package can be read with only what is
below it in mind."""

import ast
from pathlib import Path

COAT = Path(__file__).parents[1] / "coat"

# Lowest first. A module may import from its own package and from any layer below its own, never from above.
LAYERS = [
    {"errors", "roles"},
    {"locks", "provenance", "ray_runtime"},
    {"spool"},
    {"config"},
    {"config_help", "tracking", "backbones"},
    {"experts"},
    {"data"},
    {"model"},
    {"eval"},
    {"train"},
    {"tune"},
    {"analysis", "preflight"},
    {"report"},
    {"cli"},
]
LAYER = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def part(module: str) -> str:
    """The top-level piece of coat a dotted module name belongs to (`coat.eval.evaluate` -> `eval`)."""
    return module.split(".")[1]


def coat_imports(path: Path) -> set[str]:
    """Every coat module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "coat":
            found |= {f"coat.{a.name}" for a in node.names} if node.module == "coat" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "coat" and "." in a.name}
    return found


def test_every_module_has_a_layer():
    parts = {path.relative_to(COAT).parts[0].removesuffix(".py") for path in COAT.glob("*")
             if path.suffix == ".py" or (path / "__init__.py").exists()} - {"__init__"}
    assert parts - set(LAYER) == set(), "new module or package: give it a place in LAYERS"


def test_no_import_points_up_a_layer():
    upward = []
    for path in sorted(COAT.rglob("*.py")):
        importer = ".".join(("coat", *path.relative_to(COAT).with_suffix("").parts))
        if importer == "coat.__init__":
            continue
        for imported in coat_imports(path):
            if part(imported) != part(importer) and LAYER[part(imported)] > LAYER[part(importer)]:
                upward.append(f"{importer} -> {imported}")
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)
