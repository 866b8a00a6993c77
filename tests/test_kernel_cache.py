"""Numba's on-disk kernel cache follows every package file a kernel reaches (poisoncert._jit's locators)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import poisoncert
from poisoncert import _jit

PACKAGE = Path(poisoncert.__file__).parent

KERNEL = """
    import numba

    from . import _jit  # noqa: F401
    from ._probe_helper import shifted


    @numba.njit(cache=True)
    def kernel(x):
        return shifted(x)
"""
RUN = """
    from poisoncert._probe import kernel
    print(kernel(1), sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values()),
          type(kernel._cache._impl.locator).__name__)
"""


def _helper(offset: int) -> str:
    return f"""
    import numba

    from . import _jit  # noqa: F401

    OFFSET = {offset}


    @numba.njit
    def shifted(x):
        return x + OFFSET
    """


def _probe_package(tmp_path: Path, cache_dir: Path | None = None):
    """A copy of the package with a cached kernel that calls a helper defined in another of its files (OFFSET 1),
    and a runner of :data:`RUN` (after optional code) in a fresh interpreter that imports that copy."""
    package = tmp_path / "site" / "poisoncert"
    package.mkdir(parents=True)
    for name in ("__init__.py", "_jit.py"):
        shutil.copy(PACKAGE / name, package / name)
    (package / "_probe.py").write_text(textwrap.dedent(KERNEL))
    (package / "_probe_helper.py").write_text(textwrap.dedent(_helper(1)))
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)

    def run(before: str = "") -> list[str]:
        code = textwrap.dedent(before) + textwrap.dedent(RUN)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    return package, run


@pytest.mark.parametrize("where", ["in-tree", "NUMBA_CACHE_DIR"])
def test_a_cached_kernel_is_recompiled_when_only_a_helper_module_changes(tmp_path, where):
    # Numba alone keys the kernel on its own file, so after a change to the helper it would load the old machine code.
    cache_dir = tmp_path / "cache" if where == "NUMBA_CACHE_DIR" else None
    package, run = _probe_package(tmp_path, cache_dir)

    first, second = run(), run()
    assert first[:3] == ["2", "0", "1"]  # compiled, and written to the cache
    assert second[:3] == ["2", "1", "0"]  # loaded from the cache
    cache = cache_dir or package / "__pycache__"
    assert any(cache.rglob("_probe.kernel-*.nbi"))

    (package / "_probe_helper.py").write_text(textwrap.dedent(_helper(5)))
    assert run()[:3] == ["6", "0", "1"]  # the helper's change is seen: compiled again, not loaded stale
    assert run()[:3] == ["6", "1", "0"]
    assert first[3].startswith("PoisoncertClosure")


def test_a_kernel_compiled_after_its_helper_changed_on_disk_is_not_stored_for_later_processes(tmp_path):
    # The helper is imported, then changed on disk (an upgrade during a long session), then the kernel's module is
    # imported: the kernel runs the helper in memory; stored under the new files' stamp, it would be stale for
    # every later process.
    package, run = _probe_package(tmp_path)
    upgrade_meanwhile = f"""
        import pathlib
        import poisoncert._probe_helper
        pathlib.Path({str(package / "_probe_helper.py")!r}).write_text({textwrap.dedent(_helper(5))!r})
    """

    assert run(upgrade_meanwhile)[:3] == ["2", "0", "1"]  # the helper this process imported
    assert run()[:3] == ["6", "0", "1"]  # not loaded from the cache: compiled against the files as they are
    assert run()[:3] == ["6", "1", "0"]


def test_the_closure_digest_follows_every_reachable_file_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(_jit, "_PACKAGE_DIR", str(tmp_path))
    (tmp_path / "a.py").write_text("from .b import f\nimport poisoncert.c\n\n\ndef g():\n    from .d import h\n")
    (tmp_path / "b.py").write_text("from . import e as alias, missing\n")
    (tmp_path / "c.py").write_text("x = 1\n")
    (tmp_path / "d.py").write_text("y = 1\n")
    (tmp_path / "e.py").write_text("z = 1\n")
    before = _jit.source_closure_digest(str(tmp_path / "a.py"))
    (tmp_path / "d.py").write_text("y = 2\n")  # imported only inside a function: no kernel reaches it
    assert _jit.source_closure_digest(str(tmp_path / "a.py")) == before
    for name, text in (("e.py", "z = 2\n"), ("c.py", "x = 2\n"), ("b.py", "from . import e, missing  # edited\n")):
        (tmp_path / name).write_text(text)
        after = _jit.source_closure_digest(str(tmp_path / "a.py"))
        assert after != before, name
        before = after


def _module_level_package_imports(tree: ast.Module) -> tuple[set[str], list[int]]:
    """What a module imports from the package at module level, and the lines of such imports that are indented."""
    names: set[str] = set()
    indented: list[int] = []
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue  # never runs
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("poisoncert")):
            module = node.module.split(".")[-1] if node.module and node.module != "poisoncert" else None
            found = {module} if module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found = {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("poisoncert.")}
        else:
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
            continue
        names |= found
        if found and node.col_offset:
            indented.append(node.lineno)
    return names, indented


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda path: path.name)
def test_the_import_scan_sees_exactly_the_module_level_imports(path):
    text = path.read_text()
    names, indented = _module_level_package_imports(ast.parse(text))
    assert not indented, f"{path.name} imports from the package in an indented block at lines {indented}"
    assert _jit.imported_modules(text) == names


def test_every_cached_kernel_of_the_package_is_stamped_with_its_imports():
    import numba

    import poisoncert.attacks
    import poisoncert.certify
    import poisoncert.joint
    import poisoncert.joint_split
    import poisoncert.neighbours  # noqa: F401

    kernels = [value for name, module in sys.modules.items() if name.startswith("poisoncert.")
               for value in vars(module).values()
               if isinstance(value, numba.core.registry.CPUDispatcher) and value._cache is not None
               and type(value._cache).__name__ == "FunctionCache"]
    assert len(kernels) > 20
    for kernel in kernels:
        assert type(kernel._cache._impl.locator).__name__.startswith("PoisoncertClosure"), kernel
