"""Is the sign-in configuration usable? Checks of `.streamlit/secrets.toml` that Streamlit does not make.

Streamlit's own loader returns nothing at all for a secrets file it cannot parse, and `st.login` trusts whatever
`[auth]` holds: a typo would silently turn a lab server into the unauthenticated local mode, and the example's
placeholder `cookie_secret` would let anyone who read the example forge an identity cookie. These functions name
such a problem, so that `dashboard.auth.auth_mode` can refuse to serve instead. No Streamlit import: plain files
and dicts, easy to test.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

EXAMPLE_SECRETS = Path(__file__).resolve().parent.parent / ".streamlit" / "secrets.toml.example"
SHARED_KEYS = ("redirect_uri", "cookie_secret")  # in [auth] itself, shared by every provider
PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")  # in [auth] or in each [auth.NAME]
NOT_PROVIDERS = ("client_kwargs",)  # tables of [auth] itself that are options, not providers
MIN_COOKIE_SECRET = 32


def unparsable(paths: list[Path]) -> str | None:
    """Why the first existing secrets file of `paths` cannot be read as TOML, else None (Streamlit would
    ignore such a file without a word)."""
    for path in paths:
        if path.suffix != ".toml" or not path.is_file():
            continue
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            return f"The secrets file {path} cannot be read as TOML ({exc}). Fix it (docs/lab-server.md)."
    return None


def any_exists(paths: list[Path]) -> bool:
    """Whether any of Streamlit's secrets locations (a .toml file or a Kubernetes-style folder) exists."""
    return any(p.is_file() or p.is_dir() for p in paths)


def _strings(value) -> set[str]:
    """Every string anywhere in a parsed TOML value."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def example_values(path: Path = EXAMPLE_SECRETS) -> set[str]:
    """Every value written in the shipped example secrets file: none of them is a secret."""
    try:
        return _strings(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError):
        return {"replace-with-64-random-hex-characters", "replace-with-the-client-secret"}


def provider_sections(section: dict) -> dict[str, dict]:
    """The providers `[auth]` configures: "default" when [auth] itself holds provider keys, and each
    `[auth.NAME]` table, as Streamlit's st.login reads them."""
    out = {}
    if any(k in section for k in PROVIDER_KEYS):
        out["default"] = section
    for name, value in section.items():
        if isinstance(value, dict) and name not in NOT_PROVIDERS:
            out[name] = value
    return out


def _missing(table: dict, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if not (isinstance(table.get(k), str) and table[k].strip())]


def cookie_secret_problem(secret: str) -> str | None:
    """Why `cookie_secret` cannot sign identity cookies (too short, or a value anyone can read in the example
    file), else None."""
    if secret.strip() in example_values():
        return "[auth] cookie_secret is the placeholder of .streamlit/secrets.toml.example"
    if len(secret.strip()) < MIN_COOKIE_SECRET:
        return f"[auth] cookie_secret is shorter than {MIN_COOKIE_SECRET} characters"
    return None


def auth_problems(section: dict) -> list[str]:
    """What is missing or unsafe in an `[auth]` section, in words; empty when st.login can use it safely."""
    problems = [f"[auth] has no {k}" for k in _missing(section, SHARED_KEYS)]
    providers = provider_sections(section)
    if not providers:
        problems.append(f"[auth] names no provider ({', '.join(PROVIDER_KEYS)} in [auth] or in [auth.NAME])")
    for name, table in providers.items():
        where = "[auth]" if name == "default" else f"[auth.{name}]"
        problems += [f"{where} has no {k}" for k in _missing(table, PROVIDER_KEYS)]
        if "_" in name:
            problems.append(f"{where}: Streamlit refuses provider names with an underscore")
    if "cookie_secret" not in _missing(section, SHARED_KEYS):
        problems += [p for p in [cookie_secret_problem(section["cookie_secret"])] if p]
    return problems
