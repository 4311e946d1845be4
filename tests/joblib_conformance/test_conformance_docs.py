"""docs/conformance.md lists every joblib test deselected as not applicable, with its reason."""

from __future__ import annotations

from pathlib import Path

from azurebatch_conformance import NOT_APPLICABLE

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def _rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`test_"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_every_not_applicable_test_is_documented_with_its_reason():
    rows = _rows()
    assert set(rows) == set(NOT_APPLICABLE)
    for name, reason in NOT_APPLICABLE.items():
        assert rows[name] == reason.replace("|", "\\|"), name
