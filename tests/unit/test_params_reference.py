"""docs/params.md is generated from the schema and params.yaml; it must match them, and explain every key."""

import re

from pipelines.config import Params
from pipelines.params_reference import REFERENCE_FILE, render


def schema_keys(model, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from schema_keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_the_committed_reference_is_current():
    assert REFERENCE_FILE.read_text() == render(), "run `python -m pipelines.params_reference` and commit docs/params.md"


def test_every_key_has_a_type_a_default_and_a_meaning():
    rows = {match[1]: match[2] for match in re.finditer(r"^\| `([\w.]+)` \| (.+) \|$", render(), re.MULTILINE)}
    keys = list(schema_keys(Params))
    assert set(rows) == set(keys)
    empty = [key for key in keys if rows[key].rstrip().endswith("|") or rows[key].split(" | ")[-1].strip() == ""]
    assert not empty, f"keys without a comment in params.yaml: {empty}"
