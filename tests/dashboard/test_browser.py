"""The dashboard in a real headless Chromium against a real server and a real dispatcher."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet

from outbox.api import create_app
from outbox.settings import Settings
from tests.dispatch.conftest import DispatcherProcess, Reply, ScriptedProvider
from tests.e2e.conftest import free_port
from tests.gateway.conftest import write_events
from tests.integration.test_senders import HTTP_SECRET, SENDERS, http_sender, never_shown
from tests.support import ServerThread

SEND = "/api/v1/whatsapp/send/"
XSS = '<img src=x onerror="window.__xss=1">'
WAIT_MS = 20_000


def send(client: httpx.Client, headers: dict[str, str], text: str, **extra: Any) -> str:
    body = {"to": "5511999999999", "type": "text", "text": text, **extra}
    response = client.post(SEND, json=body, headers=headers)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_dashboard_shows_live_figures_retries_and_cancels(
    browser: Any,
    api: ServerThread,
    client: httpx.Client,
    auth: Callable[..., dict[str, str]],
    token: Callable[..., str],
    provider: tuple[ScriptedProvider, str],
    start_dispatcher: Callable[..., DispatcherProcess],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    scripted, _ = provider
    # A message whose text says "fail" is refused for good the first time (an error
    # message with markup in it: the page must show it as text), accepted after a retry.
    scripted.script = lambda call, n: (
        Reply(status=400, body={"error": {"message": XSS}})
        if b"fail" in call.body and n == 0
        else Reply(body={"id": f"prov-{call.task_id}"})
    )
    start_dispatcher()

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_console(message: Any) -> None:
        # The 401 and 403 of the refused tokens below are expected; nothing else is
        # (a CSP violation, a script error, a missing file).
        expected = ("(Unauthorized)", "(Forbidden)")
        if message.type == "error" and not message.text.endswith(expected):
            problems.append(f"console: {message.text}")

    page.on("console", on_console)
    expect.set_options(timeout=WAIT_MS)
    page.goto(f"{api.url}/dashboard")

    # No token yet: it asks. A user's token is refused (403), then an admin's opens it.
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token-input", token("user-1"))
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not an admin token")
    page.fill("#token-input", "not-a-jwt")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("Token refused")
    page.fill("#token-input", token("ops", admin=True))
    page.click("#login-form button[type=submit]")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")
    expect(page.locator("#count-sent")).to_have_text("0")
    assert page.evaluate("sessionStorage.getItem('outbox.adminToken')") is not None

    # Messages go out: the counts and the live tail follow.
    sent = [send(client, auth(), f"hello {i}") for i in range(3)]
    expect(page.locator("#count-sent")).to_have_text("3")
    for task_id in sent:
        expect(page.locator(f'#tail li[data-message-id="{task_id}"]')).to_contain_text("queued")
    expect(page.locator("#throughput-chart rect.sent")).not_to_have_count(0)
    expect(page.locator("#latency-figures")).to_contain_text("p95")

    # One fails: listed with its error (as text), then retried from the page.
    failed = send(client, auth("<b>eve</b>"), "please fail")
    row = page.locator(f'#failures tr[data-task-id="{failed}"]')
    expect(row).to_contain_text(XSS)
    expect(row).to_contain_text("<b>eve</b>")
    expect(page.locator("#count-error")).to_have_text("1")
    expect(page.locator(f'#tail li[data-message-id="{failed}"]')).to_contain_text("failed")
    assert page.locator("#failures img, #failures b").count() == 0
    assert page.evaluate("window.__xss") is None
    row.get_by_role("button", name="Retry").click()
    expect(page.locator("#notice")).to_contain_text(f"Requeued {failed}")
    expect(page.locator("#count-sent")).to_have_text("4")
    expect(page.locator("#count-error")).to_have_text("0")
    expect(row).to_have_count(0)
    retried = page.locator(f'#tail li[data-message-id="{failed}"]')
    expect(retried.filter(has_text="message_retrying")).to_have_count(1)
    expect(retried.filter(has_text="queued")).to_have_count(1)

    # One waits until tomorrow: cancelled from the page.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    later = send(client, auth(), "tomorrow", send_at=tomorrow)
    waiting = page.locator(f'#waiting tr[data-task-id="{later}"]')
    expect(waiting).to_be_visible()
    expect(page.locator("#count-pending")).to_have_text("1")
    waiting.get_by_role("button", name="Cancel").click()
    expect(page.locator("#notice")).to_contain_text(f"Cancelled {later}")
    expect(page.locator("#count-cancelled")).to_have_text("1")
    expect(page.locator("#count-pending")).to_have_text("0")
    expect(waiting).to_have_count(0)
    # The live tail announces it too.
    cancelled = page.locator(f'#tail li[data-message-id="{later}"]')
    expect(cancelled).to_contain_text("message_cancelled")
    expect(cancelled.locator(".badge.cancelled")).to_have_count(1)
    # Each status has its own look: a cancelled badge is struck through and grey.
    cancelled_badge = cancelled.locator(".badge.cancelled")
    expect(cancelled_badge).to_have_css("text-decoration-line", "line-through")
    expect(cancelled_badge).to_have_css("color", "rgb(93, 102, 112)")

    # Looking one up shows its history.
    page.fill("#lookup-input", failed)
    page.click("#lookup-form button[type=submit]")
    expect(page.locator("#lookup-result")).to_contain_text("#1 permanent")
    expect(page.locator("#lookup-result")).to_contain_text("#2 sent")

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"dashboard screenshot: {screenshot}")

    # Forgetting the token closes the feed and asks again.
    page.click("#forget")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "idle")
    assert page.evaluate("sessionStorage.getItem('outbox.adminToken')") is None
    assert problems == [], problems


@pytest.mark.parametrize(
    "path", ["/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"]
)
def test_dashboard_assets_are_served_with_a_strict_policy(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    kind = {"/dashboard": "text/html", ".js": "text/javascript", ".css": "text/css"}
    assert any(path.endswith(k) and response.headers["content-type"].startswith(v)
               for k, v in kind.items())  # fmt: skip
    # No way in for markup: text nodes and DOM attributes only.
    assert not re.search(rb"(inner|outer)HTML|insertAdjacentHTML|document\.write", response.content)


def test_dashboard_unknown_asset_is_a_404_in_the_error_shape(client: httpx.Client) -> None:
    response = client.get("/dashboard/secrets.txt")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.get("/dashboard/", follow_redirects=False).headers["location"] == "/dashboard"


def test_feed_reconnects_after_the_server_goes_away_and_misses_nothing(
    browser: Any,
    settings: Settings,
    token: Callable[..., str],
    sql_conn: psycopg.Connection,
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    port = free_port()

    def server() -> ServerThread:
        thread = ServerThread(create_app(settings))
        thread.server.config.port = port  # the same address after a restart
        return thread

    page = browser.new_page()
    with server() as first:
        page.goto(f"{first.url}/dashboard")
        page.fill("#token-input", token("ops", admin=True))
        page.click("#login-form button[type=submit]")
        expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")
        before = write_events(sql_conn, 1)
        expect(page.locator(f'#tail li[data-message-id="{before[0]}"]')).to_have_count(1)
    # The server is gone: the page says so and keeps trying.
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "down")
    expect(page.locator("#feed-state")).to_contain_text("reconnecting in")
    missed = write_events(sql_conn, 2)  # while no server runs
    with server():
        expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")
        # Resumed with ?since=: the events written meanwhile arrive, once each.
        for task_id in missed:
            expect(page.locator(f'#tail li[data-message-id="{task_id}"]')).to_have_count(1)
        expect(page.locator(f'#tail li[data-message-id="{before[0]}"]')).to_have_count(1)
        expect(page.locator("#count-sent")).to_have_text("3")


def test_senders_panel_shows_each_sender_and_pauses_and_resumes_one(
    browser: Any,
    settings: Settings,
    token: Callable[..., str],
    auth: Callable[..., dict[str, str]],
    sql_conn: psycopg.Connection,
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    keyed = settings.model_copy(update={"secret_key": Fernet.generate_key().decode()})
    with (
        ServerThread(create_app(keyed)) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        admin = auth("ops", admin=True)
        bulk = {"provider": "fake", "rate_limit": 25, "users": ["*"]}
        assert client.put(f"{SENDERS}/bulk", json=bulk, headers=admin).status_code == 201
        assert client.put(f"{SENDERS}/gw", json=http_sender(), headers=admin).status_code == 201
        send(client, auth(), "waits for a dispatcher")  # from default, no dispatcher runs

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
        )
        page.goto(f"{server.url}/dashboard")
        page.fill("#token-input", token("ops", admin=True))
        page.click("#login-form button[type=submit]")

        rows = page.locator("#senders tbody tr")
        expect(rows).to_have_count(3)
        assert rows.evaluate_all("rows => rows.map(r => r.dataset.senderId)") == [
            "default",
            "bulk",
            "gw",
        ]
        default = page.locator('#senders tr[data-sender-id="default"]')
        row = page.locator('#senders tr[data-sender-id="bulk"]')

        def cell(tr: Any, key: str) -> Any:
            return tr.locator(f'td[data-key="{key}"]')

        # The environment's sender says so, and may be paused; its message waits.
        expect(cell(default, "pending")).to_have_text("1")
        expect(cell(default, "actions")).to_contain_text("environment")
        expect(default.get_by_role("button", name="Pause")).to_have_count(1)
        expect(cell(row, "state")).to_have_text("active")
        expect(cell(row, "rate_limit")).to_have_text("25/s")
        expect(cell(row, "effective_rate")).to_have_text("25/s")
        expect(cell(row, "effective_rate")).not_to_have_class(re.compile(r"\breduced\b"))
        expect(cell(row, "pending")).to_have_text("0")
        expect(cell(row, "in_flight")).to_have_text("0")
        expect(cell(page.locator('#senders tr[data-sender-id="gw"]'), "rate_limit")).to_have_text(
            "unlimited"
        )

        # A reason being typed outlives the polls that refresh the panel.
        gw_reason = page.locator('#senders tr[data-sender-id="gw"] input.pause-reason')
        gw_reason.fill("half typed")
        shown = page.locator("#updated").text_content()
        expect(page.locator("#updated")).not_to_have_text(shown or "")
        expect(gw_reason).to_have_value("half typed")

        # Paused from the page, with a reason (shown as text, never as markup).
        reason = "maintenance <b>window</b>"
        row.locator("input.pause-reason").fill(reason)
        row.get_by_role("button", name="Pause").click()
        expect(page.locator("#notice")).to_contain_text("Paused bulk: now paused")
        expect(cell(row, "state")).to_have_text("paused")
        expect(cell(row, "reason")).to_contain_text(reason)
        assert row.locator("b").count() == 0
        view = client.get(f"{SENDERS}/bulk", headers=admin).json()
        assert view["state"] == "paused"
        assert view["paused"]["reason"] == reason and view["paused"]["manual"] is True
        expect(row.get_by_role("button", name="Pause")).to_have_count(0)

        # Resumed from the page.
        row.get_by_role("button", name="Resume").click()
        expect(page.locator("#notice")).to_contain_text("Resumed bulk: now active")
        expect(cell(row, "state")).to_have_text("active")
        expect(cell(row, "reason")).to_have_text("")
        expect(row.get_by_role("button", name="Pause")).to_have_count(1)
        view = client.get(f"{SENDERS}/bulk", headers=admin).json()
        assert view["state"] == "active" and view["paused"] is None

        # A provider's throttle halved bulk's rate (climbing back by 2.5/s); gw, without a
        # limit, learned 30/s and keeps to half of it: each cell says so at the next poll.
        sql_conn.execute(
            """UPDATE outbox.sender_state SET decreased_rate = 5, decreased_at = now()
               WHERE id = 'bulk'"""
        )
        sql_conn.execute(
            """UPDATE outbox.sender_state
               SET learned_limit = 30, decreased_rate = 15, decreased_at = now()
               WHERE id = 'gw'"""
        )
        reduced = re.compile(r"\breduced\b")
        expect(cell(row, "effective_rate")).to_have_class(reduced)
        expect(cell(row, "effective_rate")).to_have_attribute("title", re.compile("throttle"))
        shown_rate = float(cell(row, "effective_rate").text_content().removesuffix("/s"))
        assert 5 <= shown_rate < 25
        expect(cell(row, "rate_limit")).to_have_text("25/s")
        gw_rate = cell(page.locator('#senders tr[data-sender-id="gw"]'), "effective_rate")
        expect(gw_rate).to_have_text(re.compile(r"^\d+(\.\d)?/s learned$"))
        expect(gw_rate).to_have_class(reduced)

        # The environment's default is paused and resumed from the page too.
        default.get_by_role("button", name="Pause").click()
        expect(page.locator("#notice")).to_contain_text("Paused default: now paused")
        expect(cell(default, "state")).to_have_text("paused")
        expect(cell(default, "actions")).to_contain_text("environment")
        default.get_by_role("button", name="Resume").click()
        expect(page.locator("#notice")).to_contain_text("Resumed default: now active")
        expect(cell(default, "state")).to_have_text("active")
        events = sql_conn.execute(
            "SELECT event FROM outbox.events WHERE sender = 'default' ORDER BY id"
        ).fetchall()
        assert [event for (event,) in events] == ["sender_paused", "sender_resumed"]

        never_shown(page.content(), HTTP_SECRET)
        page.close()
    assert problems == [], problems


def test_dashboard_shows_each_messages_delivery_and_the_funnel(
    browser: Any,
    api: ServerThread,
    client: httpx.Client,
    auth: Callable[..., dict[str, str]],
    token: Callable[..., str],
    sql_conn: psycopg.Connection,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    # Four messages the provider accepted (as a dispatcher's completion leaves them) and
    # one still pending; then receipts, recorded as the webhooks record them.
    to = [f"55119000000{n:02d}" for n in range(5)]
    read, delivered, failed, accepted, pending = (send(client, auth(), "hi", to=t) for t in to)
    sql_conn.execute(
        """UPDATE outbox.messages
           SET status = 'sent', attempts = 1, updated_at = now(),
               finished_at = now() - interval '1 minute', provider_message_id = 'wamid.' || id
           WHERE id = ANY(%s::uuid[])""",
        [[read, delivered, failed, accepted]],
    )
    row = sql_conn.execute(
        "SELECT extract(epoch FROM now() - interval '1 minute')::float8"
    ).fetchone()
    assert row is not None
    finished = row[0]
    error = {"code": 131026, "title": "Message undeliverable", "details": "<b>not on WhatsApp</b>"}

    def record(*receipts: dict[str, Any]) -> None:
        items = [{"n": n, **receipt} for n, receipt in enumerate(receipts)]
        sql_conn.execute(
            "SELECT outbox.record_receipts(%s::jsonb, NULL)", [json.dumps(items)]
        ).fetchall()

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None
    )
    page.goto(f"{api.url}/dashboard")
    page.fill("#token-input", token("ops", admin=True))
    page.click("#login-form button[type=submit]")
    expect(page.locator("#feed-state")).to_have_attribute("data-state", "live")

    def delivery_of(task_id: str) -> Any:
        return page.locator(f'#messages tr[data-task-id="{task_id}"] .delivery-cell')

    # Before any receipt: accepted ones say so, the pending one shows none.
    expect(delivery_of(accepted)).to_have_text("✓ accepted")
    expect(delivery_of(read)).to_have_text("✓ accepted")
    expect(delivery_of(pending)).to_have_text("–")

    # Receipts arrive (4 s to delivered, 30 s to read; one failed): the table follows,
    # the live tail hears the message_status events.
    record(
        {"task_id": read, "status": "delivered", "at": finished + 4},
        {"id": f"wamid.{delivered}", "status": "delivered", "at": finished + 6},
        {"task_id": failed, "status": "failed", "at": finished + 2, "error": error},
    )
    record({"task_id": read, "status": "read", "at": finished + 30})
    expect(delivery_of(read)).to_have_text("✓✓ read")
    expect(delivery_of(read).locator(".badge.read")).to_have_attribute(
        "title", re.compile("delivered .*\nread ")
    )
    expect(delivery_of(delivered)).to_have_text("✓✓ delivered")
    expect(delivery_of(failed)).to_have_text("✗ failed")
    expect(delivery_of(failed).locator(".badge")).to_have_attribute(
        "title", re.compile("131026 · Message undeliverable · <b>not on WhatsApp</b>")
    )
    expect(delivery_of(accepted)).to_have_text("✓ accepted")
    status_events = page.locator(f'#tail li[data-message-id="{read}"]').filter(
        has_text="message_status"
    )
    expect(status_events.locator(".badge.read")).to_have_count(1)
    expect(status_events.locator(".badge.delivered")).to_have_count(1)
    expect(
        page.locator(f'#tail li[data-message-id="{failed}"]').filter(has_text="message_status")
    ).to_contain_text("131026 · Message undeliverable")
    # Read looks unlike delivered.
    read_color = delivery_of(read).locator(".badge").evaluate("b => getComputedStyle(b).color")
    delivered_color = (
        delivery_of(delivered).locator(".badge").evaluate("b => getComputedStyle(b).color")
    )
    assert read_color != delivered_color

    # The funnel of the last 24 hours: 4 accepted, 2 delivered (the read one too), 1 read,
    # 1 failed; medians 5 s to delivered (4 and 6), 30 s to read.
    funnel = page.locator('#funnel tr[data-sender="default"]')

    def cell(key: str) -> Any:
        return funnel.locator(f'td[data-key="{key}"]')

    expected = {"accepted": ("4", None), "delivered": ("2", "50 %"), "read": ("1", "25 %")}
    expected["failed"] = ("1", "25 %")
    for key, (count, share) in expected.items():
        expect(cell(key).locator(".count")).to_have_text(count)
        if share is not None:
            expect(cell(key).locator(".share")).to_have_text(share)
    expect(cell("to_delivered")).to_have_text("5.0 s")
    expect(cell("to_read")).to_have_text("30.0 s")
    expect(page.locator("#funnel-empty")).to_be_hidden()

    # The filter shows one state only (?delivery=).
    page.select_option("#delivery-filter", "read")
    rows = page.locator("#messages tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_have_attribute("data-task-id", read)
    page.select_option("#delivery-filter", "accepted")
    expect(rows).to_have_count(1)
    expect(rows).to_have_attribute("data-task-id", accepted)
    page.select_option("#delivery-filter", "")
    expect(rows).to_have_count(5)
    screenshot = tmp_path / "delivery.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")

    # Looking one up shows its delivery and the provider's reason, as text.
    page.fill("#lookup-input", failed)
    page.click("#lookup-form button[type=submit]")
    expect(page.locator("#lookup-result")).to_contain_text("✗ failed")
    expect(page.locator("#lookup-result")).to_contain_text("<b>not on WhatsApp</b>")
    assert page.locator("#lookup-result b, #messages b, #tail b").count() == 0
    page.close()
    assert problems == [], problems
