"""Editing saved stages by hand, as a damaged file or an attacker would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def edit_metadata(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Rewrite the Spark ML metadata of the stage saved at ``path`` with ``edit`` applied.

    Hadoop's local filesystem checks each file against its ``.crc`` sibling; a hand-edited file
    comes without one, so it is removed."""
    (part,) = (path / "metadata").glob("part-*")
    metadata = json.loads(part.read_text())
    edit(metadata)
    part.write_text(json.dumps(metadata) + "\n")
    (part.parent / f".{part.name}.crc").unlink(missing_ok=True)
