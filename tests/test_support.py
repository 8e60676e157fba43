"""`kvpack.support`: the README's support matrix is the rendered data, and the data is coherent.

The architecture tests are generated from the same data (`tests/test_architectures.py` runs exactly the cells marked
tested), so a cell cannot be marked tested without a test running it.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvpack.support import ARCHITECTURES, BACKENDS, DEVICES, DTYPES, REFUSED, cells, markdown_table, status

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_support_matrix_is_the_rendered_data() -> None:
    match = re.search(r"<!-- support-matrix:start -->\n(.*?)<!-- support-matrix:end -->", README.read_text(), re.S)
    assert match is not None, "README.md lost its support-matrix markers"
    assert match.group(1) == markdown_table(), (
        "README.md's support matrix is stale: paste kvpack.support.markdown_table()"
    )


def test_every_cell_has_one_status_and_a_row_in_the_table() -> None:
    everything = cells()
    assert len(everything) == (len(ARCHITECTURES) + len(REFUSED)) * len(DTYPES) * len(DEVICES) * len(BACKENDS)
    by_status = {state: cells(state) for state in ("tested", "untested", "refused")}
    assert sum(len(v) for v in by_status.values()) == len(everything)
    table = markdown_table()
    for arch in ARCHITECTURES:
        for dtype in DTYPES:
            row = next(line for line in table.splitlines() if line.startswith(f"| {arch.label} | {dtype} |"))
            marks = row.strip("|").split("|")[2:]
            assert len(marks) == len(DEVICES) * len(BACKENDS)
    assert all(status(arch, "float32", "cpu", "dense") == "refused" for arch in REFUSED)
    assert all(arch.refused for arch in REFUSED) and not any(arch.refused for arch in ARCHITECTURES)
    # No GPU in CI: nothing on CUDA may claim to be tested.
    assert all(device == "cpu" for _, _, device, _ in by_status["tested"])
