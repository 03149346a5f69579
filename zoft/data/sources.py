"""Where rows come from: a packaged asset name, a local file, or a hub data set name."""

from __future__ import annotations

from pathlib import Path

from zoft import assets
from zoft.errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in {*_BUILDERS, ".gz", ".bz2"}


def load_source(spec: str, *, split: str = "train", key: str = "data.train"):
    """Load rows as a ``datasets.Dataset``.

    Args:
        spec: asset name, local file path, or hub data set name.
        split: split of a hub data set.
        key: the recipe key this came from (named in errors).

    Raises:
        DataError: missing file, unknown file type, or a data set that cannot be loaded.
    """
    import datasets

    if assets.is_data_asset(spec):
        return assets.load_data_asset(spec)
    path = Path(spec).expanduser()
    if path.exists() or looks_like_path(spec):
        if not path.is_file():
            raise DataError(f"{key}: file {spec} not found")
        builder = _builder_for(path)
        if builder is None:
            raise DataError(
                f"{key}: cannot read {spec}: use a .jsonl, .json, .csv, .parquet or .txt file (optionally .gz/.bz2)"
            )
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for unparsable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{key}: cannot parse {spec} as {builder}: {first}") from None
    try:
        return datasets.load_dataset(spec, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{key}: '{spec}' is not a packaged data set ({', '.join(assets.DATA_ASSETS)}), "
            f"a local file, or a loadable hub data set: {first}"
        ) from None
