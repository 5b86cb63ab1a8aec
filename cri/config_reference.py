"""docs/config.md, generated from the config model: every key with its type, default, comment
(``config.DOCS``) and whether SIGHUP reloads it (``reload.RELOADABLE``).

``moorage config reference`` prints it; a unit test keeps the checked-in file equal to it, so
a new key shows up in the reference as soon as it is in the dataclasses.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from moorage.cri import config as configmod
from moorage.cri.reload import RELOADABLE

INTRO = f"""\
# Configuration reference

<!-- Generated from the config model by `moorage config reference`; do not edit by hand
     (test/unit/test_config_reference.py compares). -->

moorage reads TOML from `{configmod.DEFAULT_CONFIG_PATH}` (or `moorage serve --config PATH`).
Every key is optional: with no file at all the defaults below make a working daemon.

## Files and drop-ins

- **Drop-ins.** Every `*.toml` file in the `{configmod.DROPIN_DIR}` directory next to the main file
  (`/etc/moorage/{configmod.DROPIN_DIR}/` for the default path) is merged over the main file, in
  lexical order of the file names (`10-registries.toml` before `50-local.toml`). Hidden files
  and other suffixes are ignored. The drop-ins apply also when the default main file is absent.
- **Merge rule.** Key by key. Tables merge recursively, so a drop-in can set one key of
  `[cni]`, or add one `[runtime.handlers.<name>]` entry, and keep the rest. A scalar or a
  **list replaces** the earlier value whole: a drop-in's `insecure_registries = ["b:5000"]`
  is the whole list, it is not appended to the main file's. A table of named entries given in
  any file replaces that table's *default* entries, as in the main file (so
  `[runtime.handlers.kata]` alone leaves only `kata`); the entries of later files are added to
  those of earlier ones. A drop-in cannot remove a key or an entry an earlier file set.
- **Errors** name the file and the dotted key. Each file is checked alone for unknown keys
  and value types, then the merged result for everything else (such as a default handler
  that names no handler); that error names the file that set the key.
- `moorage serve --log-level/--socket/--root/--state` override the files, also after a reload.

## Commands

| command | what it does |
| --- | --- |
| `moorage config default` | prints every key with its default and comment (`manifests/config.toml`) |
| `moorage config check PATH` | validates `PATH` and the drop-ins next to it; prints `FILE: ok` per file |
| `moorage config dump [--config PATH]` | prints the effective config as TOML, each key followed by `# FILE` or `# default` |
| `moorage config reference` | prints this page |

## Reload (SIGHUP)

`kill -HUP <pid>` (systemd: `systemctl reload moorage`) reads the files again. The keys marked
**yes** in the SIGHUP column take effect on the running daemon; the registry hosts directory
(`hosts.toml`, certificates) is read again on every reload, changed key or not. Any other
changed key is refused: the daemon keeps its running value and logs one warning per key,
`config key '<key>' changed (in <file>): restart to apply; keeping the running value`.
A reload whose files do not load or validate changes nothing and logs
`config reload failed, keeping the running config: <file>: key '<key>': <problem>`.
A successful reload logs `config reloaded` with the applied and refused keys.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (it,) = typing.get_args(tp)
        return f"list of {_plural(it)}"
    if origin is dict:
        _, vt = typing.get_args(tp)
        return f"table of {_plural(vt)}"
    if isinstance(tp, str):  # already a description
        return tp
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    name = _type_name(tp)
    if name.startswith("list of "):
        return "lists of " + name.removeprefix("list of ")
    return {"string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans"}.get(name, name)


def _cell(text: str) -> str:
    # One line; a pipe would end the cell, and <state_dir> would read as an HTML tag.
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(v: Any) -> str:
    if isinstance(v, dict):
        return "empty table" if not v else "`" + ", ".join(f"{k} = {configmod.toml_value(x)}" for k, x in v.items()) + "`"
    return f"`{configmod.toml_value(v)}`"


def _entries_of(tp: Any) -> type | None:
    """The entry dataclass of a table of named entries (dict[str, <dataclass>]), else None."""
    if typing.get_origin(tp) is dict:
        _, vt = typing.get_args(tp)
        if isinstance(vt, type) and dataclasses.is_dataclass(vt):
            return vt
    return None


def _section(title: str, rows: list[str], out: list[str], note: str = "") -> None:
    out += ["", f"## {title}", ""]
    if note:
        out += [note, ""]
    out += ["| key | type | default | SIGHUP | description |", "| --- | --- | --- | --- | --- |", *rows]


def _row(key: str, doc_key: str, tp: Any, default: str) -> str:
    reload = "yes" if key in RELOADABLE else "no"
    return f"| `{key}` | {_type_name(tp)} | {default} | {reload} | {_cell(configmod.DOCS.get(doc_key, ''))} |"


def _walk(obj: Any, prefix: str, title: str, out: list[str], note: str = "") -> None:
    """A section for the plain keys of ``obj``, then one per sub-table (in field order)."""
    hints = typing.get_type_hints(type(obj))
    rows: list[str] = []
    later: list[list[str]] = []
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            sub: list[str] = []
            _walk(v, key + ".", f"`[{key}]`", sub, _cell(configmod.DOCS.get(key, "")))
            later.append(sub)
            continue
        entry = _entries_of(hints[f.name])
        if entry is None:
            rows.append(_row(key, key, hints[f.name], _default(v)))
            continue
        names = ", ".join(f"`{k}`" for k in v) or "none"
        rows.append(_row(key, key, f"table of `[{key}.<name>]` entries", f"{names} (see below)"))
        sub = []
        _entry_section(entry, key, v, sub)
        later.append(sub)
    _section(title, rows, out, note)
    for sub in later:
        out += sub


def _entry_section(cls: type, key: str, defaults: dict[str, Any], out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    blank = cls()
    rows = [_row(f"{key}.<name>.{f.name}", f"{key}.*.{f.name}", hints[f.name], _default(getattr(blank, f.name)))
            for f in dataclasses.fields(cls)]
    note = _cell(configmod.DOCS.get(key, ""))
    if defaults:
        shown = "; ".join(f"`{name}`: " + ", ".join(f"{k} = {configmod.toml_value(x)}"
                                                     for k, x in dataclasses.asdict(e).items())
                          for name, e in defaults.items())
        note += f" Without this table in any file, the entries are {shown}."
    _section(f"`[{key}.<name>]`", rows, out, note)


def markdown() -> str:
    """The whole reference page."""
    out: list[str] = [INTRO.rstrip("\n")]
    _walk(configmod.Config(), "", "Top-level keys", out)
    return "\n".join(out) + "\n"
