"""The SCOM management pack: schema order, declared references, resolvable and stable ids, versions."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.errors import InvalidInputError
from shared_code.maps.scom import (
    MP_ID_PATTERN,
    SCHEMA_ORDER,
    element_prefix,
    next_version,
    parse_version,
    render_management_pack,
    server_token,
    version_from_counter,
    version_from_time,
)
from tests.fakes.maps import synthetic_map

ALIAS_USE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)!")
MP_ELEMENT = re.compile(r'\$MPElement\[Name="([^"]+)"\]')
ELEMENT_REF_ATTRIBUTES = (
    "Base",
    "Type",
    "Target",
    "TypeID",
    "RelationshipType",
    "ParentMonitorID",
    "MemberMonitor",
    "ParentFolder",
    "ElementID",
    "Folder",
)


def _pack(*maps, version="1.0.0.1"):
    return ET.fromstring(render_management_pack(list(maps), version=version))


def _declared_ids(root: ET.Element) -> set[str]:
    ids = (element.get("ID") for element in root.iter() if element.tag != "LanguagePack")
    return {element_id for element_id in ids if element_id}


def _references(root: ET.Element) -> list[str]:
    found: list[str] = []
    for element in root.iter():
        for attribute in ELEMENT_REF_ATTRIBUTES:
            value = element.get(attribute)
            if value:
                found.append(value)
        if element.text:
            found.extend(MP_ELEMENT.findall(element.text))
    return found


def test_root_children_follow_the_schema_order_and_the_manifest_comes_first():
    root = _pack(synthetic_map(40))
    children = [child.tag for child in root]
    assert children[0] == "Manifest"
    assert children == sorted(children, key=SCHEMA_ORDER.index)
    assert root.get("SchemaVersion") == "2.0"
    assert [c.tag for c in root.find("Manifest")] == ["Identity", "Name", "References"]
    assert [c.tag for c in root.find("Monitoring")] == ["Discoveries", "Monitors"]
    assert [c.tag for c in root.find("Presentation")] == ["Views", "Folders", "FolderItems"]
    assert [c.tag for c in root.find("TypeDefinitions/EntityTypes")] == ["ClassTypes", "RelationshipTypes"]


def test_references_are_the_sealed_libraries_with_microsofts_key():
    root = _pack(synthetic_map(40))
    references = {
        r.get("Alias"): (r.findtext("ID"), r.findtext("PublicKeyToken")) for r in root.iter("Reference")
    }
    assert references["System"][0] == "System.Library"
    assert references["SC"][0] == "Microsoft.SystemCenter.Library"
    assert references["ServiceDesigner"][0] == "Microsoft.SystemCenter.ServiceDesigner.Library"
    assert {token for _, token in references.values()} == {"31bf3856ad364e35"}
    for reference in root.iter("Reference"):
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", reference.findtext("Version"))


def test_every_alias_used_is_declared_and_every_local_id_referenced_exists():
    root = _pack(synthetic_map(120, hostile=True), synthetic_map(30, server="db-02"))
    aliases = {reference.get("Alias") for reference in root.iter("Reference")}
    declared = _declared_ids(root) | {root.findtext("Manifest/Identity/ID")}
    references = _references(root)
    assert references
    for reference in references:
        used = ALIAS_USE.match(reference)
        if used:
            assert used.group(1) in aliases, reference
        else:
            assert reference in declared, reference
    for element_id in _declared_ids(root):
        assert MP_ID_PATTERN.match(element_id), element_id
        assert len(element_id) < 256, element_id
    display = {d.get("ElementID") for d in root.iter("DisplayString")}
    for tag in ("ClassType", "RelationshipType", "Discovery", "DependencyMonitor", "View", "Folder"):
        for element in root.iter(tag):
            assert element.get("ID") in display, f"{tag} {element.get('ID')} has no display string"


def test_one_distributed_application_per_server_with_its_computers_as_components():
    web = synthetic_map(60)
    root = _pack(web, synthetic_map(20, server="db-02"))
    applications = [
        c for c in root.iter("ClassType") if c.get("Base").endswith("ServiceDesigner.GenericService")
    ]
    assert len(applications) == 2
    groups = [c for c in root.iter("ClassType") if c.get("Base").endswith("ServiceComponentGroup")]
    assert len(groups) == 6
    prefix = element_prefix("web-01")
    patterns = {
        d.get("Target"): "".join(p.text for p in d.iter("Pattern"))
        for d in root.iter("Discovery")
        if d.find(".//Pattern") is not None
    }
    assert re.search(patterns[f"{prefix}.ServerGroup"], "WEB-01.corp.example")
    assert not re.search(patterns[f"{prefix}.ServerGroup"], "web-010")
    client_names = [n.name for n in web.nodes if n.kind.value == "machine" and n.name.startswith("client")]
    assert client_names
    assert all(re.search(patterns[f"{prefix}.ClientsGroup"], name) for name in client_names)
    assert not re.search(patterns[f"{prefix}.ClientsGroup"], "dep-0001")
    references = [r for r in root.iter("RelationshipType") if r.get("Base") == "System!System.Reference"]
    assert {r.find("Source").get("Type").rsplit(".", 1)[1] for r in references} == {
        "ClientsGroup",
        "ServerGroup",
    }
    for discovery in root.iter("Discovery"):
        source = discovery.find("DataSource")
        assert source.get("TypeID") == "SC!Microsoft.SystemCenter.GroupPopulator"
        assert [c.tag for c in source] == ["RuleId", "GroupInstanceId", "MembershipRules"]
        for rule in source.iter("MembershipRule"):
            if "System.Computer" in rule.findtext("MonitoringClass"):
                assert rule.find("Expression") is not None, "a computer rule without a filter would take all"


def test_hostile_names_stay_text_and_patterns_match_them_literally():
    hostile = synthetic_map(90, hostile=True)
    body = render_management_pack([hostile], version="1.0.0.0")
    root = ET.fromstring(body)
    assert "<script>" not in body
    assert "]]>" not in body.replace("]]&gt;", "")
    names = [n.name for n in hostile.nodes if n.kind.value == "machine" and n.name != hostile.server]
    assert any(name.startswith("<script>") for name in names)
    patterns = [p.text or "" for p in root.iter("Pattern")]
    for name in names:
        assert any(re.search(pattern, " ".join(name.split())) for pattern in patterns), name


def test_ids_are_stable_across_imports_and_only_the_version_changes():
    first = synthetic_map(50)
    later = synthetic_map(50, imported_at=first.imported_at + timedelta(hours=3))
    one = _pack(first, version=version_from_time(first.imported_at))
    two = _pack(later, version=version_from_time(later.imported_at))
    assert _declared_ids(one) == _declared_ids(two)
    assert one.findtext("Manifest/Identity/ID") == two.findtext("Manifest/Identity/ID")
    assert parse_version(two.findtext("Manifest/Identity/Version")) > parse_version(
        one.findtext("Manifest/Identity/Version")
    )
    assert server_token("WEB-01") == server_token(" web-01 ") != server_token("web_01")


def test_versions_grow_with_time_counter_and_previous():
    moments = [
        datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC),
        datetime(2025, 6, 2, 9, 30, tzinfo=UTC),
    ]
    versions = [parse_version(version_from_time(m)) for m in moments]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    counters = [parse_version(version_from_counter(n)) for n in (0, 1, 65534, 65535, 10**9)]
    assert counters == sorted(counters)
    assert len(set(counters)) == len(counters)
    now = moments[-1]
    assert parse_version(next_version(None, now)) == parse_version(version_from_time(now))
    ahead = "1.99.0.5"  # a previous export from a clock that ran ahead
    assert parse_version(next_version(ahead, now)) == (1, 99, 0, 6)
    assert parse_version(next_version(version_from_time(now), now)) > parse_version(version_from_time(now))


@pytest.mark.parametrize("version", ["1.0.0", "1.0.0.0.0", "a.b.c.d", "1.0.0.70000", ""])
def test_a_bad_version_is_refused_with_what_is_wrong(version):
    with pytest.raises(InvalidInputError, match="version"):
        render_management_pack([synthetic_map(10)], version=version)


def test_empty_input_bad_pack_id_and_duplicate_servers_are_refused():
    with pytest.raises(InvalidInputError):
        render_management_pack([], version="1.0.0.0")
    with pytest.raises(InvalidInputError, match="id"):
        render_management_pack([synthetic_map(10)], version="1.0.0.0", pack_id="bad id!")
    with pytest.raises(InvalidInputError, match="twice"):
        render_management_pack([synthetic_map(10), synthetic_map(12, server="WEB-01")], version="1.0.0.0")
