"""A lab server that fails closed (issue 29): a secrets file Streamlit cannot parse, an incomplete `[auth]`, the
example's cookie secret or a network-facing server without sign-in make the app show one error and nothing else;
identities come from claims a person cannot choose; CSV downloads are not spreadsheet formulas. AppTest, no
browser: fast."""
from __future__ import annotations

import io
import logging
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from dashboard import auth, secrets_check
from dashboard.csv_export import escape_cells, safe_csv

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / ".streamlit" / "secrets.toml.example"
GOOD_SECRET = "0123456789abcdef" * 4
ISSUER = "https://keycloak.lab.test/realms/lab"
ADMIN = "head.of.lab@lab.example"
GOOD_AUTH = f"""[auth]
redirect_uri = "http://127.0.0.1:8501/oauth2callback"
cookie_secret = "{GOOD_SECRET}"
client_id = "cnmc-test"
client_secret = "not-a-secret"
server_metadata_url = "http://127.0.0.1:9/.well-known/openid-configuration"
"""


def _set_option(key: str, value) -> None:
    from streamlit import config

    config.set_option(key, value)


@pytest.fixture()
def secrets_file(tmp_path, monkeypatch):
    """Streamlit reads its secrets from one temporary file only (the real `secrets.files` option, so Streamlit's
    own loader and ours both read it); the option and the loaded secrets are restored afterwards."""
    import streamlit as st
    from streamlit import config

    monkeypatch.setenv("CNMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv(auth.LOCAL_MODE_ENV, raising=False)
    path = tmp_path / "secrets.toml"
    saved = config.get_option("secrets.files")
    _set_option("secrets.files", [str(path)])
    st.secrets._reset()
    yield path
    _set_option("secrets.files", saved)
    st.secrets._reset()


@pytest.fixture()
def no_secrets(secrets_file):
    """No secrets file at all (the path Streamlit looks at does not exist)."""
    return secrets_file


def run_app(tmp_path, script: str = "streamlit_app.py"):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / script), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def assert_only_an_error(at, *words: str) -> None:
    """One st.error naming the problem, and nothing else: no banner, title, button, uploader or navigation."""
    assert len(at.error) == 1, [e.value for e in at.error]
    for word in words:
        assert word in at.error[0].value, at.error[0].value
    assert not at.warning and not at.info and not at.title and not at.button and not at.markdown
    assert not at.get("file_uploader") and not at.sidebar.children
    assert len(at.main.children) == 1


# --- (a), (b), (c): a broken configuration refuses to serve -------------------------------------------------------
def test_a_one_character_toml_typo_refuses_to_serve(secrets_file, tmp_path):
    secrets_file.write_text(GOOD_AUTH.replace('client_id = "cnmc-test"', 'client_id = "cnmc-test'))  # no closing "
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(secrets_file.read_text())
    at = run_app(tmp_path)
    assert_only_an_error(at, str(secrets_file), "cannot be read as TOML")
    assert not (tmp_path / "runs").exists()


def test_auth_without_client_id_refuses_to_serve(secrets_file, tmp_path):
    secrets_file.write_text(GOOD_AUTH.replace('client_id = "cnmc-test"\n', ""))
    assert_only_an_error(run_app(tmp_path), "[auth] has no client_id", "docs/lab-server.md")


def test_the_example_secrets_file_as_shipped_refuses_to_serve(secrets_file, tmp_path):
    secrets_file.write_text(EXAMPLE.read_text())
    assert_only_an_error(run_app(tmp_path), "cookie_secret is the placeholder")


@pytest.mark.parametrize("script", ["pages/classify.py", "pages/train.py", "pages/misclassified.py"])
def test_a_page_run_on_its_own_refuses_too(script, secrets_file, tmp_path):
    secrets_file.write_text(EXAMPLE.read_text())
    at = run_app(tmp_path, script)
    assert [e.value for e in at.error] and "cookie_secret" in at.error[0].value
    assert not at.get("file_uploader") and not at.button


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace(GOOD_SECRET, "short-but-not-the-example"), "shorter than 32 characters"),
    (lambda t: t.replace(GOOD_SECRET, "cnmc-dashboard"), "placeholder"),  # any value of the example file
    (lambda t: t.replace('redirect_uri = "http://127.0.0.1:8501/oauth2callback"\n', ""), "[auth] has no redirect_uri"),
    (lambda t: t.replace('client_secret = "not-a-secret"', 'client_secret = ""'), "[auth] has no client_secret"),
    (lambda t: "\n".join(t.splitlines()[:3]) + '\n[auth.keycloak]\nclient_id = "c"\nclient_secret = "s"\n',
     "[auth.keycloak] has no server_metadata_url"),
    (lambda t: "\n".join(t.splitlines()[:3]) + "\n", "names no provider"),
    (lambda t: 'api_key = "x"\n', "has no [auth] section"),
])
def test_what_is_wrong_is_named(edit, problem, secrets_file):
    secrets_file.write_text(edit(GOOD_AUTH))
    mode = auth._server_mode(auth._config_stamp())
    assert (mode.mode, problem in mode.reason) == ("refused", True), mode


def test_a_complete_auth_section_turns_sign_in_on(secrets_file):
    secrets_file.write_text(GOOD_AUTH)
    assert auth._server_mode(auth._config_stamp()).mode == "sign-in"
    assert secrets_check.auth_problems(tomllib.loads(GOOD_AUTH)["auth"]) == []
    named = tomllib.loads(GOOD_AUTH.replace("client_id", "[auth.lab]\nclient_id"))["auth"]  # a named provider
    assert secrets_check.auth_problems(named) == [] and auth.providers(named) == ["lab"]


# --- local mode only on loopback, without a proxy, or when forced -------------------------------------------------
def test_local_mode_needs_loopback_and_no_secrets(no_secrets, monkeypatch):
    from streamlit import config

    mode = auth.auth_mode()
    assert (mode.mode, mode.forced) == ("local", False) and "127.0.0.1" in mode.reason
    saved = config.get_option("server.address")
    try:
        _set_option("server.address", "0.0.0.0")
        mode = auth.auth_mode()
        assert mode.mode == "refused" and "0.0.0.0" in mode.reason and "docs/lab-server.md" in mode.reason
        monkeypatch.setenv(auth.LOCAL_MODE_ENV, "1")
        mode = auth.auth_mode()
        assert (mode.mode, mode.forced) == ("local", True)
    finally:
        _set_option("server.address", saved)


def test_proxy_headers_turn_local_mode_into_refused(no_secrets, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "_request_headers", lambda: {"x-forwarded-for": "203.0.113.7"})
    assert_only_an_error(run_app(tmp_path), "x-forwarded-for", "docs/lab-server.md")
    monkeypatch.setattr(auth, "_request_headers", lambda: {"forwarded": "for=203.0.113.7;proto=https"})
    assert auth.auth_mode().mode == "refused"
    assert auth.proxy_header({"Host": "127.0.0.1:8501", "X-Forwarded-For": "1.2.3.4"}) == "x-forwarded-for"
    assert auth.proxy_header({"host": "127.0.0.1:8501"}) is None


def test_cnmc_local_mode_1_forces_local_mode_and_says_so(no_secrets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(auth, "_request_headers", lambda: {"x-forwarded-for": "203.0.113.7"})
    monkeypatch.setenv(auth.LOCAL_MODE_ENV, "1")
    auth._server_mode.cache_clear()
    with caplog.at_level(logging.INFO, logger="cnmc.auth"):
        at = run_app(tmp_path, "pages/data.py")  # a light page: the mode, the sidebar, no model to load
        at.run()
    mode = auth.auth_mode()
    assert (mode.mode, mode.forced) == ("local", True) and "CNMC_LOCAL_MODE=1" in mode.reason
    assert not at.error
    logged = [r.getMessage() for r in caplog.records if r.name == "cnmc.auth"]
    assert len([m for m in logged if "auth mode: local" in m and "CNMC_LOCAL_MODE=1" in m]) == 1, logged  # once


def test_cnmc_local_mode_1_in_the_sidebar(no_secrets, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(auth.LOCAL_MODE_ENV, "1")

    def sidebar() -> None:
        from dashboard import auth as a

        a.sidebar_ui(a.current_actor())

    at = AppTest.from_function(sidebar, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert any("CNMC_LOCAL_MODE=1" in w.value for w in at.sidebar.warning), [w.value for w in at.sidebar.warning]


def test_sign_in_wins_over_cnmc_local_mode(secrets_file, monkeypatch):
    secrets_file.write_text(GOOD_AUTH)
    monkeypatch.setenv(auth.LOCAL_MODE_ENV, "1")
    assert auth.auth_mode().mode == "sign-in"  # an env variable never switches configured sign-in off


# --- identities that cannot be claimed ----------------------------------------------------------------------------
ROLES = f"""[users]
"{ADMIN}" = "admin"
"{ISSUER}#8a1c-sub-of-ben" = "trainer"
"https://login.microsoftonline.com/tenant/v2.0#oid-of-eve" = "reviewer"
"""


@pytest.fixture()
def roles(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text(ROLES)
    return auth.load_roles(path)


def test_an_unverified_email_naming_an_admin_gets_no_role(roles):
    claims = {"iss": ISSUER, "sub": "attacker", "email": ADMIN, "email_verified": False, "groups": []}
    actor = auth.actor_from_claims(claims, roles)
    assert actor.role == "none" and actor.identity == f"{ISSUER}#attacker"  # recorded as who it is, not the email
    assert auth.actor_from_claims({**claims, "email_verified": None}, roles).role == "none"  # absent: unverified
    assert auth.actor_from_claims({**claims, "email_verified": True}, roles).role == "admin"
    with pytest.raises(auth.PermissionDenied, match="verified email"):
        auth.actor_from_claims({"email": ADMIN}, roles)  # nothing to name the person by


def test_a_sub_keyed_roles_entry_works(roles):
    ben = auth.actor_from_claims({"iss": ISSUER, "sub": "8a1c-sub-of-ben", "email": "ben@x", "email_verified": False},
                                 roles)
    assert (ben.identity, ben.role) == (f"{ISSUER}#8a1c-sub-of-ben", "trainer")
    other_issuer = {"iss": "https://accounts.google.com", "sub": "8a1c-sub-of-ben"}
    assert auth.actor_from_claims(other_issuer, roles).role == "none"  # same sub, another provider: not Ben
    eve = {"iss": "https://login.microsoftonline.com/tenant/v2.0", "sub": "pairwise", "oid": "oid-of-eve"}
    assert auth.actor_from_claims(eve, roles).role == "reviewer"  # Entra's oid


def test_identity_claim_must_be_one_a_person_cannot_choose(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text('identity_claim = "preferred_username"\n')
    with pytest.raises(ValueError, match="identity_claim"):
        auth.load_roles(path)


# --- CSV exports ----------------------------------------------------------------------------------------------------
def test_a_formula_cell_is_escaped_and_a_negative_number_stays_a_number():
    table = pd.DataFrame({"file": ['=HYPERLINK("http://evil.example","x")', "UID_1_1_1_all.bmp", "+1", "@a", "-b"],
                          "logit": [-1.5, 0.25, 1.0, 2.0, 3.0]})
    out = escape_cells(table)
    assert out["file"].tolist() == ['\'=HYPERLINK("http://evil.example","x")', "UID_1_1_1_all.bmp", "'+1", "'@a",
                                    "'-b"]
    assert out["logit"].tolist() == [-1.5, 0.25, 1.0, 2.0, 3.0] and out["logit"].dtype == float
    assert table["file"].iloc[0].startswith("=")  # the caller's table is untouched
    back = pd.read_csv(io.StringIO(safe_csv(table)))
    assert back["logit"].iloc[0] == -1.5 and back["file"].iloc[0].startswith("'=")


def test_label_overrides_escape_the_typed_text_only(tmp_path):
    from dashboard import services

    runs = tmp_path / "runs"
    reviewer = auth.Actor("=cmd|' /C calc'!A0", "reviewer")
    services.record_review(runs, "UID_1_1_1_all.bmp", "all", "label is wrong", "=HYPERLINK(\"x\")", actor=reviewer)
    frozen = pd.read_csv(services.export_overrides(runs, actor=reviewer), dtype=str)
    assert frozen["note"].tolist() == ["'=HYPERLINK(\"x\")"] and frozen["reviewer"].iloc[0].startswith("'=")
    assert (frozen["name"].iloc[0], frozen["label"].iloc[0]) == ("UID_1_1_1_all.bmp", "hem")  # exact: trains as is


# --- a Host allow-list ------------------------------------------------------------------------------------------------
def test_a_request_naming_another_host_is_refused(no_secrets, tmp_path, monkeypatch):
    monkeypatch.setenv(auth.ALLOWED_HOSTS_ENV, "cnmc.lab.example, *.lab.test, 127.0.0.1")
    monkeypatch.setattr(auth, "_request_headers", lambda: {"host": "rebound.attacker.example:8501"})
    assert_only_an_error(run_app(tmp_path), "rebound.attacker.example", auth.ALLOWED_HOSTS_ENV)
    for host, ok in (("cnmc.lab.example", True), ("CNMC.lab.example:443", True), ("a.lab.test", True),
                     ("lab.test", False), ("127.0.0.1:8501", True), ("", False)):
        assert (auth.host_refusal({"host": host}, auth.allowed_hosts()) is None) == ok, host
    monkeypatch.setattr(auth, "_request_headers", lambda: {"host": "127.0.0.1:8501"})
    assert auth.auth_mode().mode == "local"
    monkeypatch.delenv(auth.ALLOWED_HOSTS_ENV)
    assert auth.host_refusal({"host": "anything"}, auth.allowed_hosts()) is None  # no list: any host


# --- the Train page takes no typed server path --------------------------------------------------------------------
@pytest.fixture()
def train_page(no_secrets, tmp_path, monkeypatch):
    """The Train page in local mode over a weights root with one file; no timing of batches."""
    from dashboard import services

    (tmp_path / "weights" / "lab").mkdir(parents=True)
    (tmp_path / "weights" / "lab" / "start.weights.h5").write_bytes(b"h5")
    monkeypatch.setenv("CNMC_WEIGHTS_ROOTS", str(tmp_path / "weights"))
    monkeypatch.setenv("CNMC_DEMO_DATA", str(tmp_path / "demo"))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "roots"))
    monkeypatch.setattr(services, "run_estimate", lambda *a, **k: "About a minute (stand-in)")
    monkeypatch.setattr(services, "has_gpu", lambda: False)
    return lambda: run_app(tmp_path, "pages/train.py")


def test_the_train_page_offers_weights_files_from_the_roots_only(train_page):
    at = train_page()
    assert not [t for t in at.text_input if t.label == "Weights file"]
    init = next(s for s in at.selectbox if s.label == "Start from (init)")
    init.set_value("weights file").run()
    assert not at.exception, at.exception
    weights = next(s for s in at.selectbox if s.label == "Weights file")
    assert weights.options == ["weights/lab/start.weights.h5"]
    assert any(s.label == "Data source" for s in at.selectbox)


def test_a_viewer_sees_no_server_path_inputs_on_the_train_page(train_page, monkeypatch):
    viewer = auth.Actor("vera@lab.example", "viewer")
    monkeypatch.setattr(auth, "current_actor", lambda: viewer)
    at = train_page()
    labels = [s.label for s in at.selectbox]
    assert "Data source" not in labels and "Weights file" not in labels
    assert "weights file" not in next(s for s in at.selectbox if s.label == "Start from (init)").options
    assert next(b for b in at.button if b.label == "Launch training").disabled
