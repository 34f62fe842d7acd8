"""The package's import graph, read from the source: no cycle, imports one way through the
layers the README lists, no function-level import between vaekl modules, and no module using
another's private names."""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vaekl")

# Bottom to top (README, "Layout"); a module may import only modules of earlier layers.
LAYERS = [
    ["vaekl", "vaekl.progress", "vaekl.user_modules", "vaekl.schedules", "vaekl.sharding", "vaekl.kl",
     "vaekl.metrics", "vaekl.dsprites", "vaekl.host_memory"],
    ["vaekl.models.gaussian"], ["vaekl.models.posteriors", "vaekl.models.likelihoods", "vaekl.models.conv"],
    ["vaekl.models.priors", "vaekl.models.networks"], ["vaekl.models.architectures"], ["vaekl.models.vae"],
    ["vaekl.models", "vaekl.estimators", "vaekl.kl_estimators"], ["vaekl.regularizers"], ["vaekl.loops"],
    ["vaekl.objectives"], ["vaekl.data", "vaekl.disentanglement"], ["vaekl.config"], ["vaekl.rundir"],
    ["vaekl.checkpoints", "vaekl.trajectory"], ["vaekl.cli"],
    ["vaekl.train.state"], ["vaekl.train.step"], ["vaekl.train.programs"], ["vaekl.train.groups"],
    ["vaekl.train.loop"], ["vaekl.train"], ["vaekl.runs"], ["vaekl.evaluate", "vaekl.gradient_variance"],
    ["vaekl.sweep"], ["vaekl.analysis"], ["vaekl.report"],
]


def modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported vaekl module, inside a function?, line) for every import in ``path``."""
    tree = ast.parse(open(path).read())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        inside, q = False, node
        while q in parents:
            q = parents[q]
            inside |= isinstance(q, (ast.FunctionDef, ast.AsyncFunctionDef))
        out += [(n, inside, node.lineno) for n in names if n in known]
    return out


def test_layers_cover_the_package():
    listed = [m for layer in LAYERS for m in layer]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(modules()), "a module is missing from LAYERS (or LAYERS names a gone one)"


def test_imports_go_down_the_layers_without_function_level_imports():
    mods = modules()
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    problems = []
    for name, path in mods.items():
        for target, inside, line in imports(path, set(mods)):
            if target == name or (name == "vaekl.train" and target.startswith("vaekl.train.")) or (
                    name == "vaekl.models" and target.startswith("vaekl.models.")):
                continue
            if inside:
                problems.append(f"{path}:{line}: function-level import of {target}")
            if rank[target] >= rank[name] and target != "vaekl":
                problems.append(f"{path}:{line}: {name} (layer {rank[name]}) imports {target} (layer {rank[target]})")
    assert not problems, "\n".join(problems)


def test_no_module_uses_another_modules_private_names():
    mods = modules()
    short = {m.rsplit(".", 1)[-1] for m in mods}
    aliases = {"config_lib", "metrics_lib", "runs_lib", "vae_lib", "conv_lib", "klib", "progress_lib", "M"}
    pattern = re.compile(r"\b(" + "|".join(sorted(short | aliases)) + r")\.(_[a-z]\w*)")
    found = []
    for root in ("vaekl", "experiments", "launch", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for i, line in enumerate(open(path), 1):
                        found += [f"{path}:{i}: {m.group(0)}" for m in pattern.finditer(line)
                                  if not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)
