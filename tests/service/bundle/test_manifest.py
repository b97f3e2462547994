"""The manifest schema: one set of typed models, published as docs/bundle-format.schema.json."""

import json

import jsonschema
import pytest
import torch

from service.bundle.codec import decode_bundle, encode_bundle
from service.bundle.manifest import MAX_JSON_DEPTH, Manifest
from service.bundle.schema import manifest_json_schema
from service.core.records import PromptLayout
from service.methods import BundleError
from tests.helpers import REF, ROOT, expect_field, raw_manifest, with_manifest

SCHEMA_FILE = ROOT / "docs" / "bundle-format.schema.json"


def test_published_schema_is_generated_from_the_models():
    assert json.loads(SCHEMA_FILE.read_text()) == manifest_json_schema(), (
        "regenerate: python -m service.bundle.schema > docs/bundle-format.schema.json")


def test_published_schema_accepts_what_the_reader_accepts_and_refuses_a_bad_template():
    schema = manifest_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    good = json.loads(Manifest("zeroshot", REF, ("cat", "dog"), options={"templates": ["a {}."]}).to_json())
    jsonschema.validate(good, schema)
    bad = good | {"options": {"templates": ["{0.__class__}{}"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    expect_field(with_manifest(bad, {}), "options.templates")


@pytest.mark.parametrize("template", ["a {}.", "{} in the wild", "a photo of a {}, which is small."])
def test_templates_with_one_slot_and_no_other_braces_are_accepted(template):
    data = encode_bundle(Manifest("zeroshot", REF, ("a",), PromptLayout(), options={"templates": [template]}), {})
    assert decode_bundle(data).manifest.options["templates"] == [template]


@pytest.mark.parametrize("template", ["{}{}", "{0}", "{!r}{}", "{:>9999999}", "{} {x}", "}{}", "{{}}", "none"])
def test_templates_with_format_syntax_are_refused(template):
    expect_field(with_manifest(raw_manifest(method="zeroshot", prompt={}, options={"templates": [template]}), {}),
                 "options.templates")


def test_options_and_metrics_depth_is_bounded_but_ordinary_nesting_is_kept():
    nested = {"trainer": {"quantizer": {"bits": 1, "t": [1, 2]}}}
    data = encode_bundle(Manifest("coop", REF, ("a",), PromptLayout(2, 8), options=nested, metrics=nested),
                         {"ctx": torch.zeros(2, 8)})
    assert decode_bundle(data).manifest.options == nested
    deep = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    expect_field(with_manifest(raw_manifest(metrics={"x": deep})), "metrics")


def test_every_error_is_a_bundle_error_never_a_crash():
    """Each top-level field given a value of each JSON type: the reader answers BundleError or accepts."""
    odd_values = [None, True, 0, -1, 1.5, "", "x" * 300, [], [None], {}, {"a": [1]}]
    for key in raw_manifest():
        for value in odd_values:
            try:
                decode_bundle(with_manifest(raw_manifest(**{key: value})))
            except BundleError as exc:
                assert exc.field.split(".")[0] in (key, "manifest", "ctx"), (key, value, exc)


def test_python_construction_normalizes_and_round_trips():
    manifest = Manifest("coop", REF, ["a", "b"], PromptLayout(2, 8))  # a list from the trainer becomes a tuple
    assert manifest.classnames == ("a", "b")
    again = decode_bundle(encode_bundle(manifest, {"ctx": torch.zeros(2, 8)})).manifest
    assert again == manifest
