"""The deployment template: its structure, and the ARM JSON kept beside the Bicep.

No Bicep CLI can be installed from a package registry here (it ships as a NuGet or GitHub
binary), so ``bicep build`` cannot run in the suite. ``infra/main.json`` is the template as ARM
JSON; these tests read both and check that they declare the same parameters, modules, resources
(type and API version), outputs and key properties, and then assert what the deployment must be:
shared keys off, Key Vault in RBAC mode, local auth off, Flex Consumption with Python, identity-based
storage, the least roles by their built-in ids, the Log Analytics tables of docs/log-analytics.md,
and no secret in any output.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared_code.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN_JSON: dict[str, Any] = json.loads((INFRA / "main.json").read_text())

ROLE_IDS = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}


# -- reading Bicep (the subset these files use) -----------------------------------------------


def bicep(path: Path) -> str:
    return path.read_text()


def bicep_params(text: str) -> dict[str, tuple[str, str | None]]:
    """name -> (type, default literal or None)."""
    return {
        m["name"]: (m["type"], m["default"])
        for m in re.finditer(r"^param (?P<name>\w+) (?P<type>\w+)(?: = (?P<default>.+))?$", text, re.M)
    }


def bicep_resources(text: str) -> Counter[str]:
    """type@apiVersion of every resource declared (not ``existing`` references)."""
    return Counter(
        f"{m['type']}@{m['api']}"
        for m in re.finditer(
            r"^resource \w+ '(?P<type>[^@']+)@(?P<api>[^']+)'(?P<existing> existing)? =", text, re.M
        )
        if not m["existing"]
    )


def bicep_outputs(text: str) -> set[str]:
    return set(re.findall(r"^output (\w+) \w+ =", text, re.M))


def bicep_modules(text: str) -> dict[str, Path]:
    """deployment name -> module file."""
    modules = {}
    for m in re.finditer(r"^module \w+ '(?P<path>[^']+)'[^{]*\{\n\s+name: '(?P<name>[\w-]+)'", text, re.M):
        modules[m["name"]] = INFRA / m["path"]
    return modules


MAIN_BICEP = bicep(INFRA / "main.bicep")
MODULES = bicep_modules(MAIN_BICEP)


# -- reading ARM JSON ---------------------------------------------------------------------------


def deployments() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in MAIN_JSON["resources"] if r["type"] == "Microsoft.Resources/deployments"}


def module_template(name: str) -> dict[str, Any]:
    template: dict[str, Any] = deployments()[name]["properties"]["template"]
    return template


def arm_resources(template: dict[str, Any]) -> Counter[str]:
    return Counter(
        f"{r['type']}@{r['apiVersion']}"
        for r in template["resources"]
        if r["type"] != "Microsoft.Resources/deployments"
    )


def resources_of_type(kind: str) -> list[dict[str, Any]]:
    found = [r for name in deployments() for r in module_template(name)["resources"] if r["type"] == kind]
    found += [r for r in MAIN_JSON["resources"] if r["type"] == kind]
    return found


def only(kind: str) -> dict[str, Any]:
    (resource,) = resources_of_type(kind)
    return resource


BICEP_TYPES = {"string": "string", "int": "int", "bool": "bool", "object": "object", "array": "array"}


def literal(default: str | None) -> Any:
    if default is None:
        return None
    if default.startswith("'") and default.endswith("'"):
        return default[1:-1]
    return json.loads(default)


# -- Bicep and ARM JSON agree -------------------------------------------------------------------


def test_main_parameters_match() -> None:
    params = bicep_params(MAIN_BICEP)
    arm = MAIN_JSON["parameters"]
    assert set(params) == set(arm)
    for name, (kind, default) in params.items():
        assert arm[name]["type"] == BICEP_TYPES[kind], name
        assert arm[name].get("defaultValue") == literal(default), name


def test_main_outputs_match() -> None:
    assert bicep_outputs(MAIN_BICEP) == set(MAIN_JSON["outputs"])


def test_every_module_is_a_nested_deployment_and_nothing_else() -> None:
    assert set(MODULES) == set(deployments())
    assert set(MODULES) == {
        "identity",
        "storage",
        "keyvault",
        "monitoring",
        "rbac",
        "function",
        "actiongroup",
    }


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_matches_its_nested_template(name: str) -> None:
    text = bicep(MODULES[name])
    template = module_template(name)

    params = bicep_params(text)
    assert set(params) == set(template["parameters"]), name
    for param, (kind, default) in params.items():
        assert template["parameters"][param]["type"] == BICEP_TYPES[kind], (name, param)
        if default is not None and not default.startswith(("{", "[")) and "(" not in default:
            assert template["parameters"][param].get("defaultValue") == literal(default), (name, param)
    assert bicep_resources(text), name  # the regex read something: an empty match proves nothing
    assert bicep_resources(text) == arm_resources(template), name
    assert bicep_outputs(text) == set(template["outputs"]), name
    # every parameter the module declares is passed by main (or has a default)
    passed = set(deployments()[name]["properties"]["parameters"])
    assert {p for p, (_, default) in params.items() if default is None} <= passed, name
    assert passed <= set(params), name


def test_main_parameters_file_names_declared_parameters_only() -> None:
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert set(parameters) <= set(MAIN_JSON["parameters"])
    required = {n for n, p in MAIN_JSON["parameters"].items() if "defaultValue" not in p}
    assert required <= set(parameters)


# -- what the deployment must be ------------------------------------------------------------------


def test_storage_has_shared_keys_off_and_no_public_blobs() -> None:
    props = only("Microsoft.Storage/storageAccounts")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert "allowSharedKeyAccess: false" in bicep(INFRA / "app/storage.bicep")
    assert (
        only("Microsoft.Storage/storageAccounts/blobServices/containers")["properties"]["publicAccess"]
        == "None"
    )


def test_key_vault_is_in_rbac_mode_with_purge_protection() -> None:
    props = only("Microsoft.KeyVault/vaults")["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enablePurgeProtection"] is True
    assert "accessPolicies" not in props
    assert "enableRbacAuthorization: true" in bicep(INFRA / "app/keyvault.bicep")


def test_log_analytics_and_application_insights_have_local_auth_off() -> None:
    assert (
        only("Microsoft.OperationalInsights/workspaces")["properties"]["features"]["disableLocalAuth"] is True
    )
    assert only("Microsoft.Insights/components")["properties"]["DisableLocalAuth"] is True
    text = bicep(INFRA / "app/monitoring.bicep")
    assert "disableLocalAuth: true" in text
    assert "DisableLocalAuth: true" in text


def test_the_function_app_is_flex_consumption_on_linux_with_python() -> None:
    plan = only("Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True
    site = only("Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    assert site["properties"]["httpsOnly"] is True
    config = site["properties"]["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "[parameters('pythonVersion')]"}
    assert config["deployment"]["storage"]["type"] == "blobContainer"
    assert config["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"
    assert MAIN_JSON["parameters"]["pythonVersion"]["defaultValue"] == "3.11"
    assert "runtime: { name: 'python', version: pythonVersion }" in bicep(INFRA / "app/function.bicep")
    assert "name: 'FC1', tier: 'FlexConsumption'" in bicep(INFRA / "app/function.bicep")


def app_settings() -> dict[str, str]:
    settings: dict[str, str] = only("Microsoft.Web/sites/config")["properties"]
    return settings


def test_storage_is_identity_based_for_the_host_and_the_state_tables() -> None:
    settings = app_settings()
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "[parameters('identityClientId')]"
    assert settings["AzureWebJobsStorage__accountName"] == "[parameters('storageAccountName')]"
    assert settings["AZURE_CLIENT_ID"] == "[parameters('identityClientId')]"
    assert "AzureWebJobsStorage" not in settings  # no connection string: there is no key to put in one
    assert settings["STATE_TABLE_ENDPOINT"] == "[parameters('tableEndpoint')]"
    assert "AccountKey" not in json.dumps(MAIN_JSON)


def test_app_settings_are_the_ones_the_app_reads() -> None:
    aliases = {field.alias for field in Settings.model_fields.values()}
    host_settings = (
        "AzureWebJobsStorage__",
        "APPLICATIONINSIGHTS_",
        "AzureFunctionsJobHost__",
        "AZURE_CLIENT_ID",
    )
    unknown = {name for name in app_settings() if name not in aliases and not name.startswith(host_settings)}
    assert not unknown
    bicep_text = bicep(INFRA / "app/function.bicep")
    for name in app_settings():
        assert re.search(rf"^\s+{name}: ", bicep_text, re.M), name


def test_queue_dequeue_count_is_in_step_with_alert_attempts() -> None:
    settings = app_settings()
    assert (
        settings["ALERT_MAX_ATTEMPTS"]
        == settings["AzureFunctionsJobHost__extensions__queues__maxDequeueCount"]
    )
    host = json.loads((ROOT / "host.json").read_text())
    default = Settings.model_fields["alert_max_attempts"].default
    assert host["extensions"]["queues"]["maxDequeueCount"] == default
    assert MAIN_JSON["parameters"]["alertMaxAttempts"]["defaultValue"] == default


def role_assignments() -> list[tuple[str, str, str]]:
    """(scope resource type, role id, principal parameter) of each assignment."""
    template = module_template("rbac")
    roles = template["variables"]
    found = []
    for assignment in template["resources"]:
        assert assignment["type"] == "Microsoft.Authorization/roleAssignments"
        scope_type = re.match(r"\[format\('([^/]+/[^/]+)/", assignment["scope"])
        role = re.search(r"variables\('(\w+)'\)\)\]$", assignment["properties"]["roleDefinitionId"])
        principal = re.match(r"\[parameters\('(\w+)'\)\]", assignment["properties"]["principalId"])
        assert scope_type, assignment
        assert role, assignment
        assert principal, assignment
        found.append((scope_type[1], roles[role[1]], principal[1]))
    return found


def test_the_identity_has_the_least_roles_each_on_its_resource() -> None:
    app_roles = {
        (scope, role) for scope, role, principal in role_assignments() if principal == "identityPrincipalId"
    }
    assert app_roles == {
        ("Microsoft.Storage/storageAccounts", ROLE_IDS["Storage Blob Data Owner"]),
        ("Microsoft.Storage/storageAccounts", ROLE_IDS["Storage Queue Data Contributor"]),
        ("Microsoft.Storage/storageAccounts", ROLE_IDS["Storage Table Data Contributor"]),
        ("Microsoft.KeyVault/vaults", ROLE_IDS["Key Vault Secrets Officer"]),
        ("Microsoft.Insights/dataCollectionRules", ROLE_IDS["Monitoring Metrics Publisher"]),
        ("Microsoft.Insights/components", ROLE_IDS["Monitoring Metrics Publisher"]),
    }
    user_roles = {
        (scope, role) for scope, role, principal in role_assignments() if principal == "userPrincipalId"
    }
    assert ROLE_IDS["Storage Blob Data Owner"] not in {role for _, role in user_roles}
    assert len(user_roles) == 4


def test_role_ids_are_the_same_in_the_bicep() -> None:
    text = bicep(INFRA / "app/rbac.bicep")
    declared = dict(re.findall(r"^var (\w+) = '([0-9a-f-]{36})'", text, re.M))
    assert declared == module_template("rbac")["variables"]
    assert set(declared.values()) == set(ROLE_IDS.values())


def documented_columns() -> dict[str, list[dict[str, str]]]:
    doc = (ROOT / "docs" / "log-analytics.md").read_text()
    tables = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S) if '"schema"' in b]
    return {t["properties"]["schema"]["name"]: t["properties"]["schema"]["columns"] for t in tables}


def test_log_tables_and_the_collection_rule_are_those_of_the_docs() -> None:
    documented = documented_columns()
    variables = module_template("monitoring")["variables"]
    tables = {
        r["properties"]["schema"]["name"]: variables[
            r["properties"]["schema"]["columns"][len("[variables('") : -len("')]")]
        ]
        for r in resources_of_type("Microsoft.OperationalInsights/workspaces/tables")
    }
    assert tables == documented
    rule = only("Microsoft.Insights/dataCollectionRules")["properties"]
    streams = {
        name: variables[decl["columns"][len("[variables('") : -len("')]")]]
        for name, decl in rule["streamDeclarations"].items()
    }
    assert streams == {f"Custom-{name}": columns for name, columns in documented.items()}
    assert [flow["outputStream"] for flow in rule["dataFlows"]] == [
        "Custom-ServiceDesk_CL",
        "Custom-ServiceDeskLog_CL",
    ]
    text = bicep(INFRA / "app/monitoring.bicep")
    for columns in documented.values():
        for column in columns:
            assert f"{{ name: '{column['name']}', type: '{column['type']}' }}" in text


SECRET_HINTS = re.compile(r"listkeys|listsecrets|connectionstring|password|secret|accountkey|\bkey\b", re.I)


def test_no_output_holds_a_secret() -> None:
    for name, output in MAIN_JSON["outputs"].items():
        assert output["type"] == "string"
        assert not SECRET_HINTS.search(output["value"]), name
    for line in re.findall(r"^output .*$", MAIN_BICEP, re.M):
        assert not SECRET_HINTS.search(line.replace("FUNCTION_KEY_COMMAND", "")), line
    # a command that fetches the key is fine; the key itself is never an output
    assert "functionapp keys list" in MAIN_JSON["outputs"]["FUNCTION_KEY_COMMAND"]["value"]
    for name in ("function", "monitoring"):
        outputs = module_template(name)["outputs"]
        assert not any("listKeys" in str(o["value"]) for o in outputs.values())


def test_outputs_give_the_webhook_url_without_a_key_and_the_first_connection_command() -> None:
    outputs = MAIN_JSON["outputs"]
    assert "/api/alerts/<connection>" in outputs["WEBHOOK_URL"]["value"]
    assert "code=" not in outputs["WEBHOOK_URL"]["value"]
    command = outputs["ADD_CONNECTION_COMMAND"]["value"]
    assert "python -m shared_code connections add" in command
    assert "KEY_VAULT_URL=" in command
    assert "STATE_TABLE_ENDPOINT=" in command


def test_the_action_group_is_optional_and_uses_the_common_schema() -> None:
    deployment = deployments()["actiongroup"]
    assert "parameters('deployActionGroup')" in deployment["condition"]
    (receiver,) = only("Microsoft.Insights/actionGroups")["properties"]["webhookReceivers"]
    assert receiver["useCommonAlertSchema"] is True
    assert receiver["useAadAuth"] == "[variables('secure')]"
    assert MAIN_JSON["parameters"]["deployActionGroup"]["defaultValue"] is False


def test_azure_yaml_publishes_this_folder_as_a_python_function_app() -> None:
    config = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert config["services"]["api"] == {"project": ".", "language": "python", "host": "function"}


# -- the Bicep parses (a syntax check without the Bicep CLI) --------------------------------------


BICEP_FILES = sorted(INFRA.rglob("*.bicep"))


@pytest.fixture(scope="module")
def parsed() -> dict[Path, dict[str, Any]]:
    """Every Bicep file parsed by pycep-parser (a Python Bicep grammar; it refuses bad syntax)."""
    from pycep import BicepParser

    parser = BicepParser()
    return {path: dict(parser.parse(text=path.read_text())) for path in BICEP_FILES}


def test_every_bicep_file_parses_and_reads_as_the_tests_read_it(parsed: dict[Path, dict[str, Any]]) -> None:
    assert len(BICEP_FILES) == 8
    for path, tree in parsed.items():
        text = bicep(path)
        assert set(tree.get("parameters", {})) == set(bicep_params(text)), path
        declared = Counter(
            f"{r['type']}@{r['api_version']}" for r in tree.get("resources", {}).values() if not r["existing"]
        )
        assert declared == bicep_resources(text), path
        assert set(tree.get("outputs", {})) == bicep_outputs(text), path


def test_the_parsed_bicep_has_the_key_properties(parsed: dict[Path, dict[str, Any]]) -> None:
    def resource(file: str, kind: str) -> dict[str, Any]:
        (found,) = [
            r for r in parsed[INFRA / file]["resources"].values() if r["type"] == kind and not r["existing"]
        ]
        config: dict[str, Any] = found["config"]
        return config

    assert (
        resource("app/storage.bicep", "Microsoft.Storage/storageAccounts")["properties"][
            "allowSharedKeyAccess"
        ]
        is False
    )
    assert (
        resource("app/keyvault.bicep", "Microsoft.KeyVault/vaults")["properties"]["enableRbacAuthorization"]
        is True
    )
    workspace = resource("app/monitoring.bicep", "Microsoft.OperationalInsights/workspaces")
    assert workspace["properties"]["features"]["disableLocalAuth"] is True
    assert (
        resource("app/monitoring.bicep", "Microsoft.Insights/components")["properties"]["DisableLocalAuth"]
        is True
    )
    assert resource("app/function.bicep", "Microsoft.Web/serverfarms")["sku"] == {
        "name": "FC1",
        "tier": "FlexConsumption",
    }
    runtime = resource("app/function.bicep", "Microsoft.Web/sites")["properties"]["functionAppConfig"][
        "runtime"
    ]
    assert runtime["name"] == "python"


# -- host.json and .funcignore --------------------------------------------------------------------


def test_host_json_leaves_room_for_the_sync_budget_and_the_alert_lease() -> None:
    from datetime import timedelta

    from functions.sync import TIMER_BUDGET

    host = json.loads((ROOT / "host.json").read_text())
    hours, minutes, seconds = (int(part) for part in host["functionTimeout"].split(":"))
    timeout = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    assert timeout >= TIMER_BUDGET + timedelta(minutes=1)
    queues = host["extensions"]["queues"]
    assert queues["newBatchThreshold"] <= queues["batchSize"]
    # at most batchSize + newBatchThreshold deliveries run at once per instance: the table pool holds them
    from shared_code.state.tables import POOL_SIZE

    assert queues["batchSize"] + queues["newBatchThreshold"] <= POOL_SIZE
    assert "Request" in host["logging"]["applicationInsights"]["samplingSettings"]["excludedTypes"]


def funcignore_patterns() -> list[str]:
    lines = (ROOT / ".funcignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def published(relative: str) -> bool:
    """Whether a publish uploads ``relative`` (a pattern without a slash matches any path part)."""
    from fnmatch import fnmatch

    parts = relative.split("/")
    return not any(fnmatch(part, pattern) for pattern in funcignore_patterns() for part in parts)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/x.py",
        "node_modules/.bin/azurite",
        "tests/unit/test_infra.py",
        "tests/fixtures/bad_payloads/huge_over_limit.json",
        "shared_code/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        ".hypothesis/examples/x",
        "docs/deployment.md",
        "docs/images/flow.png",
        "infra/main.json",
        "local.settings.json",
        "requirements-dev.txt",
        "__azurite_db_table__.json",
    ],
)
def test_a_publish_leaves_out_what_the_app_does_not_run(path: str) -> None:
    assert not published(path)


def test_a_publish_takes_the_app() -> None:
    app_files = [
        path.relative_to(ROOT).as_posix()
        for folder in ("functions", "shared_code")
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    assert app_files
    for path in ["function_app.py", "host.json", "requirements.txt", *app_files]:
        assert published(path), path
