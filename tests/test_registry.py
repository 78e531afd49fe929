"""mmadapt.core.registry on its own: every table entry resolves to the class it names, dotted paths resolve the same
way, bad names are refused naming what failed, and a card's foreign code is found without importing it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.utils.data import Dataset

from mmadapt.core.generator import Generator
from mmadapt.core.nodes import Adapter, Bridge, Encoder, Node
from mmadapt.core.registry import (ADAPTER_TYPES, DATA_TYPES, NODE_TYPES, UnknownType, foreign_types, import_dotted, resolve,
                                   sub_sections, would_import)

ENCODERS = {"open_clip_vision", "hf_vision", "blip2_vision", "point_bert", "audiomae", "hf_audio"}
GENERATORS = {"causal_lm", "diffusion", "sdxl", "sd3"}
BRIDGES = {"token", "linear_projector", "mlp_projector", "qformer", "prefix", "soft_prompt", "ip_adapter"}
TABLES = {"node": NODE_TYPES, "adapter": ADAPTER_TYPES, "data": DATA_TYPES}


def test_the_node_table_is_exactly_the_known_roles() -> None:
    assert set(NODE_TYPES) == ENCODERS | GENERATORS | BRIDGES


@pytest.mark.parametrize(("table", "name"), [(t, n) for t, table in TABLES.items() for n in table])
def test_every_entry_resolves_to_the_class_its_path_names_by_name_and_by_path(table: str, name: str) -> None:
    entries = TABLES[table]
    cls = resolve(name, entries)
    assert isinstance(cls, type)
    assert f"{cls.__module__}.{cls.__qualname__}" == entries[name]  # the class defined there, not an alias of another
    assert resolve(entries[name], entries) is cls  # the dotted path, as a recipe may spell it
    if table == "node":
        role = Encoder if name in ENCODERS else Generator if name in GENERATORS else Bridge
        assert issubclass(cls, role) and cls.role == role.role
    elif table == "adapter":
        assert issubclass(cls, Adapter)
    else:
        assert issubclass(cls, Dataset) and not issubclass(cls, Node)


def test_a_dotted_path_outside_the_tables_imports_without_registration() -> None:
    cls = resolve("plugin_bridge.DoubleLinear", NODE_TYPES)
    assert cls.__name__ == "DoubleLinear" and issubclass(cls, Bridge)
    assert "plugin_bridge.DoubleLinear" not in NODE_TYPES and "DoubleLinear" not in str(NODE_TYPES)  # nothing registered


def test_an_unknown_name_is_refused_naming_it_a_close_match_and_every_known_type() -> None:
    with pytest.raises(UnknownType) as info:
        resolve("qfromer", NODE_TYPES)
    text = str(info.value)
    assert text.startswith("unknown type 'qfromer' (did you mean 'qformer'?); known types: ")
    assert text.endswith(", or a dotted path such as my_pkg.module.Class")
    assert all(name in text for name in NODE_TYPES)
    with pytest.raises(UnknownType) as info:
        resolve("zzzzzz", DATA_TYPES)
    assert "unknown type 'zzzzzz'; known types: audio_captions, conversations, digits_captions, digits_conversations" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("value", ["", None, 3])
def test_a_type_that_is_not_a_nonempty_string_is_refused(value: object) -> None:
    with pytest.raises(UnknownType, match="^must be a non-empty string; known types: lokr, lora$"):
        resolve(value, ADAPTER_TYPES)  # type: ignore[arg-type]


def test_a_bad_dotted_path_names_the_part_that_failed() -> None:
    with pytest.raises(UnknownType, match=r"^cannot import module 'no_such_pkg.mod' for type 'no_such_pkg.mod.Cls': "):
        resolve("no_such_pkg.mod.Cls", NODE_TYPES)
    with pytest.raises(UnknownType, match=r"^module 'bridges.projector' has no attribute 'Nope'$"):
        resolve("bridges.projector.Nope", NODE_TYPES)
    with pytest.raises(UnknownType, match=r"^'Plain' is not a dotted path \(expected package.module.Class\)$"):
        import_dotted("Plain")


def test_a_plugin_module_that_does_not_compile_is_refused_as_an_unknown_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_plugin_mod.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UnknownType, match="broken_plugin_mod"):
            resolve("broken_plugin_mod.Bridge", NODE_TYPES)
    finally:
        sys.modules.pop("broken_plugin_mod", None)


# --- composite data sections ---
def test_sub_sections_are_a_mixtures_dict_parts_and_none_otherwise() -> None:
    first, second = {"type": "digits_captions", "limit": 2}, {"type": "digits_points"}
    assert sub_sections({"type": "mixture", "parts": [first, "junk", second]}) == [first, second]
    assert sub_sections({"type": "mixture"}) == []
    assert sub_sections({"type": "digits_captions"}) is None
    assert sub_sections({"type": "no_such_type"}) is None
    assert sub_sections({}) is None


# --- code a recipe would import ---
def test_would_import_only_dotted_names_outside_the_table() -> None:
    assert would_import("my_pkg.Bridge", NODE_TYPES)
    assert not would_import("qformer", NODE_TYPES)
    assert not would_import("qfromer", NODE_TYPES)  # an unknown plain name imports nothing: resolve refuses it
    assert would_import("bridges.projector.LinearProjector", NODE_TYPES)  # a table class spelled as a path still imports


def test_foreign_types_are_found_everywhere_a_recipe_names_code_and_nothing_is_imported() -> None:
    raw = {
        "graph": {
            "vision": {"type": "hf_vision"},
            "proj": {"type": "evil_pkg_a.Bridge", "inputs": {"x": "vision"}},
            "llm": {"type": "causal_lm", "adapters": [{"type": "lora"}, {"type": "evil_pkg_b.Adapter"}]},
        },
        "data": {"type": "mixture", "parts": [{"type": "digits_captions"}, {"type": "evil_pkg_c.Data"}]},
        "val_data": {"type": "evil_pkg_d.Data"},
        "train": {"type": "not.a.section.with.types"},
    }
    assert foreign_types(raw) == [
        ("graph.proj.type", "evil_pkg_a.Bridge"),
        ("graph.llm.adapters[1].type", "evil_pkg_b.Adapter"),
        ("data.parts[1].type", "evil_pkg_c.Data"),
        ("val_data.type", "evil_pkg_d.Data"),
    ]
    assert not any(name.startswith("evil_pkg") for name in sys.modules)
    assert foreign_types({"graph": {"llm": {"type": "causal_lm"}}, "data": {"type": "digits_captions"}}) == []
    assert foreign_types({"graph": "not a mapping", "data": None}) == []
