"""The config schema as the single home of every default, for the workflow and the CLI.

`workflow/schemas/config.schema.yaml` defines each setting once. Snakemake validates the config
against it (filling defaults); the `dsf <stage>` command line builds its options from the same
schema section, so a stage run by hand uses the same defaults as the workflow.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dsf.errors import ConfigError

_REPO_SCHEMAS = Path(__file__).resolve().parent.parent / "workflow" / "schemas"


def schema_path(name: str = "config") -> Path:
    """Path of a schema file (`config` or `slides`); `DSF_SCHEMA_DIR` overrides the folder."""
    folder = Path(os.environ.get("DSF_SCHEMA_DIR", _REPO_SCHEMAS))
    path = folder / f"{name}.schema.yaml"
    if not path.is_file():
        raise ConfigError(
            f"schema {path} not found: install dsf from its repository (pip install -e .) "
            "or set DSF_SCHEMA_DIR to the folder holding workflow/schemas"
        )
    return path


@cache
def load_schema(name: str = "config") -> dict[str, Any]:
    """The parsed schema (cached; treat as read-only)."""
    with open(schema_path(name)) as fh:
        return yaml.safe_load(fh)


def _fill(schema: dict[str, Any], value: Any) -> Any:
    """Fill defaults of `schema` into `value` (objects recursively)."""
    if value is None and "default" in schema:
        value = copy.deepcopy(schema["default"])
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _fill(sub, value[key])
    return value


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def _typed(value: Any, types: set[str]) -> bool:
    """Whether YAML-parsed `value` is one of the JSON-schema `types`."""
    checks = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return any(checks[t](value) for t in types if t in checks)


def coerce_strings(schema: dict[str, Any], value: Any) -> Any:
    """`value` with text where the schema wants a number, boolean or null parsed as YAML.

    Snakemake's `--config key={a: 0.5}` reads nested values as text (YAML's base loader), so
    `--config 'infer={overlap: 0.5}'` would fail validation with "'0.5' is not of type
    'number'". Text where the schema allows text is left alone; text that does not parse to an
    allowed type is left for validation to name.
    """
    types = _types(schema)
    if (
        isinstance(value, str)
        and "string" not in types
        and types & {"integer", "number", "boolean", "null"}
    ):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, str) and "number" in types:  # YAML 1.1 reads `1e-3` as text
            try:
                number = float(parsed)
            except ValueError:
                return value
            return number if math.isfinite(number) else value
        return parsed if _typed(parsed, types) else value
    if isinstance(value, dict):
        # YAML reads `3:` as a number: a mapping's keys are text (labels.names {3: 1}: the
        # annotation class "3"); `no:`/`yes:`/`on:` read as booleans cannot be told back
        for key in list(value):
            if isinstance(key, bool):
                raise ConfigError(
                    f"config: the key {key} of a mapping is read by YAML as a boolean (it was "
                    "written yes, no, on, off, true or false): quote it, e.g. 'no'"
                )
            if not isinstance(key, str):
                value[str(key)] = value.pop(key)
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema is not None:
                value[key] = coerce_strings(sub_schema, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value[:] = [coerce_strings(schema["items"], item) for item in value]
    return value


def section_schema(section: str) -> dict[str, Any]:
    """The schema of one top-level section (`tissue`, `patches`, ...)."""
    props = load_schema()["properties"]
    if section not in props:
        raise ConfigError(f"unknown config section {section!r}")
    return props[section]


def defaults(section: str | None = None) -> dict[str, Any]:
    """All defaults of the config, or of one section."""
    if section is None:
        return _fill(load_schema(), {})
    return _fill(section_schema(section), {})


def validate(config: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """Validate a config (or one section), fill defaults, and return the filled copy.

    Errors name the offending key path, e.g. `patches.stride`.
    """
    schema = load_schema() if section is None else section_schema(section)
    filled = _fill(schema, copy.deepcopy(config))
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(filled), key=lambda e: list(e.path)
    )
    if errors:
        err = errors[0]
        path = ([section] if section else []) + [str(p) for p in err.path]
        raise ConfigError(_schema_message(err, path))
    check_finite(filled, section or "")
    return filled


def schema_problem(err: jsonschema.ValidationError) -> str:
    """What a schema error says of its value: a pattern's form in words (the schema's
    `x-form`), not its regular expression; other messages cut at 300 characters, followed by
    the form wanted where the schema says it."""
    form = err.schema.get("x-form") if isinstance(err.schema, dict) else None
    if err.validator == "pattern" and form:
        return f"{err.instance!r} is not of the form wanted: {form}"
    said = err.message if len(err.message) <= 300 else err.message[:300] + " ..."
    return f"{said} (wanted: {form})" if form else said


def given(args: argparse.Namespace, section: str, key: str) -> bool:
    """Whether a setting's option (`add_section_arguments`) was given on the command line,
    not left to the schema's default."""
    return f"{section}__{key}" in vars(args)


def _schema_message(err: jsonschema.ValidationError, path: list[str]) -> str:
    """One line for a schema error: the key, what is wrong, and for a misspelt key the
    nearest known one (Snakemake's own message quotes the whole schema and config)."""
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        lines = []
        for key in sorted(set(err.instance) - set(known)):
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean `{near[0]}`?" if near else f"known keys: {', '.join(known)}"
            name, colon, _ = str(key).partition(":")
            if colon and name in known:  # `--config 'pretrain={epochs:2}'`: YAML needs ': '
                hint = f"a space is missing after the colon: `{name}: ...`"
            lines.append(f"config key {'.'.join([*path, key])} is not a setting dsf knows ({hint})")
        if lines:
            return "; ".join(lines)
    message = schema_problem(err)
    message = f"config key {'.'.join(path) or '<root>'}: {message}"
    wanted = err.validator_value if err.validator == "type" else None
    if isinstance(err.instance, str) and wanted in ("object", "array") and path:
        # `--config 'pretrain={epochs: 2'`: YAML read an unclosed brace or bracket as text
        first = next(iter(err.schema.get("properties", {})), "key")
        example = f"{{{first}: ...}}" if wanted == "object" else "[..., ...]"
        for key in reversed(path[1:]):
            example = f"{{{key}: {example}}}"
        message += (
            f"; a {'section' if wanted == 'object' else 'list'} was read as text: check that its "
            "braces and brackets are closed and that a space follows each colon, "
            f"e.g. --config '{path[0]}={example}'"
        )
    return message


def check_finite(value: Any, where: str = "") -> None:
    """A ConfigError naming the first NaN or infinite number in a config (JSON schema's
    minimum and maximum let NaN through: every comparison with it is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {where or '<root>'} is {value}: give a finite number")
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, sub in items:
        check_finite(sub, f"{where}.{key}" if where else str(key))


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file and validate it (defaults filled)."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return validate(data)


def _value_type(schema: dict[str, Any]) -> Any:
    """The Python type an option converts a schema value's text to (int, float, else str), of
    its non-null type where the schema allows null too."""
    kind = schema.get("type")
    kind = next(k for k in kind if k != "null") if isinstance(kind, list) else kind
    return {"integer": int, "number": float}.get(kind, str)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


#: parser default naming a section's skipped keys (not an option: no flag sets it)
_SKIPPED = "_workflow_only__"


def add_section_arguments(
    parser: argparse.ArgumentParser, section: str, skip: tuple[str, ...] = ()
) -> None:
    """Add one option per setting of a schema section, with the schema's default and text;
    not for the `skip` keys, which only the workflow reads (an option that did nothing would
    mislead: `dsf infer --probabilities` without `--out-probs`)."""
    group = parser.add_argument_group(f"{section} settings (config key {section}.*)")
    parser.set_defaults(**{f"{_SKIPPED}{section}": tuple(skip)})
    for key, sub in section_schema(section).get("properties", {}).items():
        if key in skip:
            continue
        kind = sub.get("type")
        if isinstance(kind, list):  # e.g. [string, "null"]: the option takes the non-null type
            kind = next(k for k in kind if k != "null")
        kwargs: dict[str, Any] = {
            "dest": f"{section}__{key}",
            "metavar": key.upper(),
            "default": argparse.SUPPRESS,
            "help": f"{sub.get('description', '').strip()} (default: {sub.get('default')!r})",
        }
        if kind == "boolean":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "array":
            kwargs.update(type=_value_type(sub.get("items", {})), nargs="+")
        elif kind == "object":
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs["type"] = _value_type(sub)
            if "enum" in sub:
                kwargs["choices"] = sub["enum"]
        if sub.get("description", "").startswith("Older name of"):
            kwargs["help"] = argparse.SUPPRESS  # still read, never offered
        group.add_argument(_flag(key), **kwargs)


def add_setting_argument(
    parser: argparse.ArgumentParser, flag: str, key: str, help: str, **kwargs: Any
) -> None:
    """An option that sets one schema setting (`section.key`) outside its section's options
    (`dsf labels --rgb-max` is tissue.rgb_max): its default, type and bounds from the schema,
    so a value the config would refuse is refused here too, naming the key."""
    section, name = key.split(".")
    sub = section_schema(section)["properties"][name]
    default = defaults(section)[name]
    item = sub.get("items", {}) if sub.get("type") == "array" else sub
    convert_type = _value_type(item)
    checker = jsonschema.Draft202012Validator(item)

    def convert(text: str) -> Any:
        value = convert_type(text)
        problem = next((e.message for e in checker.iter_errors(value)), None)
        if problem is None and isinstance(value, float) and not math.isfinite(value):
            problem = "not a finite number"
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text!r} (config key {key}: {problem})")
        return value

    if sub.get("type") == "array":
        fixed = sub.get("minItems") is not None and sub.get("minItems") == sub.get("maxItems")
        kwargs.setdefault("nargs", sub["minItems"] if fixed else "+")
    parser.add_argument(
        flag, type=convert, default=default, help=f"{help} ({key}, default {default})", **kwargs
    )


def section_from_args(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The validated settings of a section from parsed options (defaults from the schema),
    without the keys only the workflow reads (`add_section_arguments`' skip): the command
    never sees them, so recording their defaults with its outputs would misstate the run."""
    prefix = f"{section}__"
    given = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
    skipped = getattr(args, f"{_SKIPPED}{section}", ())
    try:
        filled = validate(given, section)
    except ConfigError as exc:  # by hand the setting was an option: name it as typed
        key = re.match(rf"config key {section}\.(\w+)", str(exc))
        if key is None:
            raise
        raise ConfigError(f"{exc} (option {_flag(key[1])})") from exc
    return {k: v for k, v in filled.items() if k not in skipped}


def _number_form(value: Any, schema: dict[str, Any], like: Any) -> Any:
    """One written form of a number for a command line: `2` and `2.0` are one value, but
    Snakemake compares the command's text with the last run's, and the other spelling reran
    a whole project. Integer settings are written as integers; number settings as the schema
    default `like` writes them (`500` for polygons.min_um2, `2.0` for patches.target_mpp), so
    the defaults' and presets' commands read as before."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    kinds = _types(schema)
    whole = float(value).is_integer()
    if "integer" in kinds and whole:
        return int(value)
    if "number" in kinds:
        as_int = isinstance(like, int) and not isinstance(like, bool)
        return int(value) if as_int and whole else float(value)
    return value


def setting_value(section: str, key: str, value: Any) -> Any:
    """One setting's value in the form a command line writes it (`_number_form`: `2` and `2.0`
    as the schema default writes them), for a rule that passes a single setting as a param
    (Snakemake compares it, type and all, with the last run's)."""
    sub = section_schema(section)["properties"][key]
    return _number_form(value, sub, sub.get("default"))


def cli_args(section: str, values: dict[str, Any]) -> str:
    """Render a config section as shell-quoted options of `dsf <stage>` (for Snakemake rules),
    in the schema's order of the keys, not the config's: Snakemake compares these strings with
    the last run's, and the same settings written in another order (a `--config` override,
    a re-saved YAML) had rerun every job after them."""
    parts: list[str] = []
    props = section_schema(section).get("properties", {})
    for key in props:
        if key not in values:
            continue
        sub = props[key]
        value = values[key]
        if isinstance(value, list) and isinstance(sub.get("items"), dict):
            like = sub.get("default")
            first = like[0] if isinstance(like, list) and like else None
            value = [_number_form(v, sub["items"], first) for v in value]
        else:
            value = _number_form(value, sub, sub.get("default"))
        flag = _flag(key)
        if value is None:  # null = not set: the option keeps its schema default
            continue
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            parts += [flag, json.dumps(value, sort_keys=True)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def export_repo(path: str | os.PathLike[str]) -> None:
    """Name the repository the workflow runs from in DSF_REPO, for envs/dsf.post-deploy.sh,
    which installs dsf from it into a `--sdm conda` environment: Snakemake runs that script
    from a copy in .snakemake/conda/, whose own location names no repository."""
    os.environ["DSF_REPO"] = str(Path(path).resolve())
