"""Every module imports (catches syntax errors and undefined names in code no other test reaches)."""

import importlib
import pkgutil

import pytest

import tether

MODULES = sorted(m.name for m in pkgutil.walk_packages(tether.__path__, "tether."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_every_cli_command_points_at_a_config_and_run():
    """A command's module has its config class and run(); one not built yet says so instead of crashing."""
    import importlib.util

    from tether.cli import COMMANDS, main

    for command, (module_name, cls_name) in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            with pytest.raises(SystemExit, match="not yet available"):
                main(command.split())
            continue
        module = importlib.import_module(module_name)
        assert hasattr(module, cls_name), command
        assert callable(getattr(module, "run", None)), command


def _import_graph() -> dict[str, set[str]]:
    """Module -> the tether modules it imports (at the top or inside functions), read from the source."""
    import ast
    from pathlib import Path

    root = Path(tether.__file__).parent.parent
    files = {}
    for path in sorted(root.joinpath("tether").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in files and m not in (name, "tether")}
    return graph


def test_no_import_circle_in_the_package():
    """Each layer imports only layers below it: no module reaches itself through its imports."""
    graph = _import_graph()
    assert {"tether.forward", "tether.recipes.ppo"} <= set(graph)  # the walk found the package

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert circles == [], f"modules in an import circle: {circles}"


def test_layers_go_one_way():
    """The plumbing under the recipes never imports a recipe, and online DPO builds on DPO, not the reverse."""
    graph = _import_graph()
    below = ("tether.forward", "tether.packing", "tether.models", "tether.wrappers", "tether.generation",
             "tether.data", "tether.reference", "tether.prompts", "tether.evaluate", "tether.losses")
    for name, imports in graph.items():
        if name.startswith(below):
            assert not any(m.startswith("tether.recipes") for m in imports), name
    assert "tether.recipes.dpo" in graph["tether.recipes.online_dpo"]
    assert "tether.recipes.online_dpo" not in graph["tether.recipes.dpo"]


@pytest.mark.parametrize("module_name", ["tether.recipes.sft", "tether.recipes.reward", "tether.recipes.ppo",
                                         "tether.recipes.dpo", "tether.recipes.online_dpo", "tether.recipes.grpo"])
def test_a_recipe_offers_only_keys_it_reads(module_name):
    """Every key of a recipe's config is read somewhere on its way: the recipe, the engine, the model loader (LoRA)
    or the loss table (a loss's hyper-parameters by name)."""
    import dataclasses
    import inspect
    import re

    from tether import engine, losses, models, rundir
    from tether.cli import COMMANDS
    from tether.distributed import placement, ray_backend, rollout

    module = importlib.import_module(module_name)
    cls = next(getattr(module, c) for m, c in COMMANDS.values() if m == module_name)
    source = "".join(inspect.getsource(m) for m in (module, engine, models, losses, rundir, placement, ray_backend,
                                                     rollout))
    if module_name == "tether.recipes.online_dpo":
        source += inspect.getsource(importlib.import_module("tether.recipes.dpo"))
    unread = [f.name for f in dataclasses.fields(cls)
              if not re.search(rf"\.{f.name}\b|\"{f.name}\"", source.replace(f"{f.name}: ", ""))]
    assert unread == [], f"{cls.__name__} offers keys nothing reads: {unread}"
