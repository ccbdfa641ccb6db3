"""Print, as JSON, the requirements of an installed distribution whose markers hold here,
extras left out: `python requirements.py DIST`. Runs in the engine venv, where
`packaging` (what pip itself uses for this) is installed."""

from __future__ import annotations

import json
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement


def main(dist: str) -> None:
    out = []
    for text in requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append({"name": req.name, "requirement": str(req).split(";")[0].strip()})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
