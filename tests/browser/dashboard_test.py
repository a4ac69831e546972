"""The dashboard, end to end in headless Chromium.

Starts the mock upstream and aigate (with a configuration file full of comments), sends requests
through the gateway with the official openai SDK, and walks every dashboard page the way an
operator would: log in, overview, charts, logs (filter, open one, read its body, feedback), live
tail (pause, errors only), report (GO / NO-GO), settings (cache mode off, saved to the file with
its comments, the next request reports OFF, audit log), purge, delete by filter, log out.

Also checked on every page: no request leaves 127.0.0.1 and the console logs no JavaScript error.
Screenshots of every page are saved under $SCREENSHOTS.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import openai
from playwright.sync_api import expect, sync_playwright

BIN = Path(os.environ["AIGATE_BIN"])
SHOTS = Path(os.environ["SCREENSHOTS"])
CHROMIUM = os.environ["CHROMIUM"]
TOKEN = "dashboard-test-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, log):
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"process exited early:\n{Path(log).read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    sys.exit(f"{url} did not become ready")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="aigate-browser-"))
    mock_port, gw_port = free_port(), free_port()
    config = tmp / "aigate.toml"
    config.write_text(f"""# aigate for the dashboard test: keep this comment
listen = "127.0.0.1:{gw_port}"
data_dir = "{tmp / 'data'}"

[providers.openai]
base_url = "http://127.0.0.1:{mock_port}/v1"   # the mock upstream

[storage]
cache = "memory"

[gateways.default]                # the plain /v1 layout
[gateways.default.cache]
enabled = true
mode = "on"                       # on | shadow | off
ttl = "1h"                        # answers live an hour
[gateways.default.logs]
bodies = true                     # the record page shows them
[gateways.default.report]
min_hit_rate = 0.1
min_requests = 3

[gateways.staging]                # a second gateway, never used

[admin]
token = "env:AIGATE_TEST_ADMIN_TOKEN"
""")
    original = config.read_text()
    procs = []
    try:
        mock_log, gw_log = tmp / "mock.log", tmp / "gw.log"
        procs.append(subprocess.Popen([BIN / "aigate-mock", "--listen", f"127.0.0.1:{mock_port}", "--chunk-delay-ms", "2"],
                                      stdout=open(mock_log, "w"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([BIN / "aigate", "serve", "--config", str(config)],
                                      env=dict(os.environ, AIGATE_TEST_ADMIN_TOKEN=TOKEN),
                                      stdout=open(gw_log, "w"), stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{gw_port}"
        wait_ready(base + "/readyz", procs[1], gw_log)
        try:
            run(base, config, original)
        except BaseException:
            print("--- gateway log\n" + gw_log.read_text()[-4000:], file=sys.stderr)
            raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def run(base, config, original):
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)

    def chat(text, **kw):
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}], **kw)

    # Traffic: misses, a repeat (HIT), a stream, metadata, an upstream error.
    for text in ["What is a gateway?", "Name three colours", "What is a gateway?"]:
        chat(text)
    assert chat("What is a gateway?").headers["cf-aig-cache-status"] == "HIT"
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "Stream a haiku"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    chat("Tagged request", extra_headers={"cf-aig-metadata": json.dumps({"team": "search", "user_id": "u-42"})})
    try:
        chat("This one fails", extra_headers={"x-mock-status": "500"})
    except openai.InternalServerError:
        pass

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--disable-background-networking", "--disable-component-update",
                                           "--no-first-run"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        requests, problems = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        def shot(name, full=True):
            page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)

        try:
            # --- login: every page without a session is the login form
            page.goto(base + "/dashboard/gateways/default/logs?cached=true")
            assert "/dashboard/login" in page.url, page.url
            expect(page.get_by_label("Admin token")).to_be_focused()
            shot("01-login")
            page.get_by_label("Admin token").fill("not-the-token")
            page.get_by_role("button", name="Log in").click()
            expect(page.locator("#login-error")).to_contain_text("not the admin token")
            assert "/dashboard/login" in page.url
            # The refused login is answered 401, which the browser notes in its console.
            assert all("401" in p for p in problems), problems
            problems.clear()
            # The keyboard alone logs in: type the token, press Enter.
            page.get_by_label("Admin token").fill(TOKEN)
            page.keyboard.press("Enter")
            page.wait_for_url("**/dashboard/gateways/default/logs?cached=true")
            cookie = next(c for c in context.cookies() if c["name"] == "aigate_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
            assert cookie["expires"] > time.time() + 3600, cookie
            assert TOKEN not in cookie["value"]

            # --- overview: a card per gateway, figures from the requests above
            page.goto(base + "/dashboard")
            card = page.locator("section.gateway-card", has=page.get_by_role("heading", name="default"))
            expect(card.locator(".stat", has_text="Requests").locator("dd")).to_have_text("7")
            expect(card.locator(".stat", has_text="Cache hit rate").locator("dd")).not_to_have_text("0.0 %")
            expect(card.locator("canvas")).to_have_count(1)
            staging = page.locator("section.gateway-card", has=page.get_by_role("heading", name="staging"))
            expect(staging.locator(".base-url")).to_have_text(f"{base}/v1/local/staging/openai")
            staging.get_by_text("Python, Node and curl snippets").click()
            expect(staging.locator("pre.snippet").first).to_contain_text("from openai import OpenAI")
            for r in ["1h", "7d", "30d"]:
                page.get_by_role("link", name=r, exact=True).click()
                expect(card.locator(".stat", has_text="Requests").locator("dd")).to_have_text("7")
            shot("02-overview")
            shot("00-readme", full=False)
            page.set_viewport_size({"width": 390, "height": 844})
            page.goto(base + "/dashboard")
            expect(card.locator(".stat", has_text="Requests").locator("dd")).to_have_text("7")
            shot("02-overview-narrow")
            page.set_viewport_size({"width": 1280, "height": 900})

            # --- gateway: charts with values on hover, breakdown, before / after
            page.goto(base + "/dashboard/gateways/default?range=1h")
            expect(page.locator(".chart canvas")).to_have_count(5)
            chart = page.locator(".chart").first
            box = chart.locator(".u-over").bounding_box()
            page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] / 2)
            expect(chart.locator(".u-legend .u-series").nth(1).locator(".u-value")).not_to_have_text("–")
            expect(page.locator("table.breakdown tbody tr").first).to_contain_text("gpt-4o-mini")
            # the cache card: the most repeated request first, with its prompt
            expect(page.locator("#cache-top tbody tr").first).to_contain_text("What is a gateway?")
            page.get_by_label("Break down by").select_option("metadata")
            page.get_by_label("Metadata key").fill("team")
            page.get_by_label("Metadata key").press("Enter")
            expect(page.locator("table.breakdown")).to_contain_text("search")
            compare = page.locator("table.compare")
            expect(compare.locator("tr", has_text="Upstream calls")).to_be_visible()
            expect(compare.locator("tr", has_text="Requests").locator("td").nth(1)).to_have_text("7")
            shot("03-gateway")

            # --- logs: table, a filter as a link, one record with readable bodies, feedback
            page.goto(base + "/dashboard/gateways/default/logs")
            rows = page.locator("table.logs tbody tr")
            expect(rows).to_have_count(7)
            page.get_by_label("Cached").select_option("true")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url("**/logs?cached=true")
            expect(rows).to_have_count(2)  # the two repeats of "What is a gateway?"
            expect(rows.nth(0)).to_contain_text("HIT")
            expect(rows.nth(1)).to_contain_text("HIT")
            page.goto(base + "/dashboard/gateways/default/logs?metadata.team=search")
            expect(rows).to_have_count(1)
            expect(page.get_by_label("Metadata key")).to_have_value("team")
            page.goto(base + "/dashboard/gateways/default/logs?status=500")
            expect(rows).to_have_count(1)
            shot("04-logs")
            page.goto(base + "/dashboard/gateways/default/logs?metadata.team=search")
            rows.first.get_by_role("link").click()
            page.wait_for_url("**/logs/*")
            req_body = page.locator("section", has=page.get_by_role("heading", name="Request body")).locator("pre")
            expect(req_body).to_contain_text('"content": "Tagged request"')
            expect(req_body).to_contain_text('\n  "messages": [')
            expect(page.locator("section", has=page.get_by_role("heading", name="Metadata")).locator("dl.kv")).to_contain_text("search")
            page.get_by_role("button", name="Thumbs up").click()
            expect(page.get_by_text("Saved.")).to_be_visible()
            page.get_by_label("Score").fill("0.9")
            page.get_by_role("button", name="Save score").click()
            page.reload()
            expect(page.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
            expect(page.get_by_label("Score")).to_have_value("0.9")
            shot("05-log-record")
            # A stream's record shows its events.
            page.goto(base + "/dashboard/gateways/default/logs?model=gpt-4o-mini")
            page.locator("table.logs tbody tr").nth(2).get_by_role("link").click()  # the stream (3rd newest)
            resp = page.locator("section", has=page.get_by_role("heading", name="Response body"))
            expect(resp.locator("ol.events > li").first).to_contain_text('"object":"chat.completion.chunk"')
            expect(resp.locator("ol.events > li").last).to_contain_text("[DONE]")
            assert "base64" not in resp.inner_text()
            shot("05-log-stream")

            # --- live tail: new requests appear, pause holds them, errors only
            page.goto(base + "/dashboard/gateways/default/tail")
            expect(page.locator("#tail-status")).to_contain_text("Live")
            tail_rows = page.locator("#tail tbody tr")
            chat("Tail me")
            expect(tail_rows).to_have_count(1)
            page.get_by_role("button", name="Pause").click()
            chat("Held while paused")
            expect(page.locator("#tail-status")).to_contain_text("1 new records held")
            expect(tail_rows).to_have_count(1)
            page.get_by_role("button", name="Resume").click()
            expect(tail_rows).to_have_count(2)
            page.get_by_label("Errors only").check()
            chat("A success, not shown")
            try:
                chat("An error, shown", extra_headers={"x-mock-status": "503"})
            except openai.APIStatusError:
                pass
            expect(tail_rows).to_have_count(1)
            expect(tail_rows.first).to_contain_text("503")
            shot("06-tail")

            # --- report: the verdict
            page.goto(base + "/dashboard/gateways/default/report?since=24h")
            expect(page.locator("#verdict")).to_have_text("GO")
            expect(page.get_by_role("rowheader", name="Cache hit rate")).to_be_visible()
            shot("07-report")
            # A canary comparison: staging served nothing, so it cannot be a go.
            page.get_by_label("Candidate").select_option("staging")
            page.get_by_role("button", name="Compare").click()
            page.wait_for_url("**/report?since=24h&compare=staging")
            expect(page.locator("#compare-verdict")).to_have_text("NO-GO for staging")
            expect(page.locator("table.compare-gateways tr", has_text="Requests").locator("td").nth(0)).not_to_have_text("0")
            expect(page.locator("ul.checks")).to_contain_text("staging served 0 requests")
            shot("07-report-compare")

            # --- settings: cache mode off, live and in the file with its comments; audit; purge
            page.goto(base + "/dashboard/gateways/default/settings")
            expect(page.get_by_label("Cache mode")).to_have_value("on")
            page.get_by_label("Cache mode").select_option("off")
            page.get_by_label("TTL").fill("2h")
            page.get_by_role("button", name="Save").click()
            expect(page.locator("#settings-status")).to_contain_text("Saved and applied.")
            text = config.read_text()
            assert 'mode = "off"' in text and 'ttl = "2h"' in text, text
            for line in original.splitlines():
                if "#" in line and "mode =" not in line and "ttl =" not in line:
                    assert line in text, f"comment line lost: {line!r}\n{text}"
            assert "# on | shadow | off" in text and "# answers live an hour" in text, text
            _, headers = raw_chat(base, "What is a gateway?")
            assert headers["aigate-cache"] == "OFF", headers  # cf-aig-cache-status knows only HIT and MISS
            audit = page.locator("table.audit")
            expect(audit).to_contain_text("cache.mode")
            expect(audit).to_contain_text("cache.ttl")
            page.get_by_role("button", name="Purge cache…").click()
            page.get_by_role("button", name="Purge", exact=True).click()
            expect(page.get_by_text("Purged")).to_be_visible()
            shot("08-settings")
            page.keyboard.press("Escape")
            page.reload()
            expect(page.locator("table.audit")).to_contain_text("cache purge")

            # A change without the page's CSRF token is refused.
            r = context.request.put(base + "/dashboard/api/gateways/default/settings",
                                    data=json.dumps({"cache_mode": "on", "cache_ttl": "1h", "logs_enabled": True,
                                                     "log_bodies": True, "rate_limit": None}),
                                    headers={"content-type": "application/json"})
            assert r.status == 403, r.status
            assert 'mode = "off"' in config.read_text()

            # --- delete by filter, with confirmation
            page.goto(base + "/dashboard/gateways/default/logs?status=500")
            expect(page.locator("table.logs tbody tr")).to_have_count(1)
            page.get_by_role("button", name="Delete matching records…").click()
            expect(page.locator("dialog")).to_contain_text("status = 500")
            page.get_by_role("button", name="Delete", exact=True).click()
            expect(page.locator("dialog")).to_contain_text("Deleted 1 records.")
            page.wait_for_load_state("load")
            page.goto(base + "/dashboard/gateways/default/logs?status=500")
            expect(page.get_by_text("No records match.")).to_be_visible()
            page.goto(base + "/dashboard/gateways/default/logs")
            shot("04-logs-all")

            accessibility(browser, base, page.url)

            # --- unknown pages, then log out
            page.goto(base + "/dashboard/gateways/nope")
            expect(page.get_by_role("heading", name="Not found")).to_be_visible()
            expect(page.get_by_text("There is no gateway named")).to_be_visible()
            assert all("404" in p for p in problems), problems  # the page's own status
            problems.clear()
            page.goto(base + "/dashboard")
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url("**/dashboard/login")
            page.goto(base + "/dashboard/gateways/default/settings")
            assert "/dashboard/login" in page.url, page.url
            r = context.request.get(base + "/dashboard/api/overview")
            assert r.status == 401, r.status
        except BaseException:
            shot("failure")
            print("browser console:", problems, file=sys.stderr)
            raise

        off_host = [u for u in requests if urlparse(u).hostname != "127.0.0.1" and not u.startswith("data:")]
        assert not off_host, f"requests left 127.0.0.1: {off_host}"
        assert not problems, "browser console: " + "\n".join(problems)
        browser.close()
    print(f"dashboard browser test: ok ({len(requests)} browser requests, all to 127.0.0.1; screenshots in {SHOTS})")


def accessibility(browser, base, log_url):
    """axe-core on every page: no moderate, serious or critical violation (labels, contrast, roles).

    axe is injected as a script, which the pages' Content-Security-Policy forbids: this check runs
    in a context of its own that bypasses it.
    """
    axe = Path(os.environ["AXE"]).read_text()
    context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(base + "/dashboard/login")
    failures = []
    check(page, axe, "login", failures)
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/dashboard")
    record = None
    for name, path in [("overview", "/dashboard"), ("gateway", "/dashboard/gateways/default"),
                       ("logs", "/dashboard/gateways/default/logs"), ("tail", "/dashboard/gateways/default/tail"),
                       ("report", "/dashboard/gateways/default/report"),
                       ("settings", "/dashboard/gateways/default/settings")]:
        page.goto(base + path)
        check(page, axe, name, failures)
        if name == "logs":
            record = page.locator("table.logs tbody tr a").first.get_attribute("href")
    page.goto(base + record)
    check(page, axe, "log record", failures)
    context.close()
    assert not failures, "accessibility:\n" + "\n".join(failures)


def check(page, axe, name, failures):
    page.wait_for_function("() => !document.querySelector('main').textContent.includes('Loading…')")
    page.wait_for_timeout(300)  # charts and tables settle
    page.add_script_tag(content=axe)
    result = page.evaluate("() => axe.run(document, { resultTypes: ['violations'] })")
    print(f"axe {name}: {len(result['violations'])} rules violated "
          f"({', '.join(v['id'] + ':' + str(v['impact']) for v in result['violations']) or 'none'})")
    for v in result["violations"]:
        if v["impact"] in ("moderate", "serious", "critical"):
            targets = [n["target"] for n in v["nodes"]][:3]
            failures.append(f"{name}: {v['id']} ({v['impact']}): {v['help']} at {targets}")


def raw_chat(base, text):
    req = urllib.request.Request(base + "/v1/chat/completions", method="POST", headers={
        "authorization": "Bearer sk-test", "content-type": "application/json"},
        data=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}).encode())
    with urllib.request.urlopen(req) as r:
        return r.read(), {k.lower(): v for k, v in r.headers.items()}


if __name__ == "__main__":
    main()
