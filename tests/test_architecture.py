"""The layering of sdjax, checked on the source: lower layers never import higher ones, no package reaches
into another's private modules or names, and no two modules import each other in a cycle.

Layers, lowest first. A unit may import its own modules and any unit of a lower layer, never a peer of its
own layer or anything above (imports inside functions and under TYPE_CHECKING count too):

  0  sdjax.files (atomic writes, fresh names), sdjax.errors (one-line messages), sdjax.process (the CLIs'
     process-wide settings)
  1  sdjax.xla_options, sdjax.memory, sdjax.compile_cache, sdjax.keys, sdjax.images, sdjax.tokenizer,
     sdjax.targets, sdjax.options (the generation options, checked)
  2  sdjax.nn (modules, layers, LoRA math), sdjax.schedulers, sdjax.control_images (ControlNet condition
     images, read through sdjax.images)
  3  sdjax.convert (file formats <-> model parts), sdjax.prompts, sdjax.sharding
  4  sdjax.generate (the compiled program), sdjax.sdxl (SDXL's prompt rows and time ids)
  5  sdjax.request (generation options -> plan and inputs)
  6  sdjax.pipeline, the sdjax package itself
  7  sdjax.testing (random-weight models)
  8  sdjax.bench, train, sample.py (the users of the library)

Run as a script (`python tests/test_architecture.py`, part of `make lint`) it prints every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    ("sdjax.files", "sdjax.errors", "sdjax.process"),
    (
        "sdjax.xla_options",
        "sdjax.memory",
        "sdjax.compile_cache",
        "sdjax.keys",
        "sdjax.images",
        "sdjax.tokenizer",
        "sdjax.targets",
        "sdjax.options",
        "sdjax.prompt_editing",
    ),
    ("sdjax.nn", "sdjax.schedulers", "sdjax.control_images"),
    ("sdjax.convert", "sdjax.prompts", "sdjax.sharding"),
    ("sdjax.generate", "sdjax.sdxl"),
    ("sdjax.request",),
    ("sdjax.pipeline", "sdjax"),
    ("sdjax.testing",),
    ("sdjax.bench", "train", "sample"),
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of sdjax/, train/ and sample.py."""
    found = {"sample": ROOT / "sample.py"}
    for package in ("sdjax", "train"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: the longest unit name that is the module or a package of it."""
    best = None
    for unit in LAYER_OF:
        if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    if best is None:
        raise ValueError(f"module {module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str, str]]:
    """(line, imported module, imported name or "") of every project import in a file, wherever it is."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [
                (node.lineno, alias.name, "") for alias in node.names if alias.name.split(".")[0] in ("sdjax", "train")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in ("sdjax", "train", "sample"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((node.lineno, sub, "") if sub in known else (node.lineno, node.module, alias.name))
    return out


def violations() -> list[str]:
    known = modules()
    problems = []
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        unit = unit_of(module)
        where = path.relative_to(ROOT)
        graph[module] = set()
        for line, target, name in imports(module, path, known):
            if target not in known:
                problems.append(f"{where}:{line} imports {target}, which is not a module of the project")
                continue
            graph[module].add(target)
            other = unit_of(target)
            if other != unit and LAYER_OF[other] >= LAYER_OF[unit] and not (unit == "sdjax" and other != "sdjax"):
                problems.append(
                    f"{where}:{line} imports {target}: {unit} (layer {LAYER_OF[unit]}) may not import "
                    f"{other} (layer {LAYER_OF[other]})"
                )
            private = [p for p in target.split(".")[1:] if p.startswith("_") and p != "__init__"]
            if other != unit and (private or name.startswith("_")):
                problems.append(f"{where}:{line} imports the private {target}{'.' + name if name else ''} of {other}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_layers_point_down_and_nothing_is_cyclic():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The check is not vacuous: a format module importing the pipeline is caught."""
    fake = tmp_path / "sdjax" / "convert"
    fake.mkdir(parents=True)
    (tmp_path / "sdjax" / "__init__.py").write_text("")
    (tmp_path / "sdjax" / "pipeline.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from sdjax.pipeline import StableDiffusionPipeline\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "sample.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = violations()
    assert any("sdjax/convert/bad.py:2 imports sdjax.pipeline" in p for p in problems), problems


if __name__ == "__main__":
    found = violations()
    print("\n".join(found) or "layers: ok (every import points down, no cycles)")
    raise SystemExit(1 if found else 0)
