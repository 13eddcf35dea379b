"""A SCOM management pack with one distributed application (DA) per mapped server.

What Service Map's SCOM integration built, as an unsealed pack the operator imports
(``Import-SCOMManagementPack`` or the console). Per server, the shape the Distributed Application
Designer itself writes:

* a DA class (``ServiceDesigner!Microsoft.SystemCenter.ServiceDesigner.GenericService``, singleton,
  unhosted) and three component groups (``...ServiceDesigner.ServiceComponentGroup``): *Server*
  (the server's computer), *Clients* (computers that connect in), *Dependencies* (computers it
  connects out to);
* ``System!System.Containment`` relationships DA -> each group and group -> ``System!System.Computer``;
  ``System!System.Reference`` relationships Clients -> Server -> Dependencies (the diagram's arrows);
* ``SC!Microsoft.SystemCenter.GroupPopulator`` discoveries that fill them: the DA with its groups,
  each group with the computers whose display name is one of the map's machine names (the short
  name or any FQDN that starts with it, case-insensitive), each reference between groups;
* availability roll-up dependency monitors (DA <- groups <- computers), a diagram view and a state
  view in a folder of their own, and ENU display strings.

Client groups, external endpoints, processes and ports are not SCOM objects, so they are not
components; the DA's description counts what was left out. Element ids are derived from the server
name only (stable across imports, so re-importing upgrades the DA instead of adding one), and the
caller passes a version that must grow between imports: ``version_from_time``,
``version_from_counter`` and ``next_version`` give one.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from shared_code.domain.maps import Direction, EdgeKind, MapNode, NodeKind, ServerMap
from shared_code.errors import InvalidInputError

PUBLIC_KEY_TOKEN = "31bf3856ad364e35"  # noqa: S105 - not a secret: Microsoft's key for the sealed System Center libraries


@dataclass(frozen=True)
class PackReference:
    alias: str
    pack_id: str
    version: str


SYSTEM_LIBRARY = PackReference("System", "System.Library", "7.5.8501.0")
SYSTEM_CENTER_LIBRARY = PackReference("SC", "Microsoft.SystemCenter.Library", "7.0.8432.0")
SERVICE_DESIGNER_LIBRARY = PackReference(
    "ServiceDesigner", "Microsoft.SystemCenter.ServiceDesigner.Library", "7.0.8432.0"
)
HEALTH_LIBRARY = PackReference("Health", "System.Health.Library", "7.0.8432.0")
REFERENCES = (SYSTEM_LIBRARY, SYSTEM_CENTER_LIBRARY, SERVICE_DESIGNER_LIBRARY, HEALTH_LIBRARY)

# the management pack schema's order of the root's children (each optional but the Manifest)
SCHEMA_ORDER = (
    "Manifest",
    "TypeDefinitions",
    "Categories",
    "Monitoring",
    "ConfigurationGroups",
    "Templates",
    "PresentationTypes",
    "Presentation",
    "Reporting",
    "LanguagePacks",
    "Resources",
)

ELEMENT_PREFIX = "ItsmConnector.DependencyMap"
COMBINED_PACK_ID = "ItsmConnector.DependencyMaps"
MP_ID_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
VERSION_PATTERN = re.compile(r"^\d{1,5}\.\d{1,5}\.\d{1,5}\.\d{1,5}$")
MAX_VERSION_PART = 65534
NAMES_PER_PATTERN = 40

_GROUPS = (
    ("ServerGroup", "Server"),
    ("ClientsGroup", "Clients"),
    ("DependenciesGroup", "Dependencies"),
)
_REFERENCES = (("ClientsGroup", "ServerGroup", "use"), ("ServerGroup", "DependenciesGroup", "depends on"))


def server_token(server: str) -> str:
    """A valid, stable id segment for a server: its name made id-safe plus a hash of the name."""
    name = server.strip().lower()
    base = re.sub(r"[^a-z0-9]+", "_", name).strip("_")[:48] or "server"
    if not base[0].isalpha():
        base = "s" + base
    return f"{base}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def element_prefix(server: str) -> str:
    return f"{ELEMENT_PREFIX}.{server_token(server)}"


def pack_id_for(servers: Sequence[str]) -> str:
    """One server: a pack of its own (``ItsmConnector.DependencyMap.<token>.Pack``).

    Several: the combined pack ``ItsmConnector.DependencyMaps``.
    """
    if len(servers) == 1:
        return f"{element_prefix(servers[0])}.Pack"
    return COMBINED_PACK_ID


def parse_version(text: str) -> tuple[int, int, int, int]:
    if not VERSION_PATTERN.match(text):
        raise InvalidInputError(f"management pack version {text[:40]!r} is not four numbers like 1.0.0.0")
    parts = tuple(int(part) for part in text.split("."))
    if any(part > MAX_VERSION_PART for part in parts):
        raise InvalidInputError(f"management pack version {text!r} has a part over {MAX_VERSION_PART}")
    return parts[0], parts[1], parts[2], parts[3]


def version_from_time(moment: datetime) -> str:
    """A version that grows with time, to the second.

    ``1.<years since 2000>.<day of year * 100 + hour>.<minute * 60 + second>``, every part under 65535.
    """
    utc = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    day = utc.timetuple().tm_yday
    return f"1.{utc.year - 2000}.{day * 100 + utc.hour}.{utc.minute * 60 + utc.second}"


def version_from_counter(counter: int) -> str:
    """A version that grows with an import counter (0, 1, 2 ...), up to about 4 billion imports."""
    if counter < 0:
        raise InvalidInputError("the import counter cannot be negative")
    high, low = divmod(counter, MAX_VERSION_PART + 1)
    middle, high = divmod(high, MAX_VERSION_PART + 1)
    if middle > MAX_VERSION_PART:
        raise InvalidInputError("the import counter is too large for a management pack version")
    return f"2.{middle}.{high}.{low}"


def next_version(previous: str | None, now: datetime) -> str:
    """The version for the next export: the time's, or one more than ``previous`` if that is not greater."""
    candidate = version_from_time(now)
    if previous is None:
        return candidate
    before = parse_version(previous)
    if parse_version(candidate) > before:
        return candidate
    major, minor, build, revision = before
    revision += 1
    if revision > MAX_VERSION_PART:
        build, revision = build + 1, 0
    if build > MAX_VERSION_PART:
        minor, build = minor + 1, 0
    if minor > MAX_VERSION_PART:
        raise InvalidInputError(f"management pack version {previous!r} cannot grow any further")
    return f"{major}.{minor}.{build}.{revision}"


def _clean(text: str) -> str:
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "\ufffd", text)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", _clean(text)).strip()


@dataclass(frozen=True)
class _Components:
    server: tuple[str, ...]
    clients: tuple[str, ...]
    dependencies: tuple[str, ...]
    left_out: int

    def of(self, group: str) -> tuple[str, ...]:
        return {
            "ServerGroup": self.server,
            "ClientsGroup": self.clients,
            "DependenciesGroup": self.dependencies,
        }[group]


def _components(server_map: ServerMap) -> _Components:
    by_id = {node.id: node for node in server_map.nodes}
    root = server_map.root_id

    def machine_of(node: MapNode) -> MapNode | None:
        if node.kind is NodeKind.MACHINE:
            return node
        owner = by_id.get(node.machine) if node.machine else None
        if (
            owner is not None
            and owner.kind is NodeKind.MACHINE
            and node.kind in (NodeKind.PROCESS, NodeKind.PORT)
        ):
            return owner
        return None

    clients: set[str] = set()
    dependencies: set[str] = set()
    left_out: set[str] = set()
    for edge in server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        remote_id = edge.source if edge.direction is Direction.INBOUND else edge.target
        remote = by_id[remote_id]
        machine = machine_of(remote)
        if machine is None:
            left_out.add(remote_id)
            continue
        if machine.id == root:
            continue
        name = _flat(machine.name)
        (clients if edge.direction is Direction.INBOUND else dependencies).add(name)
    server_name = _flat(by_id[root].name) if root else _flat(server_map.server)
    return _Components(
        server=(server_name,),
        clients=tuple(sorted(clients, key=str.lower)),
        dependencies=tuple(sorted(dependencies, key=str.lower)),
        left_out=len(left_out),
    )


def _name_pattern(names: Iterable[str]) -> str:
    """Case-insensitive .NET regex: the display name is one of ``names`` or an FQDN starting with one."""
    alternatives = "|".join(re.escape(name) for name in names)
    return f"(?i)^(?:{alternatives})(?:\\..*)?$"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _display(strings: ET.Element, element_id: str, name: str, description: str | None = None) -> None:
    entry = _sub(strings, "DisplayString", ElementID=element_id)
    _sub(entry, "Name", _clean(name)[:255])
    if description is not None:
        _sub(entry, "Description", _clean(description)[:4000])


def _membership_expression(rule: ET.Element, names: Sequence[str]) -> None:
    chunks = [names[i : i + NAMES_PER_PATTERN] for i in range(0, len(names), NAMES_PER_PATTERN)]
    expression = _sub(rule, "Expression")
    holder = _sub(expression, "Or") if len(chunks) > 1 else None
    for chunk in chunks:
        target = _sub(holder, "Expression") if holder is not None else expression
        regex = _sub(target, "RegExExpression")
        value = _sub(regex, "ValueExpression")
        _sub(value, "Property", '$MPElement[Name="System!System.Entity"]/DisplayName$')
        _sub(regex, "Operator", "MatchesRegularExpression")
        _sub(regex, "Pattern", _name_pattern(chunk))


def _group_populator(
    discoveries: ET.Element,
    discovery_id: str,
    target: str,
    rules: Sequence[tuple[str, str, Sequence[str] | None]],
) -> None:
    """A GroupPopulator discovery: each rule is (monitoring class, relationship, names or None for all)."""
    discovery = _sub(
        discoveries,
        "Discovery",
        ID=discovery_id,
        Enabled="true",
        Target=target,
        ConfirmDelivery="false",
        Remotable="true",
        Priority="Normal",
    )
    _sub(discovery, "Category", "Discovery")
    types = _sub(discovery, "DiscoveryTypes")
    for _, relationship, _ in rules:
        _sub(types, "DiscoveryRelationship", TypeID=relationship)
    source = _sub(
        discovery,
        "DataSource",
        ID="GroupPopulationDataSource",
        TypeID="SC!Microsoft.SystemCenter.GroupPopulator",
    )
    _sub(source, "RuleId", "$MPElement$")
    _sub(source, "GroupInstanceId", "$Target/Id$")
    membership = _sub(source, "MembershipRules")
    for monitoring_class, relationship, names in rules:
        rule = _sub(membership, "MembershipRule")
        _sub(rule, "MonitoringClass", f'$MPElement[Name="{monitoring_class}"]$')
        _sub(rule, "RelationshipClass", f'$MPElement[Name="{relationship}"]$')
        if names is not None:
            _membership_expression(rule, names)


def _dependency_monitor(monitors: ET.Element, monitor_id: str, target: str, relationship: str) -> None:
    monitor = _sub(
        monitors,
        "DependencyMonitor",
        ID=monitor_id,
        Accessibility="Public",
        Enabled="true",
        Target=target,
        ParentMonitorID="Health!System.Health.AvailabilityState",
        Remotable="true",
        Priority="Normal",
        RelationshipType=relationship,
        MemberMonitor="Health!System.Health.AvailabilityState",
    )
    _sub(monitor, "Category", "AvailabilityHealth")
    _sub(monitor, "Algorithm", "WorstOf")
    _sub(monitor, "MemberUnAvailable", "Error")


def _relationship(types: ET.Element, relationship_id: str, base: str, source: str, target: str) -> None:
    relationship = _sub(
        types, "RelationshipType", ID=relationship_id, Accessibility="Public", Abstract="false", Base=base
    )
    _sub(relationship, "Source", ID="Source", MinCardinality="0", MaxCardinality="2147483647", Type=source)
    _sub(relationship, "Target", ID="Target", MinCardinality="0", MaxCardinality="2147483647", Type=target)


def render_management_pack(
    maps: Sequence[ServerMap], *, version: str, pack_id: str | None = None, display_name: str | None = None
) -> str:
    """The unsealed management pack XML for ``maps`` (one DA each); see the module docstring."""
    if not maps:
        raise InvalidInputError("a management pack needs at least one server map")
    parse_version(version)
    pack = pack_id or pack_id_for([m.server for m in maps])
    if not MP_ID_PATTERN.match(pack) or len(pack) > 200:
        raise InvalidInputError(
            f"management pack id {pack[:60]!r} is not a valid id (letters, digits, _ and .)"
        )
    tokens = [server_token(m.server) for m in maps]
    if len(set(tokens)) != len(tokens):
        raise InvalidInputError("the same server is named twice in one management pack")

    root = ET.Element(
        "ManagementPack",
        {
            "ContentReadable": "true",
            "SchemaVersion": "2.0",
            "OriginalSchemaVersion": "1.1",
            "xmlns:xsd": "http://www.w3.org/2001/XMLSchema",
            "xmlns:xsl": "http://www.w3.org/1999/XSL/Transform",
        },
    )
    manifest = _sub(root, "Manifest")
    identity = _sub(manifest, "Identity")
    _sub(identity, "ID", pack)
    _sub(identity, "Version", version)
    title = display_name or (
        f"Dependency map: {_flat(maps[0].server)}" if len(maps) == 1 else "Server dependency maps"
    )
    _sub(manifest, "Name", _clean(title)[:255])
    references = _sub(manifest, "References")
    for reference in REFERENCES:
        element = _sub(references, "Reference", Alias=reference.alias)
        _sub(element, "ID", reference.pack_id)
        _sub(element, "Version", reference.version)
        _sub(element, "PublicKeyToken", PUBLIC_KEY_TOKEN)

    entity_types = _sub(_sub(root, "TypeDefinitions"), "EntityTypes")
    class_types = _sub(entity_types, "ClassTypes")
    relationship_types = _sub(entity_types, "RelationshipTypes")
    monitoring = _sub(root, "Monitoring")
    discoveries = _sub(monitoring, "Discoveries")
    monitors = _sub(monitoring, "Monitors")
    presentation = _sub(root, "Presentation")
    views = _sub(presentation, "Views")
    folders = _sub(presentation, "Folders")
    folder_items = _sub(presentation, "FolderItems")
    strings = _sub(
        _sub(_sub(root, "LanguagePacks"), "LanguagePack", ID="ENU", IsDefault="true"), "DisplayStrings"
    )
    folder_id = f"{pack}.Folder"
    _sub(
        folders,
        "Folder",
        ID=folder_id,
        Accessibility="Public",
        ParentFolder="SC!Microsoft.SystemCenter.Monitoring.ViewFolder.Root",
    )
    _display(strings, pack, title, "Distributed applications built from imported server dependency maps.")
    _display(strings, folder_id, "Server dependency maps")

    for server_map in sorted(maps, key=lambda m: server_token(m.server)):
        _add_application(
            server_map,
            class_types,
            relationship_types,
            discoveries,
            monitors,
            views,
            folder_items,
            strings,
            folder_id,
        )

    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _add_application(
    server_map: ServerMap,
    class_types: ET.Element,
    relationship_types: ET.Element,
    discoveries: ET.Element,
    monitors: ET.Element,
    views: ET.Element,
    folder_items: ET.Element,
    strings: ET.Element,
    folder_id: str,
) -> None:
    prefix = element_prefix(server_map.server)
    server = _flat(server_map.server)
    components = _components(server_map)
    application = f"{prefix}.Application"
    _sub(
        class_types,
        "ClassType",
        ID=application,
        Accessibility="Public",
        Abstract="false",
        Base="ServiceDesigner!Microsoft.SystemCenter.ServiceDesigner.GenericService",
        Hosted="false",
        Singleton="true",
        Extension="false",
    )
    window = f"{server_map.window.start.isoformat()} to {server_map.window.end.isoformat()}"
    _display(
        strings,
        application,
        f"{server} dependencies",
        f"Dependency map of {server} from source {_flat(server_map.source)}, window {window}, imported "
        f"{server_map.imported_at.isoformat()}: {len(components.clients)} client computers, "
        f"{len(components.dependencies)} dependency computers; {components.left_out} client groups, external "
        "endpoints or unresolved endpoints are not SCOM objects and are not shown. Rebuilt on every import; "
        "edits made here are overwritten.",
    )
    application_rules: list[tuple[str, str, Sequence[str] | None]] = []
    for suffix, label in _GROUPS:
        group = f"{prefix}.{suffix}"
        _sub(
            class_types,
            "ClassType",
            ID=group,
            Accessibility="Public",
            Abstract="false",
            Base="ServiceDesigner!Microsoft.SystemCenter.ServiceDesigner.ServiceComponentGroup",
            Hosted="false",
            Singleton="true",
            Extension="false",
        )
        _display(strings, group, f"{server} {label}")
        contains_group = f"{prefix}.ApplicationContains{suffix}"
        _relationship(relationship_types, contains_group, "System!System.Containment", application, group)
        _display(strings, contains_group, f"{server} dependencies contains {label}")
        application_rules.append((group, contains_group, None))
        contains_computer = f"{prefix}.{suffix}ContainsComputer"
        _relationship(
            relationship_types,
            contains_computer,
            "System!System.Containment",
            group,
            "System!System.Computer",
        )
        _display(strings, contains_computer, f"{server} {label} contains computer")
        rollup = f"{prefix}.Application.{suffix}.AvailabilityRollup"
        _dependency_monitor(monitors, rollup, application, contains_group)
        _display(strings, rollup, f"{label} availability roll-up")
        names = components.of(suffix)
        if names:
            discovery = f"{prefix}.{suffix}.Discovery"
            _group_populator(
                discoveries, discovery, group, [("System!System.Computer", contains_computer, names)]
            )
            _display(
                strings,
                discovery,
                f"{server} {label} membership",
                f"Computers named in the latest dependency map as {label.lower()} of {server}.",
            )
            member_rollup = f"{prefix}.{suffix}.ComputerAvailabilityRollup"
            _dependency_monitor(monitors, member_rollup, group, contains_computer)
            _display(strings, member_rollup, f"{label} computers availability roll-up")
    discovery = f"{prefix}.Application.Discovery"
    _group_populator(discoveries, discovery, application, application_rules)
    _display(
        strings,
        discovery,
        f"{server} dependencies membership",
        "Adds the Server, Clients and Dependencies component groups to the distributed application.",
    )
    for source_suffix, target_suffix, verb in _REFERENCES:
        if not components.of(source_suffix) or not components.of(target_suffix):
            continue
        relationship = f"{prefix}.{source_suffix}References{target_suffix}"
        source, target = f"{prefix}.{source_suffix}", f"{prefix}.{target_suffix}"
        _relationship(relationship_types, relationship, "System!System.Reference", source, target)
        _display(strings, relationship, f"{server}: {source_suffix[:-5]} {verb} {target_suffix[:-5]}")
        reference_discovery = f"{prefix}.{source_suffix}.ReferenceDiscovery"
        _group_populator(discoveries, reference_discovery, source, [(target, relationship, None)])
        _display(strings, reference_discovery, f"{server}: {source_suffix[:-5]} {verb} {target_suffix[:-5]}")
    diagram = f"{prefix}.DiagramView"
    state = f"{prefix}.StateView"
    _sub(
        views,
        "View",
        ID=diagram,
        Accessibility="Public",
        Enabled="true",
        Target=application,
        TypeID="SC!Microsoft.SystemCenter.DiagramViewType",
        Visible="true",
    )
    _sub(views[-1], "Category", "Operations")
    state_view = _sub(
        views,
        "View",
        ID=state,
        Accessibility="Public",
        Enabled="true",
        Target=application,
        TypeID="SC!Microsoft.SystemCenter.StateViewType",
        Visible="true",
    )
    _sub(state_view, "Category", "Operations")
    _sub(_sub(state_view, "Criteria"), "InMaintenanceMode", "false")
    _sub(folder_items, "FolderItem", ElementID=diagram, ID=f"{diagram}.Item", Folder=folder_id)
    _sub(folder_items, "FolderItem", ElementID=state, ID=f"{state}.Item", Folder=folder_id)
    _display(strings, diagram, f"{server} dependency diagram")
    _display(strings, state, f"{server} dependencies state")
