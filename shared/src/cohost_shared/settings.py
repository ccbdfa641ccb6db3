"""Settings errors named as the environment variables a person has to fix.

Every process reads one pydantic-settings model with its own prefix; when the
environment is wrong, it stops at start with one line per variable, not a traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


def env_errors(exc: ValidationError, prefix: str) -> list[str]:
    """`  PREFIX_FIELD: what is wrong`, one line per error. A field read under an alias of
    its own (COHOST_LOCK_DIR) is named as that alias; a check across fields by its message."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = "_".join(str(part) for part in err["loc"])
        if not loc:
            lines.append(f"  {err['msg']}")
            continue
        name = loc if loc.isupper() else (prefix + loc).upper()
        lines.append(f"  {name}: {err['msg']}")
    return lines
