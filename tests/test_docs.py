"""The documents a user reads stay manuals, and the paper map points at code that exists.

History belongs in git and CHANGELOG.md, not in the manuals or the code: no tracked text file
narrates which working period did what. The paper map (docs/paper_map.md) names functions and
classes; each must still exist under that name.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path
from types import ModuleType

from admkit.cli import COMMANDS

ROOT = Path(__file__).parents[1]
SOURCE = ROOT / "src" / "admkit"
CHECKED = ("README.md", "CHANGELOG.md", "docs", "benchmarks", "src", "tests")
# Spelled in two pieces so that this file does not hold the word it forbids.
DIARY_WORD = re.compile(r"\b" + "ses" + r"sions?\b", re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    """The text files under CHECKED that git tracks, or every file there outside a clone."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--", *CHECKED],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [ROOT / name for name in listing.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = []
    if not paths:
        for name in CHECKED:
            top = ROOT / name
            paths += [top] if top.is_file() else sorted(top.rglob("*"))
    texts = []
    for path in paths:
        if not path.is_file():
            continue  # deleted in the working tree but still in git's index
        data = path.read_bytes()
        if b"\0" in data:
            continue  # images, npz arrays, compiled files
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(path)
    return texts


def test_the_diary_word_is_recognised():
    assert DIARY_WORD.search("the sixth " + "ses" + "sion's figures")
    assert DIARY_WORD.search("over three " + "Ses" + "sions")
    assert not DIARY_WORD.search("a procession of successes")


def test_no_tracked_text_narrates_development_history():
    files = tracked_text_files()
    assert ROOT / "README.md" in files and len(files) > 20
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if DIARY_WORD.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, (
        "say what and why, not when (history goes to CHANGELOG.md and git):\n" + "\n".join(found)
    )


# ---------------------------------------------------------------------------------------------
# docs/paper_map.md

PAPER_MAP = ROOT / "docs" / "paper_map.md"
NAME_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
CELL_SEPARATOR = re.compile(r"(?<!\\)\|")  # `\|` inside a cell is a literal bar


def _import_prefix(parts: list[str]) -> tuple[ModuleType | None, list[str]]:
    """The longest admkit module named by the start of ``parts``, and the rest of ``parts``."""
    for end in range(len(parts), 0, -1):
        name = "admkit." + ".".join(parts[:end])
        try:
            return importlib.import_module(name), parts[end:]
        except ModuleNotFoundError as error:
            if not name.startswith(error.name or "\0"):
                raise  # a module that exists failed to import: a real error
    return None, parts


def _getattr_path(obj: object, parts: list[str]) -> object:
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _map_cells() -> list[tuple[int, str]]:
    """(line number, admkit column) of every table row of the paper map."""
    cells = []
    for number, line in enumerate(PAPER_MAP.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("|") and not set(line) <= set("|- "):
            cells.append((number, CELL_SEPARATOR.split(line.strip().strip("|"))[-1]))
    return cells


def _check_cell(cell: str) -> tuple[list[str], list[str]]:
    """(names checked, problems) of one cell of the admkit column.

    A dotted name whose first part is a module of admkit (``diffusion.Diffusion.q_sample``)
    resolves from there, and its class or module becomes the context of the names after it in
    the cell; any other name (``q_mean_variance``, ``ModelMeanType.EPSILON``) resolves in that
    class, else in that module. Bare names in parentheses are option, term or head names
    (``num_head_channels``, term ``vb``) and are not looked up. A call's arguments are dropped
    (``nn.ResBlock(up=..., down=...)``); ``*.py`` files must exist under src/admkit, and
    ``admkit COMMAND ...`` must name a command.
    """
    checked, problems = [], []
    context: tuple[object, ModuleType] | None = None
    depth = 0
    for match in re.finditer(r"`([^`]*)`|[()]", cell):
        if match.group(1) is None:
            depth += 1 if match.group(0) == "(" else -1
            continue
        text = match.group(1)
        if text.startswith("admkit "):
            if text.split()[1] not in COMMANDS:
                problems.append(f"`{text}`: no such command")
            continue
        if text.endswith(".py"):
            if not (SOURCE / text).is_file():
                problems.append(f"`{text}`: no such file under src/admkit")
            continue
        name = text.split("(")[0]
        if not NAME_PATH.fullmatch(name) or (depth > 0 and "." not in name):
            continue
        checked.append(name)
        module, rest = _import_prefix(name.split("."))
        if module is not None:
            try:
                owner = _getattr_path(module, rest[:-1])
                _getattr_path(owner, rest[-1:])
            except AttributeError as error:
                problems.append(f"`{name}`: {error}")
                continue
            context = (owner, module)
            continue
        if context is None:
            problems.append(f"`{name}`: not a module of admkit, and no dotted name before it")
            continue
        for base in context:
            try:
                _getattr_path(base, name.split("."))
                break
            except AttributeError:
                pass
        else:
            bases = dict.fromkeys(getattr(base, "__name__", str(base)) for base in context)
            where = " or ".join(bases)
            problems.append(f"`{name}`: not found in {where}")
    return checked, problems


def test_paper_map_names_exist():
    checked, problems = [], []
    for number, cell in _map_cells():
        names, found = _check_cell(cell)
        checked += names
        problems += [f"docs/paper_map.md:{number}: {problem}" for problem in found]
    assert not problems, "\n".join(problems)
    assert len(checked) >= 50  # the map has not been emptied or its tables broken


def test_paper_map_check_can_fail():
    _, problems = _check_cell(
        "`diffusion.Diffusion.q_sample`, `no_such_method`; `samplers.no_such_sampler`; "
        "`unknown_name`"
    )
    assert len(problems) == 3 and "no_such_method" in problems[0]
    assert "no_such_sampler" in problems[1] and "unknown_name" in problems[2]
    _, problems = _check_cell("`unknown_name` (`option_name`), `cli/no_such.py`")
    assert len(problems) == 2
