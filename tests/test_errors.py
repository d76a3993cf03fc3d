"""The exception hierarchy (``tikmix_loader.errors``): every class is exported where callers catch errors and
is also the builtin they would catch without it."""

import inspect

import pytest

import tikmix_loader
import tikmix_loader.errors as errors

ERRORS = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.TikmixError) and cls.__module__ == errors.__name__
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_is_exported_by_the_package_and_is_a_builtin_error(error):
    assert error.__name__ in tikmix_loader.__all__ and getattr(tikmix_loader, error.__name__) is error
    assert error is errors.TikmixError or issubclass(error, (ValueError, RuntimeError, ImportError))
