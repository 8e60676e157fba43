"""Write kvpack's calibration text: `src/kvpack/data/calibration.txt`.

The text that `kvpack calibrate` and `scripts/fit_codebooks.py` measure on, chosen to be unlike the evaluation
text (WikiText-2, encyclopedia articles): the Python Language Reference as Python ships it in
`pydoc_data.topics` (technical prose, grammar and code), under the PSF License (see `data/README.md`).

The topics are taken in sorted order and cut at whole topics once `--chars` is reached, so the output depends
only on the Python version's documentation (3.11.7 for the committed file; its SHA-256 is in `data/README.md`).

    python scripts/make_calibration_text.py
"""

from __future__ import annotations

import argparse
import hashlib
import pydoc_data.topics
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "kvpack" / "data" / "calibration.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=100_000, help="stop after the topic that reaches this length")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    parts: list[str] = []
    total = 0
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name].strip() + "\n\n"
        parts.append(text)
        total += len(text)
        if total >= args.chars:
            break
    data = "".join(parts).encode("utf-8")
    args.out.write_bytes(data)
    print(
        f"wrote {args.out} ({len(data):,} bytes, {len(parts)} topics, Python {sys.version.split()[0]}, "
        f"sha256 {hashlib.sha256(data).hexdigest()})"
    )


if __name__ == "__main__":
    main()
