"""Who is acting, and what they may do: sign-in (Streamlit's OpenID Connect) and roles (a small TOML file).

Two modes:
- **local** (the default: no `[auth]` section in `.streamlit/secrets.toml`): single-user, unauthenticated; one
  actor, "local user", with every right (the sidebar says so). Label reviews carry the name typed in the sidebar.
- **signed in** (an `[auth]` section configured as Streamlit documents for `st.login`): every page asks for
  sign-in first and shows or writes nothing before it; the signed-in identity (the claim named in the roles file,
  `email` by default) is what the audit trail and label reviews record, and its role (from the roles file) says
  what it may do.

Roles, each with the rights of the ones before it:
  viewer    classify cells, see runs, evaluations, errors and data
  reviewer  + relabel cells (label reviews), export label overrides
  trainer   + launch, cancel, resume and extend runs (and the demo run)
  admin     + download the audit trail

The roles file (`CNMC_ROLES`, default `roles.toml`; see `roles.toml.example`):

    identity_claim = "email"     # the claim of the ID token that names a person (recorded with every action)
    groups_claim = "groups"      # optional: a claim holding the person's groups (a list or one string)
    default = "none"             # role of a signed-in identity listed nowhere: "none" (refused) or a role

    [users]                      # identity -> role (emails compared without case)
    "ana@lab.example" = "admin"

    [groups]                     # group (a value of groups_claim) -> role
    "cnmc-reviewers" = "reviewer"

An identity gets the highest role among its entry and its groups' entries, else `default`. Without a roles file,
every signed-in identity gets `none`: no one is let in until an admin writes one (the page says where).

The checks that matter are in `dashboard/services.py`: every function that writes takes an `actor` and calls
`require(actor, action)`, which raises `PermissionDenied` saying why; pages only hide what would be refused.
This module imports Streamlit only inside the functions that draw or read the session.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

ROLES = ("viewer", "reviewer", "trainer", "admin")  # each has the rights of those before it
NO_ROLE = "none"
LOCAL_USER = "local user"
DEFAULT_ROLES_FILE = "roles.toml"

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

    def role_of(self, identity: str, groups=()) -> str:
        """The highest role among the identity's entry and its groups' entries; else `default`."""
        users = {k.strip().lower(): v for k, v in (self.users or {}).items()}
        found = [users.get(identity.strip().lower())] + [(self.groups or {}).get(g) for g in groups]
        found = [r for r in found if r in ROLES]
        return max(found, key=ROLES.index) if found else self.default


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
    default = data.get("default", NO_ROLE)
    if default not in allowed:
        raise ValueError(f"{path}: default = {default!r} is not a role ({', '.join(ROLES)}) nor {NO_ROLE!r}")
    return RolesConfig(data.get("identity_claim", "email"), data.get("groups_claim", "groups"), default,
                       dict(data.get("users", {})), dict(data.get("groups", {})), path, True)


def actor_from_claims(claims: dict, roles: RolesConfig) -> Actor:
    """The actor an ID token's claims (st.user) make under a roles config."""
    identity = claims.get(roles.identity_claim) or claims.get("email") or claims.get("sub")
    if not identity:
        raise PermissionDenied(f"the sign-in gave no {roles.identity_claim!r} claim to name you by")
    raw = claims.get(roles.groups_claim) if roles.groups_claim else None
    groups = tuple(str(g) for g in (raw if isinstance(raw, (list, tuple)) else [raw] if raw else []))
    return Actor(str(identity), roles.role_of(str(identity), groups), True, groups)


# --- Streamlit: sign-in mode and the current actor ------------------------------------------------------------
def auth_section() -> dict:
    """The `[auth]` section of Streamlit's secrets (empty when none is configured)."""
    import streamlit as st

    if not st.secrets.load_if_toml_exists():
        return {}
    section = st.secrets.get("auth")
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def providers(section: dict | None = None) -> list[str | None]:
    """The providers `st.login` can be called with: [None] for one provider configured in `[auth]` itself,
    else the names of the `[auth.<name>]` tables."""
    section = auth_section() if section is None else section
    if not section:
        return []
    if "client_id" in section or "server_metadata_url" in section:
        return [None]
    return [name for name, value in section.items() if isinstance(value, dict)]


def auth_enabled() -> bool:
    return bool(providers())


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
    """What the app shows instead of its pages, or None when the visitor may go on: the sign-in page when
    sign-in is on and nobody is signed in; the refusal when the signed-in identity has no role. streamlit_app.py
    runs it as the only (hidden) page, so no page name or URL of the dashboard shows before sign-in."""
    if not auth_enabled():
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
    is configured. Not signed in, or signed in with no role: draws why and stops the page (nothing below runs),
    whichever way the page was reached."""
    if not auth_enabled():
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
    this is the unauthenticated single-user mode."""
    import streamlit as st

    if actor.signed_in:
        st.sidebar.caption(f"Signed in as **{actor.identity}** · role **{actor.role}**")
        _sign_out_button(st.sidebar)
        return
    address = str(st.get_option("server.address") or "")
    st.sidebar.caption("Local single-user mode: **no sign-in** (unauthenticated). Whoever reaches this page can "
                       "do everything here. For a lab server, configure sign-in and roles (docs/lab-server.md).")
    if address not in ("127.0.0.1", "localhost", "::1"):
        st.sidebar.warning(f"This server listens on {address or 'every address'} without sign-in: anyone who "
                           "reaches it can relabel cells, train and read the audit trail.")
