"""``docs/openapi.yaml`` describes exactly the HTTP routes the app registers, as registered."""

from __future__ import annotations

import re

import function_app
from tests.hostsim import indexed_functions
from tests.openapi import load_spec, operations, resolve


def registered_routes() -> dict[tuple[str, str], tuple[str, str]]:
    """(path, method) -> (function name, auth level) of every HTTP trigger."""
    routes = {}
    for function in indexed_functions(function_app.app):
        trigger = function.get_trigger()
        data = trigger.get_dict_repr() if trigger is not None else {}
        if data.get("type") != "httpTrigger":
            continue
        level = getattr(data["authLevel"], "value", data["authLevel"])
        for method in data["methods"]:
            name = getattr(method, "value", method)
            routes[("/" + data["route"], name.lower())] = (str(function.get_function_name()), str(level))
    return routes


def described_routes() -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (path, method): (operation["operationId"], operation["x-auth-level"])
        for path, method, operation in operations(load_spec())
    }


def test_every_registered_route_is_described_and_nothing_else() -> None:
    registered = registered_routes()
    described = described_routes()

    assert set(registered) == set(described), {
        "not described": sorted(set(registered) - set(described)),
        "described but not registered": sorted(set(described) - set(registered)),
    }


def test_operation_ids_and_auth_levels_match_the_functions() -> None:
    assert described_routes() == registered_routes()


def test_anonymous_routes_declare_no_security_and_the_others_a_key() -> None:
    spec = load_spec()
    for path, method, operation in operations(spec):
        schemes = {name for requirement in operation["security"] for name in requirement}
        if operation["x-auth-level"] == "anonymous":
            assert schemes == set(), (path, method)
        elif operation["x-auth-level"] == "admin":
            assert schemes == {"adminKeyQuery", "adminKeyHeader"}, (path, method)
        else:
            assert {"functionKeyQuery", "functionKeyHeader"} <= schemes, (path, method)
        assert schemes <= set(spec["components"]["securitySchemes"]), (path, method)


def test_path_parameters_are_declared_and_every_reference_resolves() -> None:
    spec = load_spec()
    for path, method, operation in operations(spec):
        declared = {
            resolve(spec, p)["name"]
            for p in operation.get("parameters", [])
            if resolve(spec, p)["in"] == "path"
        }
        assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
        assert operation["responses"], (path, method)
        for response in operation["responses"].values():
            body = resolve(spec, response)
            for media in body.get("content", {}).values():
                assert isinstance(resolve(spec, media["schema"]), dict)


def test_only_the_webhook_takes_the_function_key_and_every_management_route_the_admin_key() -> None:
    """Action groups hold the function key: it must open nothing but the alert webhook (and the
    anonymous health probe); reading deliveries or starting a sync needs the admin key."""
    levels = dict(registered_routes().values())

    assert levels.pop("receive_alert") == "function"
    assert levels.pop("health") == "anonymous"
    assert levels
    assert set(levels.values()) == {"admin"}, levels
