"""Headless Chromium (Debian chromium + chromium-driver, through python3-selenium) as an
administrator's browser: optionally signed in to the dashboard, it visits pages of other
origins that try to drive the admin, then uses the dashboard's own forms.

    csrf_browser.py ADMIN_URL [--token T] --evil URL [--evil URL...] --own

Each evil URL is served by this script on its own address (`http://127.0.0.2:P/` is
another site, `http://127.0.0.1:P/` the same site on another port). Prints one JSON
object: what each step saw. Loopback only.
"""

import argparse
import http.server
import json
import socketserver
import sys
import tempfile
import threading
import time
import urllib.parse

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def wait_for(driver, text):
    """Until the page holds `text` (the page a form led to), or 20 s; whether it did."""
    try:
        WebDriverWait(driver, 20).until(lambda d: text in d.page_source)
        return True
    except Exception:
        return False

EVIL = """<!DOCTYPE html><html><head><title>evil</title></head><body>
<iframe name="t1"></iframe><iframe name="t2"></iframe><iframe name="t3"></iframe><iframe name="t4"></iframe>
<form target="t1" method="post" action="{admin}/api/v1/onboarding/share">
  <input name="to" value="attacker@evil.test"></form>
<form target="t2" method="post" action="{admin}/api/v1/onboarding/outbound-ips/confirm">
  <input name="confirm" value="1"></form>
<form target="t3" method="post" action="{admin}/api/v1/queue/flush">
  <input name="x" value="1"></form>
<form target="t4" method="post" action="{admin}/api/v1/reload">
  <input name="x" value="1"></form>
<script>
// The title says "sent" once every request has had its answer (or 10 s went by), so the
// browser does not navigate away with requests still in flight.
const loaded = [...document.querySelectorAll('iframe')].map(
  f => new Promise(r => f.addEventListener('load', r, {{once: true}})));
for (const f of document.forms) f.submit();
const opts = {{method: 'POST', mode: 'no-cors', credentials: 'include'}};
const fetches = [
  fetch('{admin}/api/v1/queue/flush', opts),
  fetch('{admin}/api/v1/reload', Object.assign({{body: 'x', headers: {{'Content-Type': 'text/plain'}}}}, opts)),
  fetch('{admin}/api/v1/onboarding/share', Object.assign({{body: '{{"to":"attacker@evil.test"}}', headers: {{'Content-Type': 'text/plain'}}}}, opts)),
].map(p => p.catch(() => null));
const timeout = new Promise(r => setTimeout(r, 10000));
Promise.race([Promise.all([...loaded, ...fetches]), timeout]).then(() => {{ document.title = 'sent'; }});
</script></body></html>"""


def serve(url, admin):
    parsed = urllib.parse.urlparse(url)
    page = EVIL.format(admin=admin).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    srv = Server((parsed.hostname, parsed.port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("admin")
    ap.add_argument("--token")
    ap.add_argument("--evil", action="append", default=[])
    ap.add_argument("--own", action="store_true")
    args = ap.parse_args()
    servers = [serve(u, args.admin) for u in args.evil]
    # Chromium's profile goes with the run: the suite runs this several times per run.
    profile = tempfile.TemporaryDirectory(prefix="smartrelay-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--user-data-dir=" + profile.name]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    out = {"evil": []}
    try:
        driver.get(args.admin + "/")
        if args.token:
            driver.find_element(By.NAME, "token").send_keys(args.token)
            driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            out["signed_in"] = wait_for(driver, "smartrelay on")
            cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
            out["cookie_is_token"] = cookies.get("smartrelay_session") == args.token
        for u in args.evil:
            driver.get(u)
            try:
                WebDriverWait(driver, 20).until(lambda d: d.title == "sent")
            except Exception:
                pass
            out["evil"].append(driver.title)
        if args.own:
            driver.get(args.admin + "/")
            # Inside a collapsed <details>: clicked as a script would, the form still posts itself.
            driver.execute_script("document.getElementById('confirm-ips').click()")
            out["confirmed_page"] = wait_for(driver, 'data-step="outbound_ips" data-state="done"')
            driver.get(args.admin + "/")
            driver.find_element(By.NAME, "to").send_keys("dns-admin@partner.test")
            driver.find_element(By.ID, "share-spf").click()
            out["shared_page"] = wait_for(driver, 'id="shared"')
            if not out["shared_page"]:
                out["share_answer"] = driver.page_source[:2000]
            if args.token:
                driver.get(args.admin + "/")
                driver.find_element(By.ID, "logout").click()
                out["after_logout"] = wait_for(driver, "needs the admin token")
    finally:
        driver.quit()
        for s in servers:
            s.shutdown()
        profile.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
