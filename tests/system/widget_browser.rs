//! The web widget in headless Chromium, embedded the way customers' websites embed it: the page is
//! served from another origin (a second port) than the relay. A customer starts a chat, a long
//! multi-line crew reply arrives whole with the representative's name, files go both ways, the
//! widget reconnects after the relay restarts, and a page on an origin the team does not list shows
//! why the chat is not available. Screenshots land in `artifacts/`.
//!
//! Driven through ChromeDriver's WebDriver protocol (plain HTTP and JSON) with Debian's chromium
//! and chromium-driver, which `cargo xtask test` installs.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::domain::{Author, MessageBody, TeamId, Timestamp};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use system_tests::{Agent, TestRelay, eventually, png};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const SHADOW: &str = "shadow-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session on a ChromeDriver this test started (both stopped on drop).
struct Browser {
    http: reqwest::Client,
    base: String,
    driver: std::process::Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(profile: &std::path::Path) -> Browser {
        let port = system_tests::free_port();
        let driver = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; `cargo xtask test` installs it)");
        system_tests::wait_listening(port).await;
        let http = reqwest::Client::new();
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1100,820", format!("--user-data-dir={}", profile.display())]
        }}}});
        let r: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {r}")).to_owned();
        Browser { http, base: format!("http://127.0.0.1:{port}/session/{id}"), driver }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        if let Some(e) = v["value"].get("error") {
            panic!("WebDriver {path}: {e} {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// An element inside the widget's shadow root.
    async fn widget(&self, css: &str) -> String {
        let host = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": "#crewdesk-widget" })),
            )
            .await;
        let host = host[ELEMENT].as_str().unwrap().to_owned();
        let root = self.call(reqwest::Method::GET, &format!("/element/{host}/shadow"), None).await;
        let root = root[SHADOW].as_str().unwrap().to_owned();
        let e = self
            .call(
                reqwest::Method::POST,
                &format!("/shadow/{root}/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        e[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.widget(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({}))).await;
    }

    async fn type_in(&self, css: &str, text: &str) {
        let e = self.widget(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({ "text": text }))).await;
    }

    /// Evaluates `expr` with `root` bound to the widget's shadow root (null before it exists).
    async fn eval(&self, expr: &str) -> Value {
        let script = format!(
            "const root = document.querySelector('#crewdesk-widget')?.shadowRoot; if (!root) return null; return ({expr});"
        );
        self.js(&script, json!([])).await
    }

    async fn wait_for(&self, secs: u64, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!([])) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// A shop's page on its own port (its own origin) that embeds the relay's widget.
async fn serve_page(relay: &str, key: &str, title: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>\
         <style>body{{font:18px Georgia,serif;margin:40px;background:#faf7f2}} button{{all:unset}} *{{color:#a00 !important}}</style></head>\
         <body><h1>{title}</h1><p>Handmade teapots since 1998.</p>\
         <script src=\"{relay}/widget.js\" data-key=\"{key}\" async></script></body></html>"
    );
    let app = axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(html) }));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (origin, task)
}

fn artifacts() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../artifacts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_on_another_origin_chats_with_the_crew_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().join("relay")).await;
    let key = relay.widget_key("sales");
    let (shop, _shop_task) = serve_page(&relay.url(), &key, "Teapot Shop").await;
    let (elsewhere, _other_task) = serve_page(&relay.url(), &key, "Copycat Shop").await;
    relay.open_store().set_widget_origins(&TeamId("sales".into()), std::slice::from_ref(&shop)).unwrap();
    assert_ne!(shop, relay.url(), "the page is not on the relay's origin");
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let browser = Browser::start(&dir.path().join("chromium")).await;

    // The customer opens the launcher and starts a chat.
    browser.goto(&shop).await;
    browser.wait_for(15, "the team's name in the widget", "root.querySelector('#title').textContent === 'Sales'").await;
    assert_eq!(browser.eval("root.querySelector('#launcher').getAttribute('aria-expanded')").await, "false");
    browser.click("#launcher").await;
    browser.type_in("#name", "Ola Nordmann").await;
    browser.type_in("#email", "ola@example.com").await;
    browser.type_in("#text", "<b>Hei!</b> Is my teapot shipped?").await;
    browser.click("#send").await;
    browser.wait_for(10, "the customer's message", "root.querySelectorAll('.msg.customer').length === 1").await;
    assert_eq!(browser.eval("root.querySelectorAll('.msg b').length").await, 0, "text is never HTML");
    let ola = |r: &mut crewdesk::replica::Replica| {
        r.stored_summaries().unwrap().into_iter().find(|s| s.customer.name == "Ola Nordmann").map(|s| s.id)
    };
    eventually(15, "bob has the conversation", || bob.with(ola).is_some()).await;
    let id = bob.with(ola).unwrap();

    // A long reply with line breaks arrives whole, with bob's name.
    let long = format!(
        "Hello Ola,\n\nyour teapot left our workshop this morning.\n{}\n\nBest regards,\nBob",
        "It is packed in straw and double-boxed so nothing can break on the way. ".repeat(8)
    );
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: long.clone() }, Timestamp::now()).unwrap());
    browser.wait_for(15, "bob's reply", "root.querySelectorAll('.msg.crew').length === 1").await;
    assert_eq!(browser.eval("root.querySelector('.msg.crew .body').textContent").await, long.as_str());
    assert_eq!(browser.eval("root.querySelector('.msg.crew .author').textContent").await, "Bob Okafor");
    let lines = browser.eval("root.querySelector('.msg.crew .body').getClientRects()[0].height > 200").await;
    assert_eq!(lines, true, "shown on many lines, not cut to one");
    browser.screenshot(&artifacts().join("widget-long-reply.png")).await;

    // Files both ways: the customer's photo reaches bob; bob's document reaches the widget.
    let photo = dir.path().join("cracked-lid.png");
    std::fs::write(&photo, png(320, 240)).unwrap();
    let file_input = browser.widget("#file").await;
    let path = photo.to_string_lossy().to_string();
    browser.call(reqwest::Method::POST, &format!("/element/{file_input}/value"), Some(json!({ "text": path }))).await;
    browser
        .wait_for(15, "the widget shows its photo", "root.querySelectorAll('.msg.customer img.thumb').length === 1")
        .await;
    eventually(15, "bob gets the photo", || {
        bob.with(|r| {
            r.stored_messages(&id).unwrap_or_default().iter().any(|m| {
                m.author == Author::Customer
                    && matches!(&m.body, MessageBody::Attachment { file_name, .. } if file_name == "cracked-lid.png")
            })
        })
    })
    .await;
    bob.attach(&id, "invoice.pdf", "application/pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\ninvoice for Ola\n");
    browser
        .wait_for(
            15,
            "bob's file in the widget",
            "root.querySelector('.msg.crew a.file')?.textContent.includes('invoice.pdf')",
        )
        .await;
    let href = browser.eval("root.querySelector('.msg.crew a.file').href").await;
    // (The link works once bob's app has uploaded the file.)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let file = reqwest::get(href.as_str().unwrap()).await.unwrap();
        if file.status().as_u16() == 200 {
            assert!(file.bytes().await.unwrap().starts_with(b"%PDF-1.4"));
            break;
        }
        assert!(Instant::now() < deadline, "bob's file downloads from the widget's link");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    browser.screenshot(&artifacts().join("widget-cross-origin.png")).await;

    // The relay restarts: the widget reconnects by itself and the next reply arrives.
    relay.stop().await;
    browser
        .wait_for(
            10,
            "the widget says it reconnects",
            "root.querySelector('#status').textContent.includes('Reconnecting')",
        )
        .await;
    relay.restart().await;
    browser.wait_for(20, "reconnected", "root.querySelector('#status').textContent === ''").await;
    bob.act(&id, |r| {
        r.send(&id, MessageBody::Text { text: "Anything else I can do?".into() }, Timestamp::now()).unwrap()
    });
    browser
        .wait_for(
            20,
            "the reply after the restart",
            "[...root.querySelectorAll('.msg.crew .body')].some(b => b.textContent === 'Anything else I can do?')",
        )
        .await;
    // Escape closes the panel and gives the focus back to the launcher; a reply meanwhile shows as unread.
    browser.js("document.querySelector('#crewdesk-widget').shadowRoot.querySelector('#text').focus()", json!([])).await;
    let text = browser.widget("#text").await;
    browser.call(reqwest::Method::POST, &format!("/element/{text}/value"), Some(json!({ "text": "\u{E00C}" }))).await;
    browser.wait_for(5, "the panel closed", "root.querySelector('#panel').hidden").await;
    assert_eq!(browser.eval("root.activeElement?.id").await, "launcher");
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: "One more thing.".into() }, Timestamp::now()).unwrap());
    browser.wait_for(15, "the unread badge", "root.querySelector('.badge').textContent === '1'").await;
    browser.screenshot(&artifacts().join("widget-unread.png")).await;

    // The same snippet on a page the team does not list: no chat, and it says why.
    browser.goto(&elsewhere).await;
    browser.wait_for(15, "the widget", "!!root.querySelector('#launcher')").await;
    browser.click("#launcher").await;
    let why = browser.wait_for(15, "the refusal", "root.querySelector('#status.error')?.textContent").await;
    assert!(why.as_str().unwrap().contains(&format!("not enabled on {elsewhere}")), "{why}");
    assert_eq!(browser.eval("root.querySelector('#send').disabled && root.querySelector('#form').hidden").await, true);
    assert_eq!(browser.eval("getComputedStyle(root.querySelector('#status')).display !== 'none'").await, true);
    browser.screenshot(&artifacts().join("widget-refused-origin.png")).await;
    relay.stop().await;
}
