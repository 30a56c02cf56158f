"""values.yaml is documented key by key, and docs/chart.md's table is generated from it."""

from scripts import values_doc


def test_every_values_key_has_a_description():
    assert values_doc.undocumented_keys(values_doc.VALUES.read_text()) == []


def test_docs_values_table_is_up_to_date():
    assert values_doc.main(["--check"]) == 0, "run `make chart-docs`"


def test_parser_reads_nested_keys_multiline_descriptions_and_skips_documented_insides():
    text = (
        "a:\n"
        "  # -- first line\n"
        "  # second line\n"
        "  b: 1\n"
        "  # -- a whole mapping\n"
        "  c:\n"
        "    d: 2\n"
        "e: 3\n"
    )
    docs = values_doc.parse_values(text)
    assert [(d.path, d.default, d.description) for d in docs] == [
        ("a.b", 1, "first line second line"),
        ("a.c", {"d": 2}, "a whole mapping"),
    ]
    assert values_doc.undocumented_keys(text) == ["e"]
