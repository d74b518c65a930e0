"""Checks a real response against the OpenAPI document the server serves: the operation its
method and path match, a documented status, the documented headers, the content type, and
the body against its schema (JSON Schema 2020-12, `$ref`s resolved in the document)."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012

BASE = "urn:sd-rest-openapi"


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class OpenApi:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry = Registry().with_resource(BASE, DRAFT202012.create_resource(doc))
        self._templates = [(self._regex(path), path) for path in doc["paths"]]

    def _regex(self, template: str) -> re.Pattern[str]:
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        return re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", pattern) + "$")

    def template(self, path: str) -> str:
        path = path.split("?", 1)[0]
        found = [t for regex, t in self._templates if regex.match(path)]
        # A literal path beats a template (/events/token is not /{endpoint}/{id}).
        found.sort(key=lambda t: t.count("{"))
        assert found, f"{path} matches no path of the document"
        return found[0]

    def _get(self, parts: list[str]) -> Any:
        node: Any = self.doc
        for part in parts:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def validate(self, pointer: str, instance: Any) -> None:
        validator = Draft202012Validator(
            {"$ref": BASE + pointer}, registry=self.registry, format_checker=FormatChecker()
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{pointer}: {[e.message for e in errors[:3]]} in {instance!r}"

    def check(
        self, method: str, path: str, status: int, headers: dict[str, str], body: bytes
    ) -> dict[str, Any]:
        """Asserts the response is one the document describes; returns the operation."""
        template = self.template(path)
        item = self.doc["paths"][template]
        method = method.lower()
        assert method in item, f"{method.upper()} {template} is not documented"
        responses = item[method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path}: {status} is not documented"
        where = ["paths", template, method, "responses", str(status)]
        response = responses[str(status)]
        if "$ref" in response:
            where = response["$ref"].removeprefix("#/").split("/")
            response = self._get(where)
        lower = {k.lower(): v for k, v in headers.items()}
        for name, header in response.get("headers", {}).items():
            if name.lower() not in lower:
                assert not header.get("required"), f"{path}: missing header {name}"
                continue
            self.validate(_pointer(*where, "headers", name, "schema"), lower[name.lower()])
        content = response.get("content")
        if not content or method == "head" or status in (204, 304):
            assert not body or method == "head" or not content, f"{path}: undocumented body"
            return item[method]
        ctype = lower.get("content-type", "").split(";")[0].strip()
        assert ctype in content, f"{path}: {ctype} is not among {list(content)}"
        schema_at = _pointer(*where, "content", ctype, "schema")
        if ctype == "application/json":
            self.validate(schema_at, json.loads(body))
        return item[method]

    def check_event(self, path: str, name: str, event_id: str | None, data: Any) -> None:
        """An event of a stream against its branch of the stream's schema: its name and id,
        and its JSON data against that branch's `contentSchema`."""
        template = self.template(path)
        where = ["paths", template, "get", "responses", "200", "content", "text/event-stream"]
        branches = self._get([*where, "schema", "oneOf"])
        found = [n for n, b in enumerate(branches) if b["properties"]["event"]["const"] == name]
        assert found, f"{path}: event {name!r} is not documented"
        at = [*where, "schema", "oneOf", str(found[0])]
        self.validate(_pointer(*at), {"event": name, "id": event_id, "data": json.dumps(data)})
        self.validate(_pointer(*at, "properties", "data", "contentSchema"), data)
