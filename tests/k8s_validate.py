#!/usr/bin/env python3
"""Strict offline check of Kubernetes manifests: what `kubectl apply --validate=strict` rejects.

Custom resources (RayCluster, RayJob, RayService) are checked against the openAPIV3Schema of the
vendored KubeRay CRDs in `k8s/crds/`; core kinds (ConfigMap, Secret, ServiceAccount, ...) against
kubernetes-validate's bundled "-strict" schemas; the Prometheus Operator's PodMonitor against a
structural schema of the fields this project uses (STRUCTURAL_SCHEMAS). Unknown fields are
errors everywhere. Nothing needs a cluster or the network.

    python -m tests.k8s_validate k8s/*.yaml      # exit 0 valid, 1 problems, 2 unreadable input

Adapted, much reduced, from the project's shared checker (shared/kuberay/validate.py).
It cannot see what only a live operator checks: typos inside `rayStartParams` or inside
`runtimeEnvYAML` strings, replica bounds, references to missing ConfigMaps or Secrets.
"""

from __future__ import annotations

import base64
import binascii
import copy
import difflib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"
# The operator's own limits (KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go).
RAY_NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Problem:
    where: str  # "file:line Kind/name"
    path: str  # dotted field path inside the document, "" for the document itself
    message: str

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.path}: {self.message}"
            if self.path
            else f"{self.where}: {self.message}"
        )


# ----------------------------------------------------------------------------------------- YAML
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _K8sLoader(_Loader):
    """Keeps timestamps as strings (as sigs.k8s.io/yaml does) and records duplicate keys,
    which the apiserver's strict decoding rejects."""

    duplicates: list[tuple[Any, int]]

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                self.duplicates.append((key, key_node.start_mark.line + 1))
            seen.add(key)
        return super().construct_mapping(node, deep)


_K8sLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in _Loader.yaml_implicit_resolvers.items()
}


def load_documents(text: str) -> Iterator[tuple[int, Any, list[tuple[Any, int]]]]:
    """(first line, document, duplicate keys) for each non-empty document of a YAML stream."""
    loader = _K8sLoader(text)
    try:
        while loader.check_node():
            loader.duplicates = []
            node = loader.get_node()
            doc = loader.construct_document(node)
            if doc is not None:
                yield node.start_mark.line + 1, doc, list(loader.duplicates)
    finally:
        loader.dispose()


# ---------------------------------------------------------------- OpenAPI v3 -> JSON Schema
def to_json_schema(node: dict) -> dict:
    """One CRD structural-schema node as JSON Schema (draft 4), closed the way strict mode is."""
    out: dict[str, Any] = {}
    for key, val in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in val.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(val, dict):
            out[key] = to_json_schema(val)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in val]
        else:
            out[key] = val
    if node.get("x-kubernetes-int-or-string"):
        # The CRD's anyOf [integer, string] as one type; `pattern` then applies to strings only.
        out["type"] = ["integer", "string"]
        out.pop("anyOf", None)
    if node.get("nullable") and "type" in out:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
    if node.get("x-kubernetes-embedded-resource"):
        # An embedded object carries its own apiVersion/kind/metadata even where the schema
        # does not list them; the apiserver requires apiVersion and kind.
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # strict: the apiserver would prune, kubectl rejects
    return out


def drop_nulls(data: Any, node: dict) -> None:
    """The apiserver drops `null` values of non-nullable fields before validating; so do we."""
    if isinstance(data, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for key in list(data):
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                continue
            if data[key] is None and not sub.get("nullable"):
                del data[key]
            else:
                drop_nulls(data[key], sub)
    elif isinstance(data, list) and isinstance(node.get("items"), dict):
        for item in data:
            drop_nulls(item, node["items"])


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: no duplicate items (set) or duplicate keys (map)."""
    if not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys") or []
    defaults = {
        k: v.get("default") for k, v in (schema.get("items") or {}).get("properties", {}).items()
    }
    seen: dict[str, int] = {}
    for i, item in enumerate(instance):
        if list_type == "set":
            ident = json.dumps(item, sort_keys=True)
        elif list_type == "map" and isinstance(item, dict) and keys:
            ident = json.dumps({k: item.get(k, defaults.get(k)) for k in keys}, sort_keys=True)
        else:
            continue
        if ident in seen:
            yield jsonschema.ValidationError(
                f"items {seen[ident]} and {i} are duplicates ({list_type} keyed by {ident})"
            )
        seen.setdefault(ident, i)


_CEL_TOKEN = re.compile(
    r"\s*(?:has\(self\.(?P<has>\w+)\)|self\.(?P<field>\w+)|(?P<self>self)\b|(?P<str>'[^'\\]*')"
    r"|(?P<op>&&|\|\||==|!=|!|\bin\b|[()\[\],]))"
)
_CEL_OPS = {"&&": " and ", "||": " or ", "!": " not ", "in": " in "}


@cache
def cel_to_python(rule: str) -> str | None:
    """The small CEL subset KubeRay's rules use (has(), &&, ||, !, ==, in [...]) as a Python
    expression over `self`; None for anything else, and for transition rules (oldSelf)."""
    out, pos = [], 0
    while pos < len(rule.rstrip()):
        m = _CEL_TOKEN.match(rule, pos)
        if not m:
            return None
        if m["has"]:
            out.append(f"({m['has']!r} in self)")
        elif m["field"]:
            out.append(f"self.get({m['field']!r})")
        elif m["self"]:
            out.append("self")
        elif m["str"]:
            out.append(m["str"])
        else:
            out.append(_CEL_OPS.get(m["op"], m["op"]))
        pos = m.end()
    return "".join(out)


def _cel_rules(validator, rules, instance, schema):
    for rule in rules:
        expr = cel_to_python(rule.get("rule", ""))
        if expr is None or not isinstance(instance, dict | str | int):
            continue  # not evaluated: outside the subset, or a rule that only applies to updates
        if "has(" in rule["rule"] and not isinstance(instance, dict):
            continue
        try:  # the expression is vendored CRD text, reduced to whitelisted tokens
            ok = eval(expr, {"__builtins__": {}}, {"self": instance})
        except (TypeError, AttributeError):
            continue
        if not ok:
            yield jsonschema.ValidationError(rule.get("message") or f"failed rule: {rule['rule']}")


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


# ------------------------------------------------------------------------------- schema stores
@cache
def crd_versions(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> the CRD's version entry, for every CRD file in `crd_dir`."""
    versions = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_Loader):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                for ver in spec["versions"]:
                    versions[(spec["group"], ver["name"], spec["names"]["kind"])] = ver
    return versions


@cache
def crd_validator(key: tuple[str, str, str], crd_dir: Path = CRD_DIR) -> tuple[dict, Any]:
    raw = crd_versions(crd_dir)[key]["schema"]["openAPIV3Schema"]
    schema = to_json_schema(raw)
    props = schema.setdefault("properties", {})  # the root is implicitly an embedded resource
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props["metadata"] = {"type": "object"}  # ObjectMeta: checked on its own
    return raw, _CRDValidator(schema, format_checker=_FORMATS)


@cache
def _core_schemas() -> tuple[Any, Registry, dict]:
    import kubernetes_validate.utils as kv

    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    root = root / f"v{kv.latest_version()}-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())
    return root, Resource.from_contents(defs) @ Registry(), defs


@cache
def core_validator(api_version: str, kind: str) -> Any | None:
    """kubernetes-validate's strict schema for a built-in kind, or None if it has none."""
    root, registry, _ = _core_schemas()
    # kubernetes-validate's file naming: rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    file = root / f"{kind.lower()}-{group_version}.json"
    if not file.is_file():
        return None
    schema = json.loads(file.read_text())
    return jsonschema.Draft202012Validator(
        schema, registry=Resource.from_contents(schema) @ registry
    )


@cache
def object_meta_validator() -> Any:
    _, registry, defs = _core_schemas()
    ref = {
        "$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "$defs": defs["$defs"],
    }
    return jsonschema.Draft202012Validator(ref, registry=registry)


# ------------------------------------------------------------------------------------ checking
def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _schema_problems(
    errors: Iterator[jsonschema.ValidationError], prefix: str = ""
) -> list[tuple[str, str]]:
    """(path, message) per error; an unknown field is reported at its own path."""
    found = []
    for err in errors:
        base = _path([*([prefix] if prefix else []), *err.absolute_path])
        if err.validator == "additionalProperties" and err.validator_value is False:
            known = list(err.schema.get("properties", {}))
            for key in (k for k in err.instance if k not in known):
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                found.append((_path([base, key]) if base else str(key), "unknown field" + hint))
            continue
        msg = err.message if len(err.message) < 300 else err.message[:300] + "..."
        if err.context:  # anyOf/oneOf: name the branch that came closest
            best = jsonschema.exceptions.best_match(err.context)
            msg += f" [{_path(best.absolute_path) or 'value'}: {best.message}]"
        if (
            err.validator == "type"
            and isinstance(err.instance, float)
            and "integer" in err.validator_value
        ):
            msg += '; int-or-string quantities must be quoted, e.g. "0.5" or "500m"'
        found.append((base, msg))
    return sorted(set(found))


# ------------------------------------------------------- kinds without a vendored CRD (structure)
def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}  # fmt: skip


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_STR_LIST = {"type": "array", "items": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}  # Prometheus'
_LABEL_SELECTOR = _closed({
    "matchLabels": {"type": "object", "additionalProperties": _STR},
    "matchExpressions": {"type": "array", "items": _closed(
        {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
         "values": _STR_LIST}, ("key", "operator"))},
})  # fmt: skip
_RELABEL = _closed({
    "sourceLabels": _STR_LIST, "separator": _STR, "targetLabel": _STR, "regex": _STR,
    "modulus": _INT, "replacement": _STR,
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod",
                        "HashMod", "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep",
                        "LabelKeep", "lowercase", "Lowercase", "uppercase", "Uppercase",
                        "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
})  # fmt: skip
# Prometheus Operator's monitoring.coreos.com/v1 PodMonitor, the fields of its API reference that
# this project may use (the CRD itself is not vendored). Objects are closed, so a misspelt or
# misplaced field is an error; a real field missing here is also one: add it after checking the
# Prometheus Operator API reference.
_PODMONITOR = _closed({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "PodMonitor"},
    "metadata": {"type": "object"},  # checked as ObjectMeta below
    "spec": _closed({
        "jobLabel": _STR, "podTargetLabels": _STR_LIST, "selector": _LABEL_SELECTOR,
        "namespaceSelector": _closed({"any": _BOOL, "matchNames": _STR_LIST}),
        "sampleLimit": _INT, "targetLimit": _INT, "labelLimit": _INT,
        "labelNameLengthLimit": _INT, "labelValueLengthLimit": _INT, "scrapeClass": _STR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _closed({
            "port": _STR, "portNumber": _INT, "path": _STR,
            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
            "params": {"type": "object", "additionalProperties": _STR_LIST},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": _BOOL,
            "honorTimestamps": _BOOL, "filterRunning": _BOOL, "enableHttp2": _BOOL,
            "followRedirects": _BOOL, "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL},
        })},
    }, ("selector", "podMetricsEndpoints")),
}, ("apiVersion", "kind", "metadata", "spec"))  # fmt: skip
STRUCTURAL_SCHEMAS = {("monitoring.coreos.com", "v1", "PodMonitor"): _PODMONITOR}


def check_document(doc: Any, crd_dir: Path = CRD_DIR) -> list[tuple[str, str]]:
    """Every problem of one manifest as (field path, message); empty if it is valid."""
    if not isinstance(doc, dict):
        return [("", "document is not a mapping")]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [("", "apiVersion and kind are required strings")]
    group, _, version = api_version.rpartition("/")
    versions = crd_versions(crd_dir)
    if (group, version, kind) in versions:
        entry = versions[(group, version, kind)]
        problems = []
        if entry.get("deprecated") or not entry.get("served", True):
            problems.append(
                ("apiVersion", f"{api_version} is deprecated or not served; use ray.io/v1")
            )
        raw, validator = crd_validator((group, version, kind), crd_dir)
        data = copy.deepcopy(doc)
        drop_nulls(data, raw)
        problems += _schema_problems(validator.iter_errors(data))
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
            return [*problems, ("metadata.name", "required")]
        problems += _schema_problems(object_meta_validator().iter_errors(meta), "metadata")
        name, limit = meta.get("name"), RAY_NAME_LIMITS.get(kind)
        if limit and isinstance(name, str) and name:
            if len(name) > limit:
                problems.append(
                    ("metadata.name", f"KubeRay rejects {kind} names over {limit} characters")
                )
            if not DNS1035.fullmatch(name):
                problems.append(
                    ("metadata.name", f"{name!r} is not a DNS-1035 label (KubeRay requires one)")
                )
        return problems
    if group in {g for g, _, _ in versions}:
        return [("apiVersion", f"no CRD in {crd_dir.name}/ defines {api_version} {kind}")]
    if (group, version, kind) in STRUCTURAL_SCHEMAS:
        validator = jsonschema.Draft202012Validator(STRUCTURAL_SCHEMAS[group, version, kind])
        problems = _schema_problems(validator.iter_errors(doc))
        if isinstance(meta := doc.get("metadata"), dict):
            problems += _schema_problems(object_meta_validator().iter_errors(meta), "metadata")
        return problems
    validator = core_validator(api_version, kind)
    if validator is None:
        return [("", f"no schema for {api_version} {kind}; cannot validate it")]
    problems = _schema_problems(validator.iter_errors(doc))
    if kind == "Secret" and isinstance(doc.get("data"), dict):
        for key, value in doc["data"].items():
            try:
                base64.b64decode(str(value).replace("\n", ""), validate=True)
            except (binascii.Error, ValueError):
                problems.append((f"data.{key}", "not valid base64 (use stringData for plain text)"))
    return problems


def check_text(text: str, source: str = "<string>", crd_dir: Path = CRD_DIR) -> list[Problem]:
    """Every problem of every document in a YAML stream; raises yaml.YAMLError if unparsable."""
    problems = []
    for line, doc, duplicates in load_documents(text):
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        where = f"{source}:{line} {kind}/{name}"
        problems += [Problem(where, "", f"duplicate key {k!r} at line {n}") for k, n in duplicates]
        problems += [Problem(where, path, msg) for path, msg in check_document(doc, crd_dir)]
    return problems


def check_file(path: str | Path, crd_dir: Path = CRD_DIR) -> list[Problem]:
    return check_text(Path(path).read_text(encoding="utf-8"), str(path), crd_dir)


def main(argv: list[str] | None = None) -> int:
    files = sys.argv[1:] if argv is None else argv
    if not files or files[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    status = 0
    for file in files:
        try:
            problems = check_file(file)
        except (OSError, yaml.YAMLError) as exc:
            print(f"ERROR {file}: cannot read or parse: {exc}")
            status = 2
            continue
        for problem in problems:
            print(f"ERROR {problem}")
        print(f"{'OK   ' if not problems else 'FAIL '} {file}")
        status = max(status, 1 if problems else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
