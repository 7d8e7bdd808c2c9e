"""What each user sees of the app behind the outpost: real logins through the dev IdP."""

from mitm_outpost.testing.assertions import assert_identity


def test_admin_sees_panel(outpost_login_as):
    alice = outpost_login_as("alice", groups=["admins", "staff"])
    page = alice.get("/")
    assert page.status_code == 200
    assert "Hello, alice" in page.text
    assert 'id="admin-panel"' in page.text
    assert alice.get("/admin").status_code == 200


def test_user_does_not(outpost_login_as):
    bob = outpost_login_as("bob", groups=["staff"])
    page = bob.get("/")
    assert page.status_code == 200
    assert "Hello, bob" in page.text
    assert "admin-panel" not in page.text
    assert bob.get("/admin").status_code == 403


def test_anonymous_is_sent_to_login(outpost_anonymous):
    response = outpost_anonymous.get("/admin")
    assert response.status_code == 302
    assert "/outpost.goauthentik.io/start?rd=" in response.headers["location"]
    # An API client (no text/html in Accept) gets 401 instead of a redirect.
    assert outpost_anonymous.get("/admin", headers={"Accept": "application/json"}).status_code == 401


def test_health_needs_no_login(outpost_anonymous):
    response = outpost_anonymous.get("/health")
    assert response.status_code == 200
    assert response.text == "ok"


def test_app_receives_identity_headers(outpost_login_as):
    carol = outpost_login_as(
        "carol", groups=["admins"], entitlements=["billing"], email="carol@corp.test", name="Carol C",
        attributes={"additionalHeaders": {"X-Team": "blue"}},
    )
    assert_identity(carol.get("/whoami"), "carol", groups=["admins"], entitlements=["billing"],
                    email="carol@corp.test", name="Carol C", uid="carol", headers={"X-Team": "blue"})


def test_same_user_different_groups_per_test(outpost_login_as):
    """Claims are declared by each login: alice is no admin here."""
    alice = outpost_login_as("alice", groups=[])
    assert alice.get("/admin").status_code == 403
    assert_identity(alice.get("/whoami"), "alice", groups=[])


def test_forward_auth_behind_nginx(outpost_forward_auth_nginx):
    anonymous = outpost_forward_auth_nginx.anonymous()
    assert anonymous.get("/admin").status_code == 302
    alice = outpost_forward_auth_nginx.login_as("alice", groups=["admins"])
    assert 'id="admin-panel"' in alice.get("/").text
    assert_identity(alice.get("/whoami"), "alice", groups=["admins"])
    bob = outpost_forward_auth_nginx.login_as("bob", groups=["staff"])
    assert bob.get("/admin").status_code == 403
