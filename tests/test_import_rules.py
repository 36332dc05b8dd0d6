"""The layering of the package: pure math at the bottom, the diffusers glue and the tasks above, the CLI on top.

Checked on the source (every import statement, at any depth), so a lazy import inside a function counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "analytic_schedulers"
#: Pure functions of schedules and tensors: they never see a model, a config, a file or the command line.
MATH_MODULES = {"schedule", "reverse_step", "trajectory", "gaussian_math"}
#: What the math may import besides each other: the standard library, numpy, torch, and diffusers' own schedule math.
MATH_MAY_IMPORT = {"__future__", "math", "typing", "dataclasses", "numpy", "torch",
                   "diffusers.schedulers.scheduling_ddpm"}


def imports_of(path: Path):
    """`(module, level)` of every import in a file: `level` > 0 for relative imports (`from .x import y`)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module is None:  # `from . import x`
                yield from ((alias.name, node.level) for alias in node.names)
            else:
                yield node.module, node.level


def package_module(name: str, level: int, path: Path):
    """The package-relative dotted name an import refers to, or None for third-party imports."""
    if level == 0:
        return name[len("analytic_schedulers."):] if name.startswith("analytic_schedulers.") else (
            "" if name == "analytic_schedulers" else None)
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(parts + [name])


@pytest.mark.parametrize("module", sorted(MATH_MODULES))
def test_math_modules_import_only_math(module):
    path = PACKAGE / f"{module}.py"
    for name, level in imports_of(path):
        inside = package_module(name, level, path)
        if inside is not None:
            assert inside in MATH_MODULES, f"{module}.py imports analytic_schedulers.{inside}, which is not math"
        else:
            assert any(name == allowed or name.startswith(allowed + ".") for allowed in MATH_MAY_IMPORT), (
                f"{module}.py imports {name}")


def test_nothing_outside_the_cli_imports_the_cli():
    """(`python -m analytic_schedulers`, the entry point in `__main__.py`, runs the CLI and is the one exception.)"""
    files = [p for p in PACKAGE.rglob("*.py")
             if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]
    files += list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "examples").glob("*.py"))
    offenders = []
    for path in files:
        for name, level in imports_of(path):
            inside = package_module(name, level, path) if path.is_relative_to(PACKAGE) else (
                package_module(name, 0, path))
            if inside is not None and (inside == "cli" or inside.startswith("cli.")):
                offenders.append(f"{path.relative_to(ROOT)} imports analytic_schedulers.{inside}")
    assert not offenders


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """A test that the rule can fail: a function-level relative import of the CLI is found."""
    fake = PACKAGE / "gamma.py"
    source = "def f():\n    from .cli import main\n    from . import cli\n"
    found = [package_module(n, level, fake) for n, level in imports_of(_write(tmp_path, source))]
    assert found == ["cli", "cli"]


def _write(tmp_path, source):
    path = tmp_path / "module.py"
    path.write_text(source)
    return path
