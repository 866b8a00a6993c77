"""The examples in the docstrings run and print what they say (they document exact values)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import poisoncert

MODULES = sorted(name for _, name, _ in pkgutil.iter_modules(poisoncert.__path__, "poisoncert."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # an optional extra (e.g. dask) is not installed
        pytest.skip(f"{name}: {error}")
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                  verbose=False)
    assert failures == 0, f"{failures} docstring example(s) of {name} failed"


def test_the_package_has_docstring_examples():
    finder = doctest.DocTestFinder()
    examples = 0
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        examples += sum(len(test.examples) for test in finder.find(module))
    assert examples >= 10
