"""No import cycles anywhere in ldm, its command line and its kernels, imports inside functions included (grimp,
the graph behind import-linter, reads every import statement). The direction between packages is
pyproject.toml's import contract, which `make test` checks with `lint-imports`."""

import grimp


def test_no_module_imports_one_that_imports_it_back():
    graph = grimp.build_graph("ldm", "ldm_cli", "ldm_kernels")
    assert len(graph.modules) > 50
    cycles = [(importer, imported) for importer in sorted(graph.modules)
              for imported in sorted(graph.find_modules_directly_imported_by(importer))
              if graph.chain_exists(importer=imported, imported=importer)]
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_a_cycle_when_there_is_one(tmp_path, monkeypatch):
    (tmp_path / "cyclic").mkdir()
    (tmp_path / "cyclic" / "__init__.py").write_text("")
    (tmp_path / "cyclic" / "a.py").write_text("def f():\n    from cyclic import b\n")  # lazily, as a hidden cycle
    (tmp_path / "cyclic" / "b.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic", cache_dir=None)
    assert graph.chain_exists(importer="cyclic.a", imported="cyclic.b")
    assert graph.chain_exists(importer="cyclic.b", imported="cyclic.a")
