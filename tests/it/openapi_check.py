"""Checks for tests/it/openapi.rs, run with a Python that has openapi-spec-validator.

Reads one JSON object from standard input:

  {"document": <an OpenAPI document>,
   "pattern": <a JSON Schema pattern> | null,
   "cases": [[byte, ...], ...]}

and prints one JSON object:

  {"validator": "openapi-spec-validator <version>",
   "errors": [<what is wrong with the document>, ...],
   "examples_checked": <count>,
   "matches": [<whether the pattern matches each case, decoded as Latin-1>, ...]}

The document is checked with openapi-spec-validator's OpenAPI 3.1 validator, and every
example of a media type with a schema is checked against that schema (JSON Schema
2020-12, `$ref`s resolved in the document), which the spec validator does not do.
"""

import json
import re
import sys

import jsonschema
import openapi_spec_validator
import referencing
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:openapi-document"


def spec_errors(document):
    try:
        return [e.message for e in OpenAPIV31SpecValidator(document).iter_errors()]
    except Exception as e:  # a dangling $ref or a missing field raises instead
        return [f"{type(e).__name__}: {e}"]


def pointer(*parts):
    """A JSON pointer (RFC 6901) to parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def media_types(document):
    """(where, pointer, media type object) for every request and response body."""
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            at = ("paths", path, method)
            body = operation.get("requestBody", {})
            for name, media in body.get("content", {}).items():
                where = f"{method.upper()} {path} request {name}"
                yield where, pointer(*at, "requestBody", "content", name), media
            for status, response in operation["responses"].items():
                for name, media in response.get("content", {}).items():
                    where = f"{method.upper()} {path} {status} {name}"
                    yield where, pointer(*at, "responses", status, "content", name), media


def example_errors(document):
    """Each example checked against its media type's schema, whose `$ref`s resolve in
    the document."""
    registry = referencing.Registry().with_resource(
        DOC_URI, DRAFT202012.create_resource(document)
    )
    errors, checked = [], 0
    for where, at, media in media_types(document):
        if "schema" not in media:
            continue
        examples = {name: e.get("value") for name, e in media.get("examples", {}).items()}
        if "example" in media:
            examples["example"] = media["example"]
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{DOC_URI}#{at}/schema"}, registry=registry
        )
        for name, value in examples.items():
            checked += 1
            for error in validator.iter_errors(value):
                errors.append(f"{where}: example {name!r}: {error.message}")
    return errors, checked


def main():
    request = json.load(sys.stdin)
    document = request["document"]
    errors = spec_errors(document)
    more, checked = example_errors(document) if not errors else ([], 0)
    matches = []
    if request.get("pattern") is not None:
        # fullmatch: the pattern is anchored with ^...$, and Python's `$` (unlike
        # ECMA-262's) would also match before a final newline.
        pattern = re.compile(request["pattern"])
        matches = [
            pattern.fullmatch(bytes(case).decode("latin-1")) is not None
            for case in request["cases"]
        ]
    json.dump(
        {
            "validator": f"openapi-spec-validator {openapi_spec_validator.__version__}",
            "errors": errors + more,
            "examples_checked": checked,
            "matches": matches,
        },
        sys.stdout,
    )


main()
