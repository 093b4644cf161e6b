"""The docs stay true: the README keeps its shape, the job-file reference (generated from the
pydantic models by docs/gen_config_reference.py) lists every field with a description, and every
benchmark publishes a table that the docs include. `make docs-build` builds the site with
--strict (links, anchors, included files)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from shardtune.cluster.config import JobConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# benches that publish their table to docs/bench/ (scale_sim is on its way there)
NOT_PUBLISHING = {"results", "scale_sim"}


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", DOCS / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the guide is docs/"
    first_block = text.split("```", 2)[1].splitlines()
    assert first_block[0] == "bash"
    commands = [line.split("#")[0].strip() for line in first_block[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def _schema_keys(schema: dict, node: dict, prefix: str = "") -> dict[str, str]:
    """Every leaf field of the JSON schema as dotted key -> description (independent of the
    generator, which walks the models)."""

    def resolve(prop: dict) -> dict | None:
        for option in [prop, *prop.get("anyOf", [])]:
            if "$ref" in option:
                return schema["$defs"][option["$ref"].rsplit("/", 1)[1]]
        return None

    keys = {}
    for name, prop in node["properties"].items():
        section = resolve(prop)
        if section is not None and "properties" in section:
            keys.update(_schema_keys(schema, section, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = prop.get("description", "")
    return keys


def test_job_file_reference_lists_every_field_with_its_description():
    schema = JobConfig.model_json_schema()
    fields = _schema_keys(schema, schema)
    recent = {"train.checkpoint_every", "train.checkpoint_upload", "train.ledger"}
    assert recent | {"cluster.resize_check_s", "tracking.wandb.mode"} <= set(fields)
    undocumented = sorted(k for k, d in fields.items() if not d.strip())
    assert not undocumented, f"fields without a description: {undocumented}"
    table = _generator().reference_table()
    listed = set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE))
    assert set(fields) <= listed, sorted(set(fields) - listed)


def test_job_file_page_asks_for_the_generated_table():
    assert _generator().MARKER in (DOCS / "job-file.md").read_text(encoding="utf-8")


def test_every_bench_publishes_a_table_the_docs_include():
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    included = set(re.findall(r'^--8<-- "bench/([\w-]+)\.md"$', pages, flags=re.MULTILINE))
    tables = {p.stem for p in (DOCS / "bench").glob("*.md")}
    assert tables <= included, f"docs/bench tables no page includes: {sorted(tables - included)}"
    assert included <= tables, f"pages include missing tables: {sorted(included - tables)}"
    for bench in sorted((ROOT / "bench").glob("*.py")):
        if bench.stem in NOT_PUBLISHING:
            continue
        source = bench.read_text(encoding="utf-8")
        called = re.search(rf"publish\(\s*[\"']{bench.stem}[\"']", source)
        assert called, f"{bench.name} does not publish its table"
        assert bench.stem in tables, f"docs/bench/{bench.stem}.md is missing"
