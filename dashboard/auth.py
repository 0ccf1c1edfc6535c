"""Who is acting, and what they may do: sign-in (Streamlit's OpenID Connect) and roles (a small TOML file).

Three modes (`auth_mode()`), failing closed:
- **sign-in** (a complete `[auth]` section, as Streamlit documents for `st.login`): every page asks for sign-in
  first and shows or writes nothing before it; the signed-in identity (a verified email, else issuer + `sub`) is
  what the audit trail and label reviews record, and its role (from the roles file) says what it may do.
- **local** only with no secrets file, the server bound to loopback and no proxy header on the request, or when
  `CNMC_LOCAL_MODE=1` says so: single-user, unauthenticated; one actor, "local user", with every right (the
  sidebar says so). Label reviews carry the name typed in the sidebar.
- **refused** otherwise (a secrets file that is not TOML, an incomplete `[auth]`, the example's cookie_secret, a
  network-facing server without sign-in): one error naming the problem, nothing else. Also, whatever the mode,
  a session whose request's `Host` is not in `CNMC_ALLOWED_HOSTS` (when set): a DNS-rebinding page or a
  misrouted proxy reaches the server under another name.

Roles, each with the rights of the ones before it:
  viewer    classify cells, see runs, evaluations, errors and data
  reviewer  + relabel cells (label reviews), export label overrides
  trainer   + launch, cancel, resume and extend runs (and the demo run)
  admin     + download the audit trail

The roles file (`CNMC_ROLES`, default `roles.toml`; see `roles.toml.example`):

    identity_claim = "email"     # what names a person in the records: "email" (verified), "sub" or "oid"
    groups_claim = "groups"      # optional: a claim holding the person's groups (a list or one string)
    default = "none"             # role of a signed-in identity listed nowhere: "none" (refused) or a role

    [users]                      # a verified email (without case), or "ISSUER#SUB" / "ISSUER#OID" -> role
    "ana@lab.example" = "admin"
    "https://login.microsoftonline.com/TENANT/v2.0#OID" = "reviewer"

    [groups]                     # group (a value of groups_claim) -> role
    "cnmc-reviewers" = "reviewer"

An identity gets the highest role among its entries and its groups' entries, else `default`. An email counts only
when the token says `email_verified` (anyone can put any address in an unverified one); `sub` (Entra: `oid`) counts
only with its issuer, since two providers may hand out the same `sub`. Without a roles file,
every signed-in identity gets `none`: no one is let in until an admin writes one (the page says where).

The checks that matter are in `dashboard/services.py`: every function that writes takes an `actor` and calls
`require(actor, action)`, which raises `PermissionDenied` saying why; pages only hide what would be refused.
This module imports Streamlit only inside the functions that draw or read the session.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from dashboard import secrets_check

ROLES = ("viewer", "reviewer", "trainer", "admin")  # each has the rights of those before it
NO_ROLE = "none"
LOCAL_USER = "local user"
DEFAULT_ROLES_FILE = "roles.toml"
IDENTITY_CLAIMS = ("email", "sub", "oid")  # claims a person cannot set themselves (email: only when verified)

# action -> (the least role allowed, what the action is in words)
ACTIONS: dict[str, tuple[str, str]] = {
    "classify": ("viewer", "classifying cells"),
    "review": ("reviewer", "relabelling"),
    "export_overrides": ("reviewer", "exporting the label overrides"),
    "launch": ("trainer", "launching a training run"),
    "cancel": ("trainer", "cancelling a run"),
    "resume": ("trainer", "resuming or extending a run"),
    "audit": ("admin", "downloading the audit trail"),
}


class PermissionDenied(PermissionError):
    """An action the actor's role does not allow; the message says which role it needs and who is asking."""


@dataclass(frozen=True)
class Actor:
    """Who acts: `identity` (the signed-in claim, e.g. an email; "local user" in local mode), `role` (one of
    ROLES, or "none"), `signed_in` (False in local mode) and, in local mode only, the name typed as reviewer."""
    identity: str
    role: str
    signed_in: bool = True
    groups: tuple[str, ...] = ()

    def can(self, action: str) -> bool:
        least = ACTIONS[action][0]
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(least)

    def refusal(self, action: str) -> str | None:
        """Why `action` is refused to this actor, in words; None when allowed."""
        if self.can(action):
            return None
        least, words = ACTIONS[action]
        who = f"you are signed in as {self.identity}" if self.signed_in else f"you act as {self.identity}"
        role = f"as {self.role}" if self.role in ROLES else "with no role on this dashboard"
        return f"{words[0].upper()}{words[1:]} needs the {least} role; {who} {role}."

    def named(self, name: str) -> "Actor":
        """Local mode: the same actor under the name typed in the sidebar (a label, not a sign-in). A signed-in
        actor keeps its identity: the name cannot be chosen."""
        return self if self.signed_in else replace(self, identity=name.strip())

    @property
    def audit_source(self) -> str:
        """How the audit trail's `source` names where a classification came from and who made it."""
        return "dashboard" if not self.signed_in else f"dashboard by {self.identity}"


LOCAL = Actor(LOCAL_USER, "admin", signed_in=False)


def require(actor: Actor | None, action: str) -> Actor:
    """The actor, if its role allows `action`; else PermissionDenied saying why. Services call this before
    writing anything."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if not isinstance(actor, Actor):
        raise PermissionDenied(f"{ACTIONS[action][1]} needs an actor (who is asking); none was given")
    why = actor.refusal(action)
    if why:
        raise PermissionDenied(why)
    return actor


# --- the roles file -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolesConfig:
    identity_claim: str = "email"
    groups_claim: str | None = "groups"
    default: str = NO_ROLE
    users: dict | None = None
    groups: dict | None = None
    path: Path | None = None
    found: bool = False

    def role_of(self, keys: str | tuple[str, ...], groups=()) -> str:
        """The highest role among the entries of the person's keys (verified email, "ISSUER#SUB") and of their
        groups; else `default`."""
        keys = (keys,) if isinstance(keys, str) else keys
        users = {_user_key(k): v for k, v in (self.users or {}).items()}
        found = [users.get(_user_key(k)) for k in keys] + [(self.groups or {}).get(g) for g in groups]
        found = [r for r in found if r in ROLES]
        return max(found, key=ROLES.index) if found else self.default


def _user_key(key: str) -> str:
    """A [users] key as compared: an email without case; "ISSUER#SUB" exactly (a `sub` is case-sensitive)."""
    key = key.strip()
    return key if "#" in key else key.lower()


def roles_path() -> Path:
    return Path(os.environ.get("CNMC_ROLES", DEFAULT_ROLES_FILE)).resolve()


def load_roles(path: str | Path | None = None) -> RolesConfig:
    """The roles file (see the module's docstring); a missing file is an empty config (everyone `none`); a
    file with an unknown role or key is an error naming it, never a silent grant."""
    path = Path(path) if path is not None else roles_path()
    if not path.is_file():
        return RolesConfig(path=path)
    data = tomllib.loads(path.read_text())
    unknown = set(data) - {"identity_claim", "groups_claim", "default", "users", "groups"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    allowed = set(ROLES) | {NO_ROLE}
    for table in ("users", "groups"):
        for who, role in data.get(table, {}).items():
            if role not in ROLES:
                raise ValueError(f"{path}: [{table}] {who!r} = {role!r} is not a role ({', '.join(ROLES)})")
    if data.get("identity_claim", "email") not in IDENTITY_CLAIMS:
        raise ValueError(f"{path}: identity_claim = {data['identity_claim']!r}: use one of {IDENTITY_CLAIMS} "
                         "(other claims can be chosen by the person signing in)")
    default = data.get("default", NO_ROLE)
    if default not in allowed:
        raise ValueError(f"{path}: default = {default!r} is not a role ({', '.join(ROLES)}) nor {NO_ROLE!r}")
    return RolesConfig(data.get("identity_claim", "email"), data.get("groups_claim", "groups"), default,
                       dict(data.get("users", {})), dict(data.get("groups", {})), path, True)


def verified_email(claims: dict) -> str | None:
    """The token's email, only when the provider says it verified it: an unverified address is whatever the
    person typed at the provider, an admin's included."""
    verified = claims.get("email_verified")
    ok = verified is True or (isinstance(verified, str) and verified.strip().lower() == "true")
    email = claims.get("email")
    return email.strip() if ok and isinstance(email, str) and email.strip() else None


def subject_keys(claims: dict) -> tuple[str, ...]:
    """"ISSUER#SUB" (and "ISSUER#OID" for Entra): who the provider says this is, unique across providers (an
    issuer's URL has no '#')."""
    iss = claims.get("iss")
    if not iss:
        return ()
    return tuple(f"{iss}#{claims[c]}" for c in ("sub", "oid") if claims.get(c))


def _identity(claims: dict, roles: RolesConfig) -> str | None:
    """The name recorded for the person: the claim the roles file names, never an unverified email."""
    email, subjects = verified_email(claims), subject_keys(claims)
    if roles.identity_claim == "email" and email:
        return email
    if roles.identity_claim == "oid" and claims.get("oid") and claims.get("iss"):
        return f"{claims['iss']}#{claims['oid']}"
    return subjects[0] if subjects else None


def actor_from_claims(claims: dict, roles: RolesConfig) -> Actor:
    """The actor an ID token's claims (st.user) make under a roles config: keyed by verified email and by
    issuer + `sub`/`oid`, the claims a person cannot choose."""
    identity = _identity(claims, roles)
    if not identity:
        raise PermissionDenied("the sign-in gave neither a verified email nor an issuer and subject to name you by")
    raw = claims.get(roles.groups_claim) if roles.groups_claim else None
    groups = tuple(str(g) for g in (raw if isinstance(raw, (list, tuple)) else [raw] if raw else []))
    keys = tuple(k for k in (verified_email(claims), *subject_keys(claims)) if k)
    return Actor(identity, roles.role_of(keys, groups), True, groups)


# --- the server's mode: sign-in, local or refused (fail closed) ------------------------------------------------
LOCAL_MODE_ENV = "CNMC_LOCAL_MODE"
ALLOWED_HOSTS_ENV = "CNMC_ALLOWED_HOSTS"  # comma-separated host names (no port; "*.lab.example" for subdomains)
LOOPBACK_NAMES = ("localhost",)
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-host")  # a proxy forwarded the request
CONFIGURE = "Configure sign-in (docs/lab-server.md)"
LOG = logging.getLogger("cnmc.auth")


@dataclass(frozen=True)
class AuthMode:
    """How this server serves: `mode` is "local", "sign-in" or "refused"; `reason` says why in words (the
    refusal shown on the page, the line logged at start); `forced` marks local mode set by CNMC_LOCAL_MODE=1."""
    mode: str
    reason: str
    forced: bool = False


def auth_section() -> dict | None:
    """The `[auth]` section of Streamlit's secrets: None when there is none; {} when it is not a table."""
    import streamlit as st

    if not st.secrets.load_if_toml_exists() or "auth" not in st.secrets:
        return None
    section = st.secrets.get("auth")
    return section.to_dict() if hasattr(section, "to_dict") else dict(section) if isinstance(section, dict) else {}


def providers(section: dict | None = None) -> list[str | None]:
    """The providers `st.login` can be called with: None for the one configured in `[auth]` itself, and the
    names of the `[auth.<name>]` tables."""
    section = auth_section() if section is None else section
    return [None if name == "default" else name for name in secrets_check.provider_sections(section or {})]


def secrets_paths() -> list[Path]:
    """Where Streamlit reads secrets (`secrets.files`: ~/.streamlit and ./.streamlit by default)."""
    import streamlit as st

    return [Path(p).expanduser() for p in st.get_option("secrets.files") or []]


def _loopback(address: str) -> bool:
    """Whether the server listens on this machine only (an empty address means every interface)."""
    if address.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address.strip("[] ")).is_loopback
    except ValueError:
        return False


def decide_mode(paths: list[Path], section: dict | None, address: str, local_env: str) -> AuthMode:
    """The server's mode from its configuration files alone: sign-in with a complete `[auth]`; local only with
    no secrets at all on a loopback address, or when CNMC_LOCAL_MODE=1; refused otherwise, saying why."""
    broken = secrets_check.unparsable(paths)
    if broken:
        return AuthMode("refused", broken)
    if section is not None:
        problems = secrets_check.auth_problems(section)
        if problems:
            return AuthMode("refused", f"Sign-in is misconfigured: {'; '.join(problems)}. {CONFIGURE}.")
        return AuthMode("sign-in", f"sign-in with {len(providers(section))} provider(s)")
    if local_env.strip() == "1":
        return AuthMode("local", f"local single-user mode forced by {LOCAL_MODE_ENV}=1", forced=True)
    if secrets_check.any_exists(paths):
        return AuthMode("refused", f"A secrets file exists but has no [auth] section. {CONFIGURE}, or set "
                                   f"{LOCAL_MODE_ENV}=1 for an unauthenticated single-user server.")
    if not _loopback(address):
        return AuthMode("refused", f"This server listens on {address or 'every address'} without sign-in. "
                                   f"{CONFIGURE}, or bind it to 127.0.0.1.")
    return AuthMode("local", f"local single-user mode: no secrets file, bound to {address}")


def _config_stamp() -> tuple:
    """What the file-based decision depends on, cheaply: the secrets files' sizes and times, the [auth]
    section's digest, the address and CNMC_LOCAL_MODE. The decision is remade only when one changes."""
    import streamlit as st

    files = tuple(stamp for stamp in map(_file_stamp, secrets_paths()) if stamp)
    section = json.dumps(auth_section(), sort_keys=True, default=str)
    return (files, hashlib.sha256(section.encode()).hexdigest(), str(st.get_option("server.address") or ""),
            os.environ.get(LOCAL_MODE_ENV, ""))


def _file_stamp(path: Path) -> tuple | None:
    """(path, modification time, size) of an existing secrets location, else None."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _server_mode(stamp: tuple) -> AuthMode:
    """The file-based decision, once per configuration (in practice once per process), logged when made."""
    mode = decide_mode(secrets_paths(), auth_section(), stamp[2], stamp[3])
    _logger().log(logging.INFO if mode.mode == "sign-in" else logging.WARNING, "dashboard auth mode: %s (%s)",
                  mode.mode, mode.reason)
    return mode


def _logger() -> logging.Logger:
    """The auth log; with a handler of its own when nothing is configured (Streamlit only sets up its own
    loggers), so that the mode line reaches the server's log."""
    if not LOG.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return LOG


def _request_headers() -> dict[str, str]:
    """The headers of this session's first request, keys in lower case (none outside a browser session)."""
    import streamlit as st

    return {str(k).lower(): str(v) for k, v in dict(st.context.headers).items()}


def proxy_header(headers: dict[str, str]) -> str | None:
    """The first header showing the request came through a proxy, i.e. from beyond this machine."""
    found = [h for h in PROXY_HEADERS if h in {k.lower() for k in headers}]
    return found[0] if found else None


def allowed_hosts() -> list[str]:
    """The host names this server answers to (CNMC_ALLOWED_HOSTS), lower case; empty: any."""
    return [h.strip().lower() for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]


def host_refusal(headers: dict[str, str], allowed: list[str]) -> str | None:
    """Why a request's Host header is refused under the allow-list (port ignored; "*.x" matches subdomains of
    x); None when allowed or when there is no list. A request without a Host header is refused under a list."""
    if not allowed:
        return None
    host = headers.get("host", "").strip().lower()
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
        else host
    for pattern in allowed:
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return None
    return (f"This request names host {host or '(none)'!r}, which this server does not answer to "
            f"({ALLOWED_HOSTS_ENV}: {', '.join(allowed)}). Use the server's own address (docs/deploy.md).")


def auth_mode() -> AuthMode:
    """This session's mode: the server's file-based decision (cached); refused for a request whose Host is not
    in CNMC_ALLOWED_HOSTS (when set); and for unforced local mode the check, per session, that the request did
    not come through a proxy (a loopback server behind a reverse proxy is reachable from the network)."""
    mode = _server_mode(_config_stamp())
    headers = _request_headers()
    wrong_host = host_refusal(headers, allowed_hosts()) if mode.mode != "refused" else None
    if wrong_host:
        refused = AuthMode("refused", wrong_host)
        _log_session_refusal(refused)
        return refused
    header = proxy_header(headers) if mode.mode == "local" and not mode.forced else None
    if header is None:
        return mode
    refused = AuthMode("refused", f"This request came through a proxy ({header} header), but the dashboard has no "
                                  f"sign-in. {CONFIGURE}; set {LOCAL_MODE_ENV}=1 only for a single-user server.")
    _log_session_refusal(refused)
    return refused


def _log_session_refusal(mode: AuthMode) -> None:
    """Log a per-session refusal once per session, not on every rerun."""
    import streamlit as st

    if not st.session_state.get("_cnmc_refusal_logged"):
        st.session_state["_cnmc_refusal_logged"] = True
        _logger().warning("refused a session: %s", mode.reason)


def not_served_ui(why: str) -> None:
    """The whole page when the server refuses to serve: one error naming the problem, nothing else."""
    import streamlit as st

    st.error(why)
    st.stop()


def sign_in_ui() -> None:
    """The page for a visitor not signed in: what the dashboard is, a sign-in button per provider, nothing else
    (Streamlit stops the script after it)."""
    import streamlit as st

    st.title("C-NMC leukemia workbench")
    st.info("Sign in to use this dashboard. You are not signed in: nothing is shown and nothing is written "
            "until you are.")
    for provider in providers():
        label = "Sign in" if provider is None else f"Sign in with {provider}"
        if st.button(label, type="primary", key=f"sign-in-{provider or ''}"):
            if provider is None:
                st.login()
            else:
                st.login(provider)
    st.stop()


def _signed_in_actor() -> tuple[Actor | None, str | None]:
    """(the signed-in actor, None), or (None, why this session may not go on) in sign-in mode."""
    import streamlit as st

    if not st.user.get("is_logged_in"):
        return None, None
    try:
        roles = load_roles()
        actor = actor_from_claims(st.user.to_dict(), roles)
    except (ValueError, PermissionDenied, OSError) as exc:
        return None, f"Signed in, but who you are here cannot be decided: {exc}"
    if actor.role not in ROLES:
        where = "" if roles.found else f" (no roles file at {roles.path}: set CNMC_ROLES or create it)"
        return None, (f"You are signed in as {actor.identity}, who has no role on this dashboard{where}. Ask its "
                      "admin to add you to the roles file.")
    return actor, None


def refused_ui(why: str) -> None:
    """A signed-in visitor who may not use the dashboard: why, and a sign-out button; nothing else."""
    import streamlit as st

    st.title("C-NMC leukemia workbench")
    st.error(why)
    _sign_out_button()
    st.stop()


def gate_page():
    """What the app shows instead of its pages, or None when the visitor may go on: the refusal when the server
    will not serve (its configuration is unsafe); the sign-in page when sign-in is on and nobody is signed in;
    the refusal when the signed-in identity has no role. streamlit_app.py runs it as the only (hidden) page, so no
    page name or URL of the dashboard shows before sign-in."""
    mode = auth_mode()
    if mode.mode == "refused":
        def not_served() -> None:
            not_served_ui(mode.reason)
        return not_served
    if mode.mode == "local":
        return None
    actor, why = _signed_in_actor()
    if actor is not None:
        return None
    if why is None:
        return sign_in_ui

    def refused() -> None:
        refused_ui(why)
    return refused


def current_actor() -> Actor:
    """The actor of this browser session: LOCAL in local mode; the signed-in identity and its role when sign-in
    is configured. Refused server, not signed in, or signed in with no role: draws why and stops the page
    (nothing below runs), whichever way the page was reached."""
    mode = auth_mode()
    if mode.mode == "refused":
        not_served_ui(mode.reason)
    if mode.mode == "local":
        return LOCAL
    actor, why = _signed_in_actor()
    if actor is None:  # both stop the script
        if why is None:
            sign_in_ui()
        refused_ui(why)
    return actor


def _sign_out_button(where=None) -> None:
    import streamlit as st

    if (where or st).button("Sign out", key="sign-out"):
        st.logout()


def sidebar_ui(actor: Actor) -> None:
    """Who is acting, in the sidebar: the signed-in identity and role with a sign-out button, or plainly that
    this is the unauthenticated single-user mode (and when CNMC_LOCAL_MODE=1 forced it)."""
    import streamlit as st

    if actor.signed_in:
        st.sidebar.caption(f"Signed in as **{actor.identity}** · role **{actor.role}**")
        _sign_out_button(st.sidebar)
        return
    st.sidebar.caption("Local single-user mode: **no sign-in** (unauthenticated). Whoever reaches this page can "
                       "do everything here. For a lab server, configure sign-in and roles (docs/lab-server.md).")
    if auth_mode().forced:
        address = str(st.get_option("server.address") or "") or "every address"
        st.sidebar.warning(f"Local mode forced by {LOCAL_MODE_ENV}=1 (server address: {address}): anyone who "
                           "reaches it can relabel cells, train and read the audit trail.")
