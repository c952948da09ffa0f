"""The tgext.evolve under test is this repository's, not the broken 0.0.5 release from PyPI.

0.0.5 installs ``tgext/evolve`` with a namespace ``.pth`` and does not run on TurboGears 2.5 /
SQLAlchemy 2: if it shadowed the checkout, every other test would exercise the wrong code.
"""
import importlib.metadata
import pathlib
import tomllib

import tgext.evolve

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_imported_package_is_this_repository():
    package_dir = REPO_ROOT / 'tgext' / 'evolve'
    assert pathlib.Path(tgext.evolve.__file__).resolve() == package_dir / '__init__.py'
    # One directory only: no 0.0.5 modules (sqla_evolver, ming_evolver) merged in beside it.
    assert [pathlib.Path(p).resolve() for p in tgext.evolve.__path__] == [package_dir]


def test_installed_distribution_is_this_version():
    declared = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']['version']
    assert tgext.evolve.__version__ == declared
    assert importlib.metadata.version('tgext.evolve') == tgext.evolve.__version__
