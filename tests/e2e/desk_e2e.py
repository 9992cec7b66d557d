#!/usr/bin/env python3
"""End-to-end tests of the Crewdesk desktop app: the real app (WebKitGTK) under Xvfb, driven by
WebDriver through tauri-driver, against a real relay seeded with the demo data.

Covers: filtering by each status (list = count), JOIN, a message one agent sends appearing on a
second agent's screen through the relay, sending while the relay is down and delivery after it
restarts, a grab race between two representatives (one wins, the other is told), CLOSE and the
conversation under Closed. Screenshots of the three blocks are saved as artifacts.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.options import ArgOptions
from selenium.webdriver.remote.file_detector import UselessFileDetector

STATUSES = ["online", "overdue", "soon", "rep-needed", "pending", "closed"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=30.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException, OSError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {what} (last error: {last})")


class SmtpSink:
    """A minimal SMTP server on loopback that keeps what it accepts (the email fallback's receiver)."""

    def __init__(self):
        import socketserver
        import threading
        self.mails = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"220 sink\r\n")
                data = None
                for raw in self.rfile:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if data is not None:
                        if line == ".":
                            sink.mails.append(data)
                            data = None
                            self.wfile.write(b"250 queued\r\n")
                        else:
                            data += line + "\n"
                        continue
                    verb = line.split(" ")[0].upper()
                    if verb == "DATA":
                        data = ""
                        self.wfile.write(b"354 end with .\r\n")
                    elif verb == "QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 ok\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Dovecot:
    """A real IMAP server (Debian's dovecot-imapd) for the Sales team's mailbox, on a free loopback
    port without TLS, its Maildir in `workdir`. Mail is delivered into it with IMAP APPEND."""

    USER, PASSWORD = "support@example.com", "mailbox-secret"

    def __init__(self, workdir):
        d = os.path.join(workdir, "dovecot")
        for sub in ("run", "state", "home"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(os.path.join(d, "users"), "w") as f:
            f.write(f"{self.USER}:{{PLAIN}}{self.PASSWORD}\n")
        self.password_file = os.path.join(d, "password")
        with open(self.password_file, "w") as f:
            f.write(self.PASSWORD + "\n")
        subprocess.run(["chown", "-R", "mail:mail", os.path.join(d, "home")], check=True)
        os.chmod(d, 0o755)
        os.chmod(workdir, 0o755)
        self.port = free_port()
        conf = os.path.join(d, "dovecot.conf")
        with open(conf, "w") as f:
            f.write(f"""protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{d}/home/%u/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
""")
        self.proc = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", conf])
        wait_for("Dovecot listens", lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True, 20)

    @property
    def url(self):
        return f"imap://support%40example.com@127.0.0.1:{self.port}/INBOX?tls=none"

    def deliver(self, mail):
        import imaplib
        m = imaplib.IMAP4("127.0.0.1", self.port)
        m.login(self.USER, self.PASSWORD)
        status, _ = m.append("INBOX", None, None, mail.replace("\r\n", "\n").replace("\n", "\r\n").encode())
        assert status == "OK", status
        m.logout()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def png(width, height):
    """A small RGB PNG with a gradient, written without image libraries."""
    import struct
    import zlib
    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 140)) for x in range(width))
                    for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Relay:
    def __init__(self, binary, workdir, smtp_port=None, seed_args=()):
        self.smtp_port = smtp_port
        self.binary, self.data, self.port = binary, os.path.join(workdir, "relay"), free_port()
        out = subprocess.run([binary, "--data-dir", self.data, "seed-demo", *seed_args], check=True, capture_output=True, text=True)
        self.seeded = out.stderr
        self.tokens = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
        # The widget runs on the shop's own origin (another port), which Sales allows.
        self.page_port = free_port()
        out = subprocess.run([binary, "--data-dir", self.data, "team", "sales", "--widget-origin", self.page_url],
                             check=True, capture_output=True, text=True)
        self.widget_key = next(l for l in out.stdout.splitlines() if l.startswith("widget key ")).split()[2].rstrip(";")
        self.serve_page()
        self.proc = None
        self.start()

    @property
    def page_url(self):
        return f"http://127.0.0.1:{self.page_port}"

    def serve_page(self):
        import http.server
        import threading
        demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../sync-server/widget/demo.html")
        with open(demo, encoding="utf-8") as f:
            page = f.read().replace("{{RELAY}}", self.url).replace("{{KEY}}", self.widget_key).encode()

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.page_port), Page)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        smtp = ["--smtp", f"127.0.0.1:{self.smtp_port}"] if self.smtp_port else []
        self.proc = subprocess.Popen([self.binary, "--data-dir", self.data, "serve", "--listen", f"127.0.0.1:{self.port}"] + smtp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("the relay listens", lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True, 20)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class App:
    """One agent's desktop app, in its own data directories, behind its own tauri-driver."""

    def __init__(self, name, args, relay, workdir, from_saved=False):
        """from_saved: started without the relay address and token in its environment, so the desk
        opens from what the earlier sign-in saved (the token from the keyring, or the file)."""
        self.name = name
        home = os.path.join(workdir, name)
        self.settings = os.path.join(home, "config", "app.crewdesk.desk", "settings.json")
        env = dict(os.environ)
        env.update({
            "XDG_DATA_HOME": os.path.join(home, "data"),
            "XDG_CONFIG_HOME": os.path.join(home, "config"),
            "XDG_CACHE_HOME": os.path.join(home, "cache"),
        })
        if from_saved:
            env.pop("CREWDESK_RELAY_URL", None)
            env.pop("CREWDESK_TOKEN", None)
        else:
            env.update({"CREWDESK_RELAY_URL": relay.url, "CREWDESK_TOKEN": relay.tokens[name]})
        options = ArgOptions()
        options.set_capability("browserName", "wry")
        options.set_capability("tauri:options", {"application": args.app})
        # Starting a WebDriver session occasionally fails right after another app quit: try again
        # with a fresh tauri-driver on fresh ports.
        for attempt in range(3):
            port, native = free_port(), free_port()
            self.driver_proc = subprocess.Popen([args.driver, "--port", str(port), "--native-port", str(native)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for("tauri-driver listens", lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 20)
                self.d = webdriver.Remote(command_executor=f"http://127.0.0.1:{port}", options=options)
                break
            except Exception as e:  # noqa: BLE001 - retried, then re-raised
                self.driver_proc.terminate()
                self.driver_proc.wait(10)
                if attempt == 2:
                    raise
                print(f"{name}: WebDriver session failed ({e!r}); retrying")
                time.sleep(2)
        # The app runs on this machine: file inputs take local paths (no upload command in WebKitWebDriver).
        self.d.file_detector = UselessFileDetector()
        wait_for(f"{name}'s desk", lambda: self.d.find_elements(By.CSS_SELECTOR, "#view-all"), 60)

    def css(self, selector):
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def click(self, selector):
        wait_for(f"{self.name}: click {selector}", lambda: self._click(selector))

    def _click(self, selector):
        els = self.css(selector)
        if not els:
            return False
        # A click on the element itself: rows and notes move as the lists re-sort.
        self.d.execute_script("arguments[0].click()", els[0])
        return True

    def text(self, selector):
        els = self.css(selector)
        return els[0].text if els else ""

    def count_of(self, entry):
        return int(self.text(f"#{entry} .count") or "0")

    def row(self, conversation):
        return f'li.row[data-id="{conversation}"]'

    def open(self, conversation):
        # Rows move as activity changes the order: click the element itself (not a screen position)
        # and check that this very conversation is the one open.
        def opened():
            rows = self.css(self.row(conversation))
            if rows and not self.css(self.row(conversation) + ".selected"):
                self.d.execute_script("arguments[0].click()", rows[0])
                time.sleep(0.3)
            return self.css(self.row(conversation) + ".selected") and self.css(".conversation .messages")
        wait_for(f"{self.name}: conversation {conversation} open", opened)

    def join_open(self):
        """JOIN the open conversation (retried while the header still offers it) until LEAVE shows."""
        def joined():
            if self.css("#conv-join"):
                self.click("#conv-join")
                time.sleep(0.3)
            return self.css("#leave") and self.css("#composer")
        wait_for(f"{self.name}: LEAVE and the composer after JOIN", joined)

    def pick_file(self, path, shown):
        """📎 through the hidden file input. WebKitWebDriver now and then sets the file without the
        change event reaching the page (no command runs, no error shows): pick it again then."""
        for attempt in range(3):
            self.css("#file-picker")[0].send_keys(path)
            try:
                wait_for(f"{self.name} sees {shown}", lambda: any(shown in m for m in self.messages()), 15)
                return
            except AssertionError:
                if attempt == 2:
                    raise
                print(f"{self.name}: the file input did not take {path}; picking it again")

    def messages(self):
        return [e.text for e in self.css(".messages li p")]

    def send(self, text):
        box = wait_for(f"{self.name}: composer", lambda: self.css("#composer"))[0]
        box.click()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def screenshot(self, path):
        self.d.save_screenshot(path)

    def quit(self):
        try:
            self.d.quit()
        finally:
            self.driver_proc.terminate()
            self.driver_proc.wait(10)


def arguments():
    """The flags every desktop script takes: the app, the relay, the driver and where screenshots go."""
    p = argparse.ArgumentParser()
    p.add_argument("--app", required=True)
    p.add_argument("--relay", required=True)
    p.add_argument("--driver", default="tauri-driver")
    p.add_argument("--artifacts", default="artifacts")
    return p


def main():
    args = arguments().parse_args()
    os.makedirs(args.artifacts, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="crewdesk-e2e-")
    smtp = SmtpSink()
    relay = Relay(args.relay, workdir, smtp.port)
    dovecot = Dovecot(workdir)
    apps = []
    try:
        bob = App("bob", args, relay, workdir)
        apps.append(bob)

        # The token is kept in the system keyring when the session has one (cargo xtask test runs
        # this under dbus-run-session with gnome-keyring), else in the settings file, readable by
        # the user only, and the desk says so, naming the file.
        kept = wait_for("where the token is kept", lambda: bob.css("#token-kept") and bob.text("#token-kept"))
        with open(bob.settings) as f:
            saved = f.read()
        if os.environ.get("CREWDESK_E2E_KEYRING") == "1":
            assert kept == "Token in the system keyring", kept
            assert relay.tokens["bob"] not in saved, "the token is not in the settings file"
            print("ok: the token is kept in the system keyring, not in the settings file")
        else:
            assert "no system keyring" in kept, kept
            assert bob.settings in bob.css("#token-kept")[0].get_attribute("title"), "the note names the file"
            assert relay.tokens["bob"] in saved and os.stat(bob.settings).st_mode & 0o777 == 0o600
            print("ok: without a keyring the token is kept in a 0600 file the desk names")

        # Red block: every status filter lists exactly as many conversations as its count says.
        for status in STATUSES:
            bob.click(f"#status-{status}")
            expected = bob.count_of(f"status-{status}")
            wait_for(f"list for {status}", lambda: bob.text(".list-title .muted").startswith(f"{expected} conversation"))
            rows = len(bob.css("li.row"))
            assert rows == expected, f"{status}: {rows} rows for a count of {expected}"
            print(f"ok: status {status} lists {expected}")
        bob.click("#view-all")
        wait_for("All Chatroom rows", lambda: len(bob.css("li.row")) > 0)
        bob.screenshot(os.path.join(args.artifacts, "desk-red-yellow-blocks.png"))

        # JOIN a Sales conversation that needs a representative.
        candidates = [r for r in bob.css("li.row") if "Sales" in r.text and r.find_elements(By.CSS_SELECTOR, "button.join")
                      and r.find_element(By.CSS_SELECTOR, "button.join").text == "JOIN"]
        assert candidates, "a Sales conversation with JOIN"
        conversation = candidates[0].get_attribute("data-id")
        bob.click(bob.row(conversation) + " button.join")
        bob.open(conversation)
        bob.join_open()
        print("ok: JOIN")

        # A message bob sends reaches carol's screen through the relay.
        carol = App("carol", args, relay, workdir)
        apps.append(carol)
        hello = f"Hello from the E2E test {int(time.time())}"
        bob.send(hello)
        wait_for("bob sees his message", lambda: hello in bob.messages())
        carol.open(conversation)
        wait_for("carol sees bob's message", lambda: hello in carol.messages())
        print("ok: message seen by a second agent")

        # 📃 A template fills the composer (placeholders filled) for editing; the edit is what goes.
        bob.click("#templates")
        bob.click(".menu button.template")
        filled = wait_for("the composer holds the template", lambda: bob.css("#composer")[0].get_attribute("value"))
        assert "{name}" not in filled and "{agent}" not in filled, filled
        assert bob.css("#from-template"), "the composer says which template it came from"
        box = bob.css("#composer")[0]
        box.send_keys(" (edited)")
        box.send_keys(Keys.ENTER)
        wait_for("carol sees the edited template", lambda: any(m.endswith("(edited) 📃 Greeting") or "(edited)" in m for m in carol.messages()))
        print("ok: a template filled, edited and sent")

        # 📃 An admin manages the team's templates in the desk: a mistyped placeholder is refused
        # inline with nothing typed lost; once saved, the relay holds it and the editor shows it.
        erin = App("erin", args, relay, workdir)
        apps.append(erin)
        erin.click("#templates-sales")
        wait_for("erin's template editor", lambda: erin.css("#templates-dialog .template-edit") or erin.css("#templates-empty"))
        before = len(erin.css("#templates-dialog .template-edit"))
        erin.click("#template-add")
        wait_for("a new template to fill", lambda: erin.css(f"#template-name-{before}"))[0].send_keys("Refund")
        erin.css(f"#template-text-{before}")[0].send_keys("Hello {nmae}, your refund is on its way.")
        erin.click("#templates-save")
        refused = wait_for("the refusal, inline", lambda: erin.text("#templates-error"))
        assert "unknown placeholder {nmae}" in refused, refused
        assert erin.css(f"#template-text-{before}")[0].get_attribute("value").startswith("Hello {nmae}"), "nothing typed is lost"
        time.sleep(0.5)  # the window paints what the page holds
        erin.screenshot(os.path.join(args.artifacts, "desk-templates-refused.png"))
        assert erin.text("#templates-error") == refused and erin.css(f"#template-name-{before}"), "still shown after the screenshot"
        box = erin.css(f"#template-text-{before}")[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("Hello {name}, your refund is on its way. {agent}")
        erin.click("#templates-save")
        wait_for("the editor closes once saved", lambda: not erin.css("#templates-dialog"))
        listed = subprocess.run([relay.binary, "--data-dir", relay.data, "list"], check=True, capture_output=True, text=True).stdout
        assert 'template "Refund": Hello {name}, your refund is on its way. {agent}' in listed, listed
        erin.click("#templates-sales")
        wait_for("the saved template in the editor", lambda: any(
            e.get_attribute("value") == "Refund" for e in erin.css("#templates-dialog input")))
        time.sleep(0.5)
        erin.screenshot(os.path.join(args.artifacts, "desk-templates.png"))
        assert any(e.get_attribute("value") == "Refund" for e in erin.css("#templates-dialog input")), "still shown"
        erin.click("#templates-cancel")
        apps.remove(erin)
        erin.quit()
        print("ok: an admin adds a template in the desk (a mistyped placeholder refused inline first)")

        # 📝 An internal note: shown apart, to the crew only.
        bob.click("#note-toggle")
        note_text = "Internal: this customer is a reseller"
        bob.send(note_text)
        wait_for("carol sees the note, marked as one", lambda: any(note_text in e.text for e in carol.css(".messages li.msg.note")))
        bob.click("#note-toggle")
        carol.screenshot(os.path.join(args.artifacts, "desk-internal-note.png"))
        print("ok: an internal note, shown apart")

        # 📎: a picked file is sent as an attachment message (by content hash) and shown to both.
        picked = os.path.join(workdir, "delivery-note.txt")
        with open(picked, "w") as f:
            f.write("Parcel 4471, left at the reception.\n" * 200)
        bob.pick_file(picked, "📎 delivery-note.txt")
        wait_for("carol sees the attachment", lambda: any("📎 delivery-note.txt" in m for m in carol.messages()))
        # Carol never had the file: Save downloads it from the relay's blob store (it went up when
        # bob sent it) into her Downloads folder.
        carol.click(".messages li .save-attachment")
        note = wait_for("carol saved the file", lambda: [e.text for e in carol.css(".attachment-note") if e.text.startswith("Saved to ")], 30)[0]
        saved = note[len("Saved to "):]
        with open(saved, "rb") as f, open(picked, "rb") as original:
            assert f.read() == original.read(), f"{saved} differs from what bob sent"
        os.remove(saved)
        # An image: carol sees a preview made by the relay.
        photo = os.path.join(workdir, "shelf.png")
        with open(photo, "wb") as f:
            f.write(png(480, 320))
        bob.pick_file(photo, "📎 shelf.png")
        wait_for("carol sees the photo's preview", lambda: carol.css(".messages .attachment img.thumb"), 30)
        bob.screenshot(os.path.join(args.artifacts, "desk-three-blocks.png"))
        carol.screenshot(os.path.join(args.artifacts, "desk-attachment-preview.png"))
        print("ok: attachments (upload, save, image preview)")

        # The relay goes down: the message waits (not synced), then arrives after the restart.
        relay.kill()
        wait_for("bob is offline", lambda: "Offline" in bob.text("#sync-state"), 40)
        offline = "Sent while the relay was down"
        bob.send(offline)
        wait_for("bob sees it unsynced", lambda: "not synced" in bob.text("#sync-state"))
        bob.screenshot(os.path.join(args.artifacts, "desk-offline.png"))
        assert offline not in carol.messages()
        relay.start()
        wait_for("carol receives the offline message", lambda: offline in carol.messages(), 60)
        wait_for("bob is synced again", lambda: "synced" in bob.text("#sync-state") and "not" not in bob.text("#sync-state"), 60)
        assert carol.messages().count(offline) == 1, "delivered once"
        print("ok: sent offline, delivered after the relay restarted")

        # CLOSE: the conversation moves to Closed.
        def close_it():
            if bob.css("#close"):
                bob.css("#close")[0].click()
                time.sleep(0.5)
            return "Closed" in bob.text(".head-actions")
        wait_for("CLOSE takes effect", close_it)
        bob.click("#status-closed")
        wait_for("the conversation is under Closed", lambda: bob.css(bob.row(conversation)))
        print("ok: CLOSE")

        # Keyboard only: move through the Joined list, open, focus the composer, send.
        bob.click("#view-joined")
        wait_for("Joined rows", lambda: len(bob.css("li.row")) >= 2)
        bob.d.execute_script("document.getElementById('conversation-list').focus()")
        keys = bob.d.switch_to.active_element
        keys.send_keys(Keys.ARROW_DOWN)
        keys.send_keys(Keys.ENTER)
        second = wait_for("the second row is open", lambda: bob.css("li.row.selected") and bob.css("li.row")[1].get_attribute("class").find("selected") >= 0 and bob.css("li.row")[1].get_attribute("data-id"))
        wait_for("its conversation shows", lambda: bob.css("#composer"))
        bob.d.execute_script("document.getElementById('conversation-list').focus()")
        bob.d.switch_to.active_element.send_keys("r")
        wait_for("r focuses the composer", lambda: bob.d.switch_to.active_element.get_attribute("id") == "composer")
        typed = "Typed without the mouse"
        bob.d.switch_to.active_element.send_keys(typed)
        bob.d.switch_to.active_element.send_keys(Keys.ENTER)
        wait_for("the keyboard message is sent", lambda: typed in bob.messages())
        assert bob.css(bob.row(second) + ".selected"), "sent in the conversation opened with the keyboard"
        print("ok: keyboard use")

        # ↪ TRANSFER between two running desks: bob hands the Sales conversation to carol. His desk
        # shows the hand-over and takes him out; carol's has her in it, with the hand-over in the
        # history, and she writes in it.
        bob.click("#status-closed")
        bob.open(conversation)
        bob.click("#transfer")
        bob.click("#transfer-carol")
        handed = "Bob Okafor handed this conversation to Carol Mendes"
        wait_for("bob sees the hand-over", lambda: handed in bob.messages())
        wait_for("bob is out of it", lambda: not bob.css("#leave") and not bob.css("#composer"))
        carol.click("#status-closed")
        carol.open(conversation)
        wait_for("carol sees the hand-over", lambda: handed in carol.messages(), 30)
        wait_for("carol is in it", lambda: carol.css("#leave") and carol.css("#composer"))
        assert carol.css(".messages li.msg.handover"), "the hand-over is shown apart"
        carol.send("Carol here, I'll take it from here")
        wait_for("bob sees carol's reply", lambda: "Carol here, I'll take it from here" in bob.messages())
        time.sleep(0.5)  # the window paints what the page holds
        carol.screenshot(os.path.join(args.artifacts, "desk-transfer.png"))
        print("ok: a conversation handed from one desk to another")

        # Grab: bob and dave (both representatives of the grab-mode Support team) grab the same one.
        dave = App("dave", args, relay, workdir)
        apps.append(dave)
        notes = wait_for("bob's Notifications", lambda: bob.css(".note button.grab"))
        target = notes[0].find_element(By.XPATH, "./ancestor::div[contains(@class,'note')]").get_attribute("data-id")
        wait_for("dave sees the same conversation", lambda: dave.css(f'.note[data-id="{target}"] button.grab'))
        # Both grab while the relay is unreachable, so neither can know of the other: both wait for
        # confirmation, and the relay decides when it is back.
        relay.kill()
        for a in (bob, dave):
            wait_for(f"{a.name} is offline", lambda: "Offline" in a.text("#sync-state"), 40)
        for a in (dave, bob):
            a.click(f'.note[data-id="{target}"] button.grab')
            wait_for(f"{a.name}'s grab awaits confirmation", lambda: "Awaiting confirmation" in a.text(f'.note[data-id="{target}"]'))
        dave.screenshot(os.path.join(args.artifacts, "desk-grab-awaiting.png"))
        relay.start()

        def outcome(app):
            note = app.css(f'.note[data-id="{target}"]')
            if not note:
                return "won"
            return "lost" if "Taken by another" in note[0].text else "waiting"
        wait_for("one wins, the other is told", lambda: sorted(outcome(a) for a in (bob, dave)) == ["lost", "won"], 60)
        loser = bob if outcome(bob) == "lost" else dave
        loser.screenshot(os.path.join(args.artifacts, "desk-grab-lost.png"))
        print("ok: grab race, one owner, the other told")

        # The web widget in headless Chromium: a customer writes; the agent sees Online and the
        # location; the agent's reply appears in the widget; after the customer leaves, the next reply
        # arrives by email exactly once.
        from selenium.webdriver.chrome.service import Service
        chrome_options = webdriver.ChromeOptions()
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={workdir}/chromium"]:
            chrome_options.add_argument(flag)
        chrome_options.binary_location = "/usr/bin/chromium"
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=chrome_options)
        try:
            browser.get(relay.page_url)
            widget = lambda: browser.find_element(By.ID, "crewdesk-widget").shadow_root
            in_widget = lambda css: widget().find_elements(By.CSS_SELECTOR, css)
            # The panel (and its title) is hidden until the launcher opens it: read the text itself.
            wait_for("the widget", lambda: in_widget("#title") and in_widget("#title")[0].get_attribute("textContent") == "Sales")
            in_widget("#launcher")[0].click()
            in_widget("#name")[0].send_keys("Ola Nordmann")
            in_widget("#email")[0].send_keys("ola@example.com")
            in_widget("#text")[0].send_keys("<b>Hei!</b> Is my order shipped?")
            in_widget("#send")[0].click()
            wait_for("the widget shows the message", lambda: in_widget(".msg.customer"))
            assert not in_widget("#messages b"), "text is never HTML"
            bob.click("#view-all")
            row = wait_for("bob sees the widget conversation", lambda: [r for r in bob.css("li.row") if "Ola Nordmann" in r.text])
            widget_conversation = row[0].get_attribute("data-id")
            bob.open(widget_conversation)
            # Without a GeoIP database the relay does not guess a location.
            wait_for("Online and Location in the header", lambda: "Online" in bob.text(".conv-head") and "Location: unknown" in bob.text(".conv-head"))

            bob.join_open()
            # Typing, both ways: the customer types, bob's desk says so; bob types, the widget says
            # so with his name (the relay names him, not his client).
            in_widget("#text")[0].send_keys("One more thing")
            wait_for("bob sees Ola typing", lambda: "Ola Nordmann is typing" in bob.text("#typing"), 15)
            bob.screenshot(os.path.join(args.artifacts, "desk-customer-typing.png"))
            box = bob.css("#composer")[0]
            box.send_keys("Let me check")
            wait_for("the widget shows bob typing", lambda: in_widget("#typing") and in_widget("#typing")[0].get_attribute("hidden") is None
                     and "Bob Okafor is typing" in in_widget("#typing")[0].get_attribute("textContent"), 15)
            browser.save_screenshot(os.path.join(args.artifacts, "widget-typing.png"))
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.BACKSPACE)
            in_widget("#text")[0].clear()
            print("ok: typing shown both ways")
            bob.screenshot(os.path.join(args.artifacts, "desk-web-widget-online.png"))
            bob.send("Hello Ola, it left the warehouse today.")
            wait_for("the widget shows the reply", lambda: any("it left the warehouse" in m.text for m in in_widget(".msg.crew")))
            # 📹: the invitation shows as a Join link in the widget.
            bob.click("#conference")
            join = wait_for("the widget shows Join", lambda: in_widget("a.join"))
            assert join[0].get_attribute("href").startswith("https://meet.jit.si/crewdesk-"), join[0].get_attribute("href")
            # 📎 from the customer: a photo sent in the widget reaches the agent with a preview.
            photo = os.path.join(workdir, "damaged-box.png")
            with open(photo, "wb") as f:
                f.write(png(320, 240))
            in_widget("#file")[0].send_keys(photo)
            wait_for("the widget shows its photo", lambda: in_widget(".msg.customer img.thumb"))
            wait_for("bob sees the customer's photo", lambda: bob.css(".messages .msg.customer .attachment img.thumb"), 30)
            browser.save_screenshot(os.path.join(args.artifacts, "widget.png"))
            bob.screenshot(os.path.join(args.artifacts, "desk-widget-photo.png"))
        finally:
            browser.quit()
        wait_for("offline with email fallback", lambda: "Email fallback activated" in bob.text(".composer"), 30)
        bob.send("We also emailed you the tracking number.")
        # (Earlier replies to offline demo customers were emailed too; count Ola's.)
        to_ola = lambda: [m for m in smtp.mails if "ola@example.com" in m]
        wait_for("the email arrives", to_ola, 30)
        time.sleep(4)
        assert len(to_ola()) == 1, f"exactly one email to the customer: {to_ola()}"
        assert "We also emailed you the tracking number." in to_ola()[0]
        assert "it left the warehouse" not in to_ola()[0], "replies seen in the widget are not emailed"
        print("ok: web widget in Chromium, presence, reply, Join link, customer photo, email fallback once")

        # ✉ The email channel end to end: a customer writes to the Sales address (a real IMAP
        # server), the mail shows as an Email conversation in bob's desk, and his reply reaches her
        # mailbox as a threaded reply (SMTP).
        subprocess.run([relay.binary, "--data-dir", relay.data, "team", "sales", "--imap", dovecot.url,
                        "--imap-password-file", dovecot.password_file], check=True, capture_output=True)
        dovecot.deliver("From: Maya Lindgren <maya.lindgren@example.org>\nTo: Sales <support@example.com>\n"
                        "Subject: Wrong size of my jacket\nMessage-ID: <jacket.1@example.org>\n\n"
                        "Hello, the jacket I got is an M, I ordered an L. Can you swap it?\n\nMaya\n")
        bob.click("#view-all")
        bob.d.execute_script("const el = document.getElementById('search'); el.value = arguments[0];"
                             "el.dispatchEvent(new InputEvent('input', {bubbles: true}));", "Lindgren")
        maya = wait_for("the email in bob's desk", lambda: [r.get_attribute("data-id") for r in bob.css("li.row")
                                                           if "Maya Lindgren" in r.text], 60)[0]
        bob.open(maya)
        wait_for("the mail's text", lambda: any("I ordered an L" in m for m in bob.messages()))
        assert "Email" in bob.text(".conversation"), bob.text(".conversation")[:300]
        bob.join_open()
        bob.send("Sorry about that, Maya! An L is on its way today.")
        to_maya = lambda: [m for m in smtp.mails if "maya.lindgren@example.org" in m]
        wait_for("the reply reaches Maya's mailbox", to_maya, 30)
        reply = to_maya()[0]
        assert "Subject: Re: Wrong size of my jacket" in reply, reply
        assert "In-Reply-To: <jacket.1@example.org>" in reply, reply
        assert "An L is on its way today." in reply, reply
        bob.screenshot(os.path.join(args.artifacts, "desk-email.png"))
        bob.d.execute_script("const el = document.getElementById('search'); el.value = '';"
                             "el.dispatchEvent(new InputEvent('input', {bubbles: true}));")
        print("ok: an email to the team's address is an Email conversation in the desk; the reply goes back threaded")

        # The rules change while bob is offline: he joins a Sales conversation and replies, and
        # meanwhile an admin switches Sales to grab mode. The relay refuses his join; his desk takes
        # the join and the reply back out, nothing stays unsynced, and the reply is shown as not
        # delivered with the reason and a Copy button.
        bob.click("#view-all")
        free = wait_for("a Sales conversation bob may JOIN", lambda: [
            r.get_attribute("data-id") for r in bob.css("li.row") if "Sales" in r.text
            and r.find_elements(By.CSS_SELECTOR, "button.join") and r.find_element(By.CSS_SELECTOR, "button.join").text == "JOIN"])[0]
        relay.kill()
        wait_for("bob is offline", lambda: "Offline" in bob.text("#sync-state"), 40)
        bob.open(free)
        bob.join_open()
        typed = "Typed on the train before Sales went to grab mode"
        bob.send(typed)
        wait_for("bob sees it unsynced", lambda: "not synced" in bob.text("#sync-state"))
        subprocess.run([relay.binary, "--data-dir", relay.data, "team", "sales", "--mode", "grab"], check=True, capture_output=True)
        relay.start()
        wait_for("the reply is shown as not delivered", lambda: "Not delivered" in bob.text("#undelivered") and typed in bob.text("#undelivered"), 60)
        wait_for("nothing waits unsynced", lambda: "not synced" not in bob.text("#sync-state"), 60)
        assert typed not in bob.messages(), "taken back out of the conversation"
        assert bob.css("#undelivered .copy-undelivered"), "a way to copy the text"
        bob.screenshot(os.path.join(args.artifacts, "desk-not-delivered.png"))
        print("ok: a reply refused because the rules changed offline is shown as not delivered, nothing stuck")

        # carol's desk starts again without the token in its environment: it opens from what her
        # sign-in saved.
        carol.quit()
        apps.remove(carol)
        carol = App("carol", args, relay, workdir, from_saved=True)
        apps.append(carol)
        wait_for("carol's desk syncs again", lambda: "Online" in carol.text("#sync-state"), 30)
        print("ok: a desk started again opens with the saved token")

        # An admin revokes bob's token while his desk is open: the desk says so within seconds and
        # offers to sign in again, which shows the sign-in form.
        subprocess.run([relay.binary, "--data-dir", relay.data, "revoke-token", "bob"], check=True, capture_output=True)
        wait_for("bob's desk says it was signed out", lambda: "Signed out" in bob.text("#sync-state"), 20)
        bob.screenshot(os.path.join(args.artifacts, "desk-signed-out.png"))
        bob.click("#sign-in-again")
        wait_for("the sign-in form", lambda: bob.css("#relay-url") and bob.css("#token"), 20)
        assert not os.path.exists(bob.settings), "signing out forgets the saved settings (and the keyring entry)"
        print("ok: a revoked token signs the desk out, and it offers to sign in again")
        print("E2E passed; screenshots in", args.artifacts)
    except BaseException:
        for a in apps:
            try:
                a.screenshot(os.path.join(args.artifacts, f"failure-{a.name}.png"))
            except Exception:  # noqa: BLE001 - best effort evidence
                pass
        raise
    finally:
        for a in apps:
            try:
                a.quit()
            except Exception:  # noqa: BLE001 - cleanup must not hide the test's own error
                pass
        if relay.proc and relay.proc.poll() is None:
            relay.kill()
        dovecot.stop()


if __name__ == "__main__":
    sys.exit(main())
