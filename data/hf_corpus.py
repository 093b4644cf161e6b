"""Hugging Face `datasets` as corpus input: `save_to_disk` directories (a Dataset, or a DatasetDict
whose splits become train/dev/test) and Parquet / JSON Lines / CSV files read by `datasets`,
yielded row by row as plain values with `ClassLabel` ids turned into their names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from shardtune.data import storage

# Formats read through `datasets`. Parquet and save_to_disk directories are recognised by
# themselves; JSON Lines and CSV need fmt="hf-json" / "hf-csv", because by default their own
# line readers in corpus.py take them (those report FILE:LINE, which `datasets` cannot).
KINDS = ("parquet", "hf-disk", "hf-json", "hf-csv")
EXTENSIONS = {".parquet": "parquet"}
_BUILDERS = {"parquet": "parquet", "hf-json": "json", "hf-csv": "csv"}
# `save_to_disk` writes dataset_dict.json for a DatasetDict, dataset_info.json + state.json
# for a Dataset (datasets.config.DATASETDICT_JSON_FILENAME etc.).
_DICT_MARKER = "dataset_dict.json"
_DATASET_MARKERS = ("dataset_info.json", "state.json")
# A DatasetDict's split names -> shardtune's (what training's data.train/eval/test expect).
SPLIT_NAMES = {"train": "train", "validation": "dev", "valid": "dev", "dev": "dev", "test": "test"}
_BATCH = 1000  # rows per Arrow -> Python conversion; row by row was ~20x slower (50k rows)


def saved_kind(uri: str, options: storage.StorageOptions | None = None) -> str | None:
    """'dataset_dict' or 'dataset' for a `save_to_disk` directory, else None."""
    names = set(storage.list_names(uri, options))
    if _DICT_MARKER in names:
        return "dataset_dict"
    if all(marker in names for marker in _DATASET_MARKERS):
        return "dataset"
    return None


def dataset_dict_splits(uri: str, options: storage.StorageOptions | None = None) -> dict[str, str]:
    """{shardtune split: the DatasetDict's split} of a `save_to_disk` DatasetDict directory.

    ValueError for a split name with no shardtune meaning (e.g. "unsupervised") or two splits
    that mean the same (validation and dev), naming them: dropping one silently would lose data.
    """
    import json

    text = storage.read_text(storage.join(uri, _DICT_MARKER), options)
    theirs = json.loads(text)["splits"]
    unknown = [s for s in theirs if s not in SPLIT_NAMES]
    if unknown:
        raise ValueError(
            f"{uri}: DatasetDict split{'s' if len(unknown) > 1 else ''} {unknown} "
            f"{'have' if len(unknown) > 1 else 'has'} no shardtune meaning; known: "
            f"{sorted(SPLIT_NAMES)} (train; validation/valid/dev -> dev; test)"
        )
    ours: dict[str, str] = {}
    for split in theirs:
        name = SPLIT_NAMES[split]
        if name in ours:
            raise ValueError(
                f"{uri}: DatasetDict splits {ours[name]!r} and {split!r} both map to {name!r}"
            )
        ours[name] = split
    return dict(sorted(ours.items(), key=lambda item: ("train", "dev", "test").index(item[0])))


def iter_records(
    uri: str,
    kind: str,
    columns: Sequence[str],
    options: storage.StorageOptions | None,
    problems: list[str],
    split: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("URI:row N", {column: value}) for every row of one input, in order.

    N counts from 0, so row N is `dataset[N]` (or `DataFrame.iloc[N]`). Values are Python
    objects with ClassLabel ids as their names; ids outside the names stay ints and -1 (the
    datasets convention for "no label") becomes None, for the caller's validation to report.
    Problems with the input as a whole (unreadable, a missing column) go to `problems`.
    """
    where = f"{uri}[{split}]" if split is not None else uri
    try:
        dataset = _open(uri, kind, options, split)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        problems.append(f"{where}: {_reason(exc)}")
        return
    decoders: dict[str, Any] | None = None
    row = 0
    try:
        for batch in dataset.iter(batch_size=_BATCH):
            if decoders is None:
                missing = [c for c in columns if c not in batch]
                if missing:
                    problems.append(
                        f"{where}: no column{'s' if len(missing) > 1 else ''} {missing} "
                        f"(columns: {sorted(batch)})"
                    )
                    return
                decoders = {c: _decoder(dataset.features, c) for c in columns}
            values = [[decoders[c](v) for v in batch[c]] for c in columns]
            for record in zip(*values, strict=True):
                yield f"{where}:row {row}", dict(zip(columns, record, strict=True))
                row += 1
    except (ValueError, OSError) as exc:  # e.g. a malformed JSON line or a truncated file
        problems.append(f"{where}: unreadable after row {row - 1}: {_reason(exc)}")


def _open(uri: str, kind: str, options: storage.StorageOptions | None, split: str | None) -> Any:
    import datasets

    storage_options = (options or storage.StorageOptions()).fsspec_kwargs(
        storage.split_protocol(uri)[0]
    )
    if kind == "hf-disk":
        saved = saved_kind(uri, options)
        if saved is None:
            raise ValueError(
                "not a `save_to_disk` directory (no dataset_dict.json, or dataset_info.json "
                "and state.json)"
            )
        loaded = datasets.load_from_disk(uri, storage_options=storage_options)
        if saved == "dataset":
            if split is not None:
                raise ValueError(f"a Dataset has no split {split!r} (it is not a DatasetDict)")
            return loaded
        if split is None:
            raise ValueError(
                f"a DatasetDict with splits {list(loaded)}: prepare it as the only input (its "
                "splits become train/dev/test) or read one split"
            )
        return loaded[split]
    if split is not None:
        raise ValueError(f"a {kind} file has no splits (asked for {split!r})")
    if not storage.exists(uri, options):
        raise FileNotFoundError("file not found")
    # streaming: rows come straight from the file, with no Arrow copy in the datasets cache.
    return datasets.load_dataset(
        _BUILDERS[kind],
        data_files=[uri],
        split="train",
        streaming=True,
        storage_options=storage_options,
    )


def _decoder(features: Any, column: str):
    """Value converter for one column: ClassLabel (or a list of them) ids -> names."""
    feature = None if features is None else features.get(column)
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList
    names = getattr(feature, "names", None)
    if names is not None:
        return lambda value: _name(names, value)
    inner_names = getattr(inner, "names", None)
    if inner_names is not None:
        return lambda value: value if value is None else [_name(inner_names, v) for v in value]
    return lambda value: value


def _name(names: list[str], value: Any) -> Any:
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return None if value == -1 else value


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
