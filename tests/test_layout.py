"""The import graph points one way (STYLE.md): math never imports networks, and so on."""

import ast
from pathlib import Path

import admkit

PACKAGE = Path(admkit.__file__).parent

# module (dotted, relative to admkit) -> admkit modules it must never import
FORBIDDEN = {
    "nn": {"unet", "diffusion", "samplers", "guidance", "train", "cli", "compat"},
    "unet": {"diffusion", "samplers", "guidance", "train", "cli", "compat", "metrics"},
    "diffusion": {"unet", "nn", "train", "cli", "compat", "metrics"},
    "losses": {"unet", "nn", "train", "cli", "compat", "metrics"},
    "timestep_sampling": {"unet", "nn", "train", "cli", "compat", "metrics"},
    "samplers": {"unet", "nn", "train", "cli", "compat", "metrics"},
    "step_selection": {"unet", "nn", "samplers", "guidance", "train", "cli", "compat", "metrics"},
    "guidance": {"unet", "nn", "train", "cli", "compat", "metrics"},
    "train": {"unet", "nn", "diffusion", "cli", "compat", "samplers"},
    "metrics": {"unet", "nn", "diffusion", "samplers", "guidance", "train", "cli", "compat"},
    "data": {"unet", "nn", "diffusion", "samplers", "guidance", "train", "cli", "compat"},
    "checkpoint": {"cli", "compat", "train"},
    "distributed": {"train", "cli", "compat", "unet", "nn", "diffusion"},
    "runlog": {"train", "cli", "compat", "unet", "nn", "diffusion"},
    "judge": {"unet", "nn", "diffusion", "samplers", "guidance", "train", "cli", "compat"},
    "generate": {"unet", "nn", "train", "cli", "compat"},
    "compilation": {"unet", "nn", "diffusion", "samplers", "train", "generate", "cli", "compat"},
    "gradients": {"unet", "nn", "diffusion", "samplers", "train", "cli", "compat"},
    "noise": {"unet", "nn", "diffusion", "samplers", "guidance", "train", "cli", "compat"},
    "phema": {"unet", "nn", "diffusion", "samplers", "train", "checkpoint", "cli", "compat"},
    "quality": {"unet", "nn", "diffusion", "samplers", "train", "cli", "compat"},
    "monitor": {"unet", "nn", "train", "cli", "compat"},
    "sweep": {"unet", "nn", "diffusion", "samplers", "generate", "train", "cli", "compat"},
}


def _admkit_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "admkit" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_point_one_way():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        top = rel.parts[0]
        banned = FORBIDDEN.get(top, set())
        bad = _admkit_imports(path) & banned
        if bad:
            problems.append(f"{rel}: imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_layout_test_sees_modules():
    # The check above is only meaningful if it finds the package's files.
    assert any(PACKAGE.rglob("*.py"))
