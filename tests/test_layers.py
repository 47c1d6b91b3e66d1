"""The layers stay layers: the import-linter contracts in pyproject.toml (lower layers never import higher ones, no
step imports another step) hold for every import statement, function-local ones included."""

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, f"an import breaks the layers (pyproject.toml [tool.importlinter]):\n{capsys.readouterr().out}"
