"""Opspawn tools in Python.

`@tool` registers a function as a tool: its name is the tool's name, its
docstring the description, and its input schema is derived from the type
hints of its parameters (str, int, float, bool, list[...], dict; a parameter
with a default is optional), unless `schema=` gives one. A parameter named
`context` receives the call context (task id, step, idempotency key) and is
not part of the input.

Raise `ToolError(code, message)` to answer an error with a code; any other
exception answers `tool_failed`, and input that does not fit the function
answers `invalid_input`.

Importing `Tools` into the app module is what exports the tools:
`from opspawn_tool import Tools, tool`. Built with componentize-py 0.25.1
(`componentize-py -d wit -w tool componentize app -o NAME.wasm`); see
docs/plugins/python.md.
"""

import inspect
import json
import typing

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import tools as wit_tools
from wit_world.imports.types import ToolSpec

_REGISTRY = {}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}


class ToolError(Exception):
    """A tool's error: a short machine-readable code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def tool(function=None, *, name=None, description=None, schema=None):
    """Registers `function` as a tool (usable bare or with arguments)."""

    def register(function):
        tool_name = name or function.__name__
        # The signature is read once here: reading it per call cost more
        # than the rest of a call on a warm instance.
        signature = inspect.signature(function)
        _REGISTRY[tool_name] = (
            function,
            description or inspect.getdoc(function) or tool_name,
            schema or schema_of(function),
            signature,
            "context" in signature.parameters,
        )
        return function

    return register(function) if function else register


def schema_of(function) -> dict:
    """The JSON Schema of a function's parameters, from their type hints."""
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name == "context":
            continue
        properties[parameter.name] = _type_schema(hints.get(parameter.name, str))
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _type_schema(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Union and type(None) in args:
        others = [a for a in args if a is not type(None)]
        return _type_schema(others[0]) if len(others) == 1 else {}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise TypeError(f"no JSON Schema for {hint!r}: pass schema= to @tool")


def _error(code: str, message: str) -> Err:
    return Err(wit_tools.ToolError(code=code, message=message))


class Tools(exports.Tools):
    """The `tool` world's export, serving every function registered with @tool."""

    def describe(self):
        return [
            ToolSpec(name=name, description=text, input_schema=json.dumps(schema))
            for name, (_, text, schema, _, _) in _REGISTRY.items()
        ]

    def invoke(self, context, name, input):
        if name not in _REGISTRY:
            raise _error("unknown_tool", f"this component has no tool named {name!r}")
        function, _, _, signature, takes_context = _REGISTRY[name]
        try:
            arguments = json.loads(input)
            if takes_context:
                arguments["context"] = context
            bound = signature.bind(**arguments)
        except (ValueError, TypeError) as error:
            raise _error("invalid_input", f"the input does not fit {name}: {error}")
        try:
            return json.dumps(function(*bound.args, **bound.kwargs))
        except ToolError as error:
            raise _error(error.code, error.message)
        except Exception as error:
            raise _error("tool_failed", f"{type(error).__name__}: {error}")
