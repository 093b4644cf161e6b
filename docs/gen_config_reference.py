"""The job file's reference table, generated from the pydantic models (shardtune.cluster.config's
JobConfig and the worker sections it composes), so the docs list every field with its type,
default and description and cannot drift from the code.

An MkDocs hook (mkdocs.yml `hooks:`): a page's `<!-- job-file-reference -->` line becomes the
table. `python docs/gen_config_reference.py` prints it. tests/unit/test_docs.py checks that
every field of the tree is in it, with a description.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- job-file-reference -->"


def _section(annotation: object) -> type[BaseModel] | None:
    """The section model a field holds (also through `Section | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            return _section(models[0])
    return None


def type_name(annotation: object) -> str:
    """A field's type as a reader of YAML sees it: `int`, `ner` or `classify`, list of str."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if annotation is float:
        return "number"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return ""
    value = field.default
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def rows(
    model: type[BaseModel] | None = None, prefix: str = ""
) -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field, sections depth first. A
    section appears as a row of its own only where it has a description (an optional section
    such as `tracking.mlflow`, or one that says what it is for)."""
    if model is None:
        from shardtune.cluster.config import JobConfig

        model = JobConfig
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        if section is not None:
            if field.description:
                optional = "unset" if default_text(field) == "unset" else ""
                yield key, "section", optional, field.description
            yield from rows(section, f"{key}.")
        else:
            yield key, type_name(field.annotation), default_text(field), field.description or ""


def reference_table() -> str:
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in rows():
        lines.append(f"| `{key}` | {cell(kind)} | {cell(default)} | {cell(description)} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """MkDocs hook: put the generated table where a page asks for it."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference_table())
    return markdown


if __name__ == "__main__":
    print(reference_table())
