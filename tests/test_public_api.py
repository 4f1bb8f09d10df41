"""The public API (`from ldm import …`): every name resolves to the object its package defines, `import ldm`
imports no torch, and an unknown name is an AttributeError."""

import importlib
import subprocess
import sys

import pytest

import ldm


def test_import_ldm_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, ldm; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("name", ldm.__all__)
def test_each_public_name_is_its_packages_object(name):
    module = importlib.import_module(ldm._PUBLIC[name])
    assert getattr(ldm, name) is getattr(module, name)
    assert name in dir(ldm)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Pipeline'"):
        ldm.Pipeline  # noqa: B018
