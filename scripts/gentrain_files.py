"""Where the files of a gentrain run are, for the PyTorch scripts (no PyTorch needed here).

A checkpoint is named by a run directory (whose `latest` file names its newest checkpoint), by a
`ckpt-*` directory, or by its `model.safetensors` file directly (docs/checkpoints.md).
"""

from __future__ import annotations

from pathlib import Path


def resolve_checkpoint(path: Path) -> Path:
    """The `model.safetensors` file that `path` names. Raises ValueError with a one-line message
    when it names none (each script reports that in its own way)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        p = path / name / "model.safetensors"
        if not p.is_file():
            raise ValueError(f"{path}/latest names {name!r} but {p} does not exist")
        return p
    raise ValueError(f"{path}: neither a run directory (with `latest`), a ckpt-* directory nor a "
                     "model.safetensors file")
