"""The published JSON Schema of the manifest (`docs/bundle-format.schema.json`), generated from the models.

    python -m service.bundle.schema > docs/bundle-format.schema.json
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from service.bundle.header import MANIFEST_KEY
from service.bundle.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest
from service.methods import METHODS


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of the manifest, with each method's options schema attached by `if method == ...`."""
    schema = TypeAdapter(Manifest).json_schema()
    definitions = schema.setdefault("$defs", {})
    rules = []
    for name, spec in sorted(METHODS.items()):
        model = spec.options_model
        options = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(options.pop("$defs", {}))
        definitions[model.__name__] = options
        rules.append({"if": {"properties": {"method": {"const": name}}},
                      "then": {"properties": {"options": {"$ref": f"#/$defs/{model.__name__}"}}}})
    schema["properties"]["method"]["enum"] = sorted(METHODS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://promptserve.invalid/bundle-format.schema.json",
        "title": "promptserve bundle manifest",
        "description": f"The JSON object stored under '{MANIFEST_KEY}' in a bundle's safetensors metadata "
                       f"(format {FORMAT_NAME!r} version {FORMAT_VERSION}). Generated from service/bundle/manifest.py "
                       "and the method specs in service/methods/.",
        **schema,
        "allOf": rules,
    }


if __name__ == "__main__":
    print(json.dumps(manifest_json_schema(), indent=2, sort_keys=True))
