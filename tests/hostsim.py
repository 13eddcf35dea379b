"""Drive the functions registered in ``function_app.app`` the way the Functions host does.

Core Tools cannot run here, so tests and the demo call the registered user functions with real
``azure.functions`` request objects. Queue output bindings are sent to the real (Azurite) queue,
and queue triggers are fed from it with the host's semantics: dequeue count, a retry when the
function raises, and the poison queue after ``max_dequeue_count`` attempts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
from azure.functions.decorators.function_app import Function
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueServiceClient

from tests import canary

_indexed: dict[int, tuple[func.FunctionApp, list[Function]]] = {}
_index_lock = threading.Lock()


def indexed_functions(app: func.FunctionApp) -> list[Function]:
    """The app's functions, indexed once per process as the Functions host does.

    azure-functions remembers the names ``get_functions()`` has seen and refuses them the next
    time, so every ``FunctionHost`` of one process must share one indexing of the app.
    """
    with _index_lock:
        entry = _indexed.get(id(app))
        if entry is None or entry[0] is not app:
            app.functions_bindings = None  # indexed before without us: index it afresh
            entry = (app, app.get_functions())
            _indexed[id(app)] = entry
        return entry[1]


class OutValue(func.Out[Any]):
    """An output binding's value: one message (str) or several (list of str)."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, val: Any) -> None:
        self.value = val

    def get(self) -> Any:
        return self.value


@dataclass
class HttpCall:
    response: func.HttpResponse
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return int(self.response.status_code)

    def json(self) -> Any:
        return json.loads(self.response.get_body())


class FunctionHost:
    def __init__(
        self, app: func.FunctionApp, queues: QueueServiceClient | None = None, max_dequeue_count: int = 5
    ):
        self.functions = {str(f.get_function_name()): f for f in indexed_functions(app)}
        self.queues = queues
        self.max_dequeue_count = max_dequeue_count
        if queues is not None:  # the host creates the queues its bindings name
            for function in self.functions:
                for queue_name in self._queue_names(function):
                    client = queues.get_queue_client(queue_name)
                    if not _exists(client):
                        client.create_queue()

    def _queue_names(self, name: str) -> list[str]:
        names = list(self._queue_outputs(name).values())
        trigger = self.functions[name].get_trigger()
        if trigger is not None and trigger.get_dict_repr().get("type") == "queueTrigger":
            names.append(str(trigger.get_dict_repr()["queueName"]))
        return names

    def user_function(self, name: str) -> Callable[..., Any]:
        return self.functions[name].get_user_function()

    def _queue_outputs(self, name: str) -> dict[str, str]:
        """arg name -> queue name of the function's queue output bindings."""
        outputs = {}
        for binding in self.functions[name].get_bindings():
            data = binding.get_dict_repr()
            direction = data.get("direction")
            if data.get("type") == "queue" and getattr(direction, "name", direction) == "OUT":
                outputs[data["name"]] = data["queueName"]
        return outputs

    def http(
        self,
        name: str,
        method: str,
        url: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        route_params: dict[str, str] | None = None,
        send_outputs: bool = True,
    ) -> HttpCall:
        query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        request = func.HttpRequest(
            method, url, headers=headers or {}, params=query, route_params=route_params or {}, body=body
        )
        outs = {arg: OutValue() for arg in self._queue_outputs(name)}
        response = self.user_function(name)(request, **outs)
        canary.observe(response.get_body(), f"HTTP response of {name}")
        return HttpCall(response, self._produced(name, outs, send=send_outputs))

    def _produced(self, name: str, outs: dict[str, OutValue], *, send: bool) -> dict[str, Any]:
        """What the output bindings were set to; sent to their queues as the host would."""
        produced = {arg: out.value for arg, out in outs.items() if out.value is not None}
        for arg, value in produced.items():
            canary.observe(str(value), f"output {arg} of {name}")
        if send and self.queues is not None:
            queue_names = self._queue_outputs(name)
            for arg, value in produced.items():
                client = self.queues.get_queue_client(queue_names[arg])
                for message in value if isinstance(value, list) else [value]:
                    client.send_message(message)
        return produced

    def queue_name_of(self, name: str) -> str:
        trigger = self.functions[name].get_trigger()
        assert trigger is not None, f"{name} has no trigger"
        return str(trigger.get_dict_repr()["queueName"])

    def call_queue(self, name: str, body: str, dequeue_count: int = 1) -> None:
        self.user_function(name)(QueueMessage(id="local", body=body.encode(), dequeue_count=dequeue_count))

    def drain(
        self, name: str, *, max_rounds: int = 50, on_error: Callable[[Exception], None] | None = None
    ) -> int:
        """Feed the trigger's queue to the function until it is empty (bounded). Returns calls made."""
        assert self.queues is not None
        queue = self.queues.get_queue_client(self.queue_name_of(name))
        poison = self.queues.get_queue_client(self.queue_name_of(name) + "-poison")
        calls = 0
        for _ in range(max_rounds):
            messages = list(
                queue.receive_messages(messages_per_page=32, visibility_timeout=1, max_messages=32)
            )
            if not messages:
                return calls
            for message in messages:
                calls += 1
                try:
                    self.user_function(name)(
                        QueueMessage(
                            id=message.id, body=message.content.encode(), dequeue_count=message.dequeue_count
                        )
                    )
                except Exception as exc:  # the host logs, leaves the message, and retries it later
                    if on_error:
                        on_error(exc)
                    if (message.dequeue_count or 1) >= self.max_dequeue_count:
                        poison.create_queue() if not _exists(poison) else None
                        poison.send_message(message.content)
                        queue.delete_message(message)
                    else:
                        queue.update_message(message, visibility_timeout=0)
                    continue
                queue.delete_message(message)
        return calls

    def timer(self, name: str, *, past_due: bool = False) -> dict[str, Any]:
        """Fire a timer trigger; returns (and queues) what its output bindings were set to."""
        outs = {arg: OutValue() for arg in self._queue_outputs(name)}
        self.user_function(name)(TimerRequest(past_due=past_due), **outs)
        return self._produced(name, outs, send=True)


def _exists(queue: Any) -> bool:
    try:
        queue.get_queue_properties()
    except Exception:
        return False
    return True
