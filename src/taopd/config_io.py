"""Reading configs, below `config.py`'s fields: the shipped recipes, YAML files (a syntax error
named by file, line and column), a file's relative paths, `--set key.sub=value` overrides, and
validation errors in the config's own words (the key and the value given, the `--set` or file
that gave it, a "did you mean" for an unknown key; never a class name).
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError, did_you_mean, notice

__all__ = [
    "apply_overrides",
    "format_errors",
    "list_recipes",
    "override_keys",
    "read_config_file",
    "recipe_path",
    "resolve_paths",
]


# ----------------------------------------------------------------------------- files
def list_recipes() -> list[str]:
    """Names of the YAML recipes shipped with taopd (src/taopd/configs)."""
    root = resources.files("taopd") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A config file path, or the shipped recipe of that name (e.g. `demo`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    candidate = Path(str(resources.files("taopd") / "configs" / f"{name}.yaml"))
    if "/" not in name and candidate.exists():
        return candidate
    raise UserError(
        f"config file {name_or_path} does not exist (shipped recipes: {', '.join(list_recipes())})"
    )


def _yaml_error(path: Path, e: yaml.YAMLError) -> UserError:
    """The file, line and column of a YAML syntax error (not PyYAML's "<unicode string>")."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        what += f" ({context} opened at line {cmark.line + 1}, column {cmark.column + 1})"
    return UserError(f"config {path} is not valid YAML{where}: {what}")


def read_config_file(name_or_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(path, mapping) of a config file or shipped recipe; an unreadable, invalid, empty or
    non-mapping file is a UserError naming it."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config {path} cannot be read ({e})") from None
    if data is None:  # more likely a mistake (wrong or unsaved file) than all defaults
        raise UserError(
            f"config {path} is empty; write the keys to set (e.g. student, teacher, task), "
            "or `{}` for all defaults"
        )
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of keys to values")
    return path, data


# the paths a config file may give relative to its own folder; "smollm2" names the bundled
# model (models.SMOLLM2_NAMES), never a folder
PATH_KEYS = ("task.path", "student", "teacher")
_BUNDLED = ("smollm2", "bundled:smollm2")


def resolve_paths(data: dict[str, Any], config: Path) -> dict[str, str]:
    """Point the config file's relative paths (`PATH_KEYS`, in `data`) at the file's own folder
    where they exist there, else leave them relative to the working directory. Returns, for
    those found in neither, where they were looked for (for the error that follows)."""
    looked: dict[str, str] = {}
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if not isinstance(value, str) or value.strip().lower() in ("", *_BUNDLED):
            continue  # an empty path is left to its own error
        path = Path(value).expanduser()
        beside = config.parent / path
        if path.is_absolute() or (beside.exists() and beside.resolve() == path.resolve()):
            continue
        if beside.exists():
            node[leaf] = os.path.normpath(beside)
            if path.exists():
                notice(f"{key} {value}: using {node[leaf]} (beside the config), not {path}")
        elif not path.exists():
            looked[key] = (
                f": looked for {beside.resolve()} (beside the config {config}) and "
                f"{path.resolve()} (in the working directory)"
            )
    return looked


# ----------------------------------------------------------------------------- --set
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. selection.ratio=0.1), got {item!r}")
    key, raw = item.split("=", 1)
    if any(not part.strip() for part in key.split(".")):
        raise UserError(
            f"--set {item}: the key is empty or has an empty part (expected key=value, e.g. "
            "selection.ratio=0.1)"
        )
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def override_keys(overrides: list[str] | None) -> list[str]:
    """The dotted keys the `--set` items set."""
    return [".".join(_parse_override(item)[0]) for item in overrides or []]


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` set (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


# ----------------------------------------------------------------------------- errors
def _section(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The config section (model class) at `loc`, e.g. ('selection',); None for a value."""
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        kinds = (field.annotation, *get_args(field.annotation))
        model = next((t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return model


def _suggest(root: type[BaseModel], loc: tuple[str, ...]) -> str:
    """' (did you mean ...?)' for an unknown key: a close key of its own section, else the
    sections that hold a key of that name (optional sections last)."""
    section = _section(root, loc[:-1])
    prefix = "".join(f"{p}." for p in loc[:-1])
    if hint := did_you_mean(loc[-1], list(section.model_fields) if section else [], prefix):
        return hint
    optional_last = sorted(root.model_fields, key=lambda k: _optional(root, k))
    hits = [
        f"{name}.{loc[-1]}"
        for name in optional_last
        if loc[-1] in getattr(_section(root, (name,)), "model_fields", {})
    ]
    return f" (did you mean {' or '.join(hits[:3])}?)" if hits else ""


def _optional(root: type[BaseModel], key: str) -> bool:
    return type(None) in get_args(root.model_fields[key].annotation)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(root: type[BaseModel], e: Any) -> str:
    """One validation error in the config's words: key names, never a class name; the value."""
    loc, kind = tuple(str(p) for p in e["loc"]), e["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(root, loc)
    if kind == "missing":  # a field of a section, or an item of a fixed-length list
        return "too few values" if loc and loc[-1].isdigit() else "required: give a value"
    msg = e["msg"].removeprefix("Value error, ")
    section = _section(root, loc)
    if kind in ("model_type", "model_attributes_type", "dict_type") and section is not None:
        msg = f"should be a section: a mapping of its keys ({', '.join(section.model_fields)})"
    if kind not in ("value_error", "assertion_error") and "input" in e:
        msg += f", got {_show(e['input'])}"
    return msg


def format_errors(
    err: ValidationError, root: type[BaseModel], source: str, overrides: list[str] | None
) -> str:
    """Every problem of `err` on a line, with where its value came from: the `--set` that gave
    it, else `source` (the config file)."""
    sets = [
        (tuple(k.split(".")), item) for k, item in zip(override_keys(overrides), overrides or [])
    ]
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        hits = [
            f"--set {item}"
            for key, item in sets
            if loc and (key[: len(loc)] == loc or loc[: len(key)] == key)
        ]
        if e["type"] == "missing" and loc and loc[-1].isdigit():
            loc = loc[:-1]  # optim.betas, not optim.betas.1
        where = ".".join(loc) or "(top level)"
        lines.append((hits[-1] if hits else source, where, _message(root, e)))
    by_source: dict[str, list[str]] = {}
    for src, where, msg in lines:
        by_source.setdefault(src, []).append(f"{where}: {msg}")
    if len(by_source) == 1:
        ((src, problems),) = by_source.items()
        if len(problems) == 1:  # one problem: one line
            return f"invalid config ({src}): {problems[0]}"
        return "\n".join([f"invalid config ({src}):", *(f"  {p}" for p in problems)])
    out = ["invalid config:"]
    for src, problems in by_source.items():
        if len(problems) == 1:
            out.append(f"  {src}: {problems[0]}")
        else:
            out += [f"  {src}:", *(f"    {p}" for p in problems)]
    return "\n".join(out)
