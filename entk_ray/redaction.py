"""Credentials never leave the process: one function that every writer of results, logs and
artifact sidecars passes its data through.

``storage_options`` (``Config.storage_options``) may hold an S3 key and secret, a session token, a
password or a client credential under ``client_kwargs``; the run config goes into
``results.json``, artifacts carry free-form metadata, and error messages may show a value.
:func:`redact` returns a copy of a JSON-like value with every credential replaced by
:data:`REDACTED`:

* a mapping entry whose key names a credential (``key``, ``secret``, ``token``, ``password``,
  ``aws_secret_access_key``, ``session_token``, ``private_key``, ``authorization``, …, in any
  case and with ``-``/``_``); everything else (``endpoint_url``, ``region_name``, ``profile``, …)
  is kept;
* the ``user:password@`` part of a URL inside any string.

:func:`redact_argv` does the same for a command line (recorded in ``results.json`` and
``results.md``): a ``--set storage_options={key: …, secret: …}`` or ``--set
storage_options.secret=…`` override keeps its shape and loses its credentials.
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml

REDACTED = "***"

#: Key names that are credentials themselves (compared lower-case, ``-`` read as ``_``).
_CREDENTIAL_KEYS = {"key", "secret", "token", "password", "passwd", "pwd", "username_password",
                    "credentials", "authorization", "auth", "cookie", "signature", "sas", "sas_token"}
#: Key names containing one of these are credentials too (``aws_secret_access_key``, ``api_key``...).
_CREDENTIAL_PARTS = ("secret", "token", "password", "passwd", "credential", "private_key", "api_key", "apikey",
                     "access_key", "account_key", "session_key", "auth")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^@\s]+@")


def is_credential_key(name: Any) -> bool:
    """True for a mapping key that names a credential (see the module doc)."""
    if not isinstance(name, str):
        return False
    key = name.lower().replace("-", "_")
    return key in _CREDENTIAL_KEYS or any(part in key for part in _CREDENTIAL_PARTS)


def redact_text(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL replaced."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists, tuples, strings, scalars) without credentials."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_credential_key(k) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


_OVERRIDE = re.compile(r"^(?P<path>[A-Za-z_][\w.-]*)=(?P<value>.*)$", re.S)


def redact_override(item: str) -> str:
    """A ``section.field=value`` override without credentials: the value of a field whose path
    names a credential is replaced, a mapping or list value is redacted entry by entry (written
    back as JSON), and a ``storage_options`` value that is not valid YAML is replaced whole."""
    match = _OVERRIDE.match(item)
    if match is None:
        return redact_text(item)
    path, raw = match.group("path"), match.group("value")
    parts = path.split(".")
    if any(is_credential_key(part) for part in parts):
        return f"{path}={REDACTED}"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return f"{path}={REDACTED}" if parts[0] == "storage_options" else redact_text(item)
    if isinstance(value, (dict, list)):
        clean = redact(value)
        if clean != value:
            return f"{path}={json.dumps(clean)}"
    return redact_text(item)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line's arguments without credentials (``--set X=V`` and ``--set=X=V`` alike)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            flag, rest = arg.split("=", 1)
            out.append(f"{flag}={redact_override(rest)}")
        else:
            out.append(redact_override(arg))
    return out
