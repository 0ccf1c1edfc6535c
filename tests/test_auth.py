"""Sign-in and roles on a lab server: a local OpenID provider (oidc-provider-mock) on loopback, the app started with
a temporary secrets.toml and roles file, Chromium signing in as a viewer and as a reviewer; the roles module and the
service-layer checks without a browser."""
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import ARTIFACTS, CHROMIUM, FLAGS, free_port, serve_app

from dashboard import auth

REPO = Path(__file__).resolve().parent.parent
VIEWER, REVIEWER, STRANGER = "vera@lab.test", "rita@lab.test", "sam@elsewhere.test"
ROLES = f"""identity_claim = "email"
groups_claim = "groups"
default = "none"

[users]
"{VIEWER}" = "viewer"

[groups]
"cnmc-reviewers" = "reviewer"
"""


# --- roles and the service-layer checks (no browser) ----------------------------------------------------------
def verified(email: str) -> dict:
    """An ID token's claims for a person whose email the provider verified."""
    return {"iss": "https://idp.lab.test", "sub": f"sub-{email.lower()}", "email": email, "email_verified": True}


def test_roles_file_maps_identities_and_groups_to_the_highest_role(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text(ROLES + '"cnmc-admins" = "admin"\n')
    roles = auth.load_roles(path)
    assert auth.actor_from_claims(verified(VIEWER.upper()), roles).role == "viewer"  # emails without case
    rita = auth.actor_from_claims({**verified(REVIEWER), "groups": ["cnmc-reviewers", "x"]}, roles)
    assert (rita.identity, rita.role, rita.signed_in) == (REVIEWER, "reviewer", True)
    assert auth.actor_from_claims({**verified(VIEWER), "groups": "cnmc-admins"}, roles).role == "admin"  # highest
    assert auth.actor_from_claims(verified(STRANGER), roles).role == "none"
    assert auth.load_roles(tmp_path / "absent.toml").role_of(VIEWER) == "none"  # no roles file: nobody is let in
    path.write_text('[users]\n"a@b" = "superuser"\n')
    with pytest.raises(ValueError, match="'superuser' is not a role"):
        auth.load_roles(path)
    shipped = auth.load_roles(REPO / "roles.toml.example")  # the documented example parses
    assert shipped.role_of("ana.pathologist@lab.example") == "reviewer"


def test_every_writer_checks_the_role_in_the_service_layer(tmp_path):
    from dashboard import services
    from dashboard.settings import Settings
    from training.config import RunConfig

    runs = tmp_path / "runs"
    viewer = auth.Actor(VIEWER, "viewer")
    settings = Settings(runs_dir=runs, data_roots=(), demo_data=tmp_path / "demo")
    refused = {
        "review": lambda a: services.record_review(runs, "UID_1_1_1_all.bmp", "all", "label is wrong", actor=a),
        "export_overrides": lambda a: services.export_overrides(runs, actor=a),
        "launch": lambda a: services.launch_run(RunConfig(runs_dir=str(runs)), actor=a),
        "cancel": lambda a: services.cancel_run(runs, "r1", actor=a),
        "resume": lambda a: services.resume_run(runs, "r1", epochs=3, actor=a),
        "audit": lambda a: services.audit_trail(runs, actor=a),
    }
    for action, call in refused.items():
        with pytest.raises(auth.PermissionDenied, match=f"needs the {auth.ACTIONS[action][0]} role; you are "
                                                        f"signed in as {VIEWER} as viewer"):
            call(viewer)
        with pytest.raises(auth.PermissionDenied, match="needs an actor"):
            call(None)
    with pytest.raises(auth.PermissionDenied, match="Launching a training run needs the trainer role"):
        services.launch_demo(settings, actor=viewer)
    with pytest.raises(auth.PermissionDenied, match="no role"):
        services.classify_uploads(None, [], actor=auth.Actor(STRANGER, "none"))
    assert not (runs / "runs.db").exists() or services.label_reviews(runs).empty  # nothing written
    reviewer = auth.Actor(REVIEWER, "reviewer")
    services.record_review(runs, "UID_1_1_1_all.bmp", "all", "label is wrong", actor=reviewer)
    assert services.label_reviews(runs)["reviewer"].tolist() == [REVIEWER]
    assert services.export_overrides(runs, actor=reviewer).is_file()
    with pytest.raises(auth.PermissionDenied, match="needs the trainer role; you are signed in as rita"):
        services.cancel_run(runs, "r1", actor=reviewer)
    # local mode: one unauthenticated actor with every right; a review carries the name typed in the sidebar
    assert all(auth.LOCAL.can(a) for a in auth.ACTIONS) and not auth.LOCAL.signed_in
    services.record_review(runs, "UID_2_1_1_all.bmp", "all", "unsure", actor=auth.LOCAL.named("Dr Ana"))
    assert services.label_reviews(runs)["reviewer"].tolist() == [REVIEWER, "Dr Ana"]
    assert viewer.named("someone else").identity == VIEWER  # a signed-in identity cannot be renamed


@pytest.mark.parametrize("script", ["streamlit_app.py", "pages/classify.py", "pages/train.py", "pages/evaluate.py",
                                    "pages/misclassified.py", "pages/data.py"])
def test_sign_in_configured_and_signed_out_every_page_shows_only_sign_in(script, tmp_path, monkeypatch):
    """Each page, reached through the app or run on its own: the sign-in button and nothing else (AppTest)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CNMC_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(REPO / script), default_timeout=120)
    at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "s" * 32,
                          "client_id": "c", "client_secret": "x",
                          "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
    at.run()
    assert not at.exception, at.exception
    assert [b.label for b in at.button] == ["Sign in"]
    assert [t.value for t in at.title] == ["C-NMC leukemia workbench"]
    assert not at.text_input and not at.get("file_uploader") and not at.selectbox and not at.dataframe
    assert not (tmp_path / "runs").exists()  # nothing written, not even an empty run store


# --- the real thing: a provider, the app and Chromium ----------------------------------------------------------
@pytest.fixture()
def provider():
    """oidc-provider-mock on loopback: its authorization page lets the browser choose the subject; the claims of
    each subject are set here (as the lab's provider would hold them)."""
    import warnings

    import authlib.deprecate  # noqa: F401 - it sets its warnings to "always" on import: before the filter below

    with warnings.catch_warnings():  # the mock's own use of Authlib's deprecated modules: not this project's
        warnings.simplefilter("ignore", DeprecationWarning)
        import oidc_provider_mock

    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # plain http on loopback
    with oidc_provider_mock.run_server_in_thread() as server:
        url = f"http://localhost:{server.server_port}"
        for sub, claims in {VIEWER: {"email": VIEWER, "email_verified": True, "name": "Vera Viewer"},
                            REVIEWER: {"email": REVIEWER, "email_verified": True, "name": "Rita Reviewer",
                                       "groups": ["cnmc-reviewers"]},
                            STRANGER: {"email": STRANGER, "email_verified": True}}.items():
            req = urllib.request.Request(f"{url}/users/{quote(sub)}", method="PUT",
                                         data=__import__("json").dumps(claims).encode(),
                                         headers={"Content-Type": "application/json"})
            assert urllib.request.urlopen(req, timeout=10).status == 204
        yield url


@pytest.fixture()
def signed_in_app(provider, demo_run, tmp_path):
    """The app with sign-in on: a temporary secrets.toml (read through --secrets.files, so the repo's .streamlit
    is not touched) and roles file; a copy of the demo run store."""
    store, _, data = demo_run
    runs = shutil.copytree(store.root, tmp_path / "runs")
    port = free_port()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f"""[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{os.urandom(24).hex()}"
client_id = "cnmc-test"
client_secret = "not-a-secret"
server_metadata_url = "{provider}/.well-known/openid-configuration"
""")
    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES)
    with serve_app(runs, data, tmp_path, port=port, env={"CNMC_ROLES": str(roles), "AUTHLIB_INSECURE_TRANSPORT": "1"},
                   args=("--secrets.files", str(secrets))) as url:
        yield url, runs, roles


def sign_in(page, url: str, sub: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_placeholder("sub").fill(sub)  # the provider's authorization page: who signs in
    page.get_by_role("button", name="Authorize").click()
    page.get_by_text(f"Signed in as {sub}").wait_for(timeout=60_000)


def sign_out(page, url: str) -> None:
    page.get_by_role("button", name="Sign out").click()
    end_session = page.get_by_role("button", name="End session")  # the provider's logout page, when it has one
    try:
        end_session.wait_for(timeout=15_000)
        end_session.click()
    except Exception:  # noqa: BLE001 - a provider without an end-session page returns straight to the app
        pass
    page.get_by_text("Sign in to use this dashboard").wait_for(timeout=60_000)


def classify_a_cell(page, cell: Path) -> None:
    page.get_by_text("Classify cells").wait_for(timeout=60_000)
    page.locator("input[type=file]").first.set_input_files(str(cell))
    page.get_by_text(f"{cell.name}: ").first.wait_for(timeout=120_000)  # the cell's card: class or "Not assessed"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:get_jwt_config:DeprecationWarning")  # the mock provider's use of Authlib
def test_sign_in_as_viewer_and_reviewer_in_chromium(signed_in_app, cell_dir):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it (make browser-deps)")
    from playwright.sync_api import sync_playwright

    from dashboard import services
    from training.store import RunStore

    url, runs, roles_file = signed_in_app
    store = RunStore(runs)
    cell = cell_dir / "UID_h3_4_1_hem.bmp"
    before = (len(store.classifications()), len(store.reviews()))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)

        # signed out: every page asks for sign-in, shows nothing else and writes nothing
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for path in ("", "/train", "/misclassified", "/evaluate", "/data"):
            page.goto(url + path)
            page.get_by_text("Sign in to use this dashboard").wait_for(timeout=60_000)
            page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)
            for hidden in ("Classify cells", "New run", "Misclassified cells", "Review label", "Launch training"):
                assert page.get_by_text(hidden).count() == 0, (path, hidden)
            assert page.locator("input[type=file]").count() == 0
            for name in ("Train", "Misclassified", "Evaluate"):  # not even the pages' names
                assert page.get_by_text(name, exact=True).count() == 0, (path, name)
        page.screenshot(path=str(ARTIFACTS / "auth_signed_out.png"), full_page=True)
        assert (len(store.classifications()), len(store.reviews())) == before

        # a stranger (signed in, listed nowhere, default "none") is told why and sees nothing
        sign_in_as_stranger = page
        sign_in_as_stranger.goto(url)
        sign_in_as_stranger.get_by_role("button", name="Sign in").click()
        sign_in_as_stranger.get_by_placeholder("sub").fill(STRANGER)
        sign_in_as_stranger.get_by_role("button", name="Authorize").click()
        page.get_by_text(f"You are signed in as {STRANGER}, who has no role").wait_for(timeout=60_000)
        assert page.get_by_text("Classify cells").count() == 0
        sign_out(page, url)

        # the viewer classifies a cell; relabelling is refused, saying why; no audit-trail download
        sign_in(page, url, VIEWER)
        assert page.get_by_text("role viewer").first.is_visible()
        assert page.get_by_label("Reviewer").count() == 0  # no free-text reviewer box when signed in
        classify_a_cell(page, cell)
        page.get_by_text("Downloading the audit trail needs the admin role").wait_for(timeout=30_000)
        page.get_by_role("button", name="Review label").first.click()
        refusal = page.get_by_text(f"Relabelling needs the reviewer role; you are signed in as {VIEWER} as viewer")
        refusal.wait_for(timeout=30_000)
        assert page.get_by_role("button", name="Save review").count() == 0
        page.screenshot(path=str(ARTIFACTS / "auth_viewer_refused.png"), full_page=True)
        page.keyboard.press("Escape")
        mine = store.classifications()
        assert len(mine) == before[0] + 1 and mine.iloc[0]["file_name"] == cell.name
        assert mine.iloc[0]["source"] == f"dashboard by {VIEWER}"  # who classified it, from the sign-in
        page.goto(f"{url}/train")
        page.get_by_text("Launching a training run needs the trainer role").wait_for(timeout=60_000)
        assert page.get_by_role("button", name="Launch training").is_disabled()
        sign_out(page, url)

        # the same refusal from the service itself, for the viewer the roles file makes of the same claims
        viewer = auth.actor_from_claims({**verified(VIEWER), "name": "Vera Viewer"}, auth.load_roles(roles_file))
        with pytest.raises(auth.PermissionDenied, match=f"Relabelling needs the reviewer role; you are signed in "
                                                        f"as {VIEWER} as viewer"):
            services.record_review(runs, cell.name, "hem", "label is wrong", actor=viewer)
        assert len(store.reviews()) == before[1]

        # the reviewer (by the group claim) relabels the cell: recorded under the signed-in identity
        sign_in(page, url, REVIEWER)
        assert page.get_by_text("role reviewer").first.is_visible()
        classify_a_cell(page, cell)
        page.get_by_role("button", name="Review label").first.click()
        page.get_by_text("label is wrong").first.click()
        page.get_by_label("Note").first.fill("nucleus looks immature")
        page.get_by_role("button", name="Save review").first.click()
        end = time.time() + 30
        while time.time() < end and len(store.reviews()) == before[1]:
            time.sleep(0.5)
        page.screenshot(path=str(ARTIFACTS / "auth_reviewer_saved.png"), full_page=True)
        reviews = store.reviews()
        assert len(reviews) == before[1] + 1, reviews
        last = reviews.iloc[-1]
        assert (last["reviewer"], last["name"], last["decision"], last["note"]) == (
            REVIEWER, cell.name, "label is wrong", "nucleus looks immature")
        sign_out(page, url)
        browser.close()
