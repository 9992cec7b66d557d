//! 📃 A team's message templates through the relay: the admin command, the admins' API (with
//! its refusals: anonymous visitors, representatives, bodies over the limit) and the desks.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use system_tests::{Agent, TestRelay};

/// An admin manages a team's 📃 templates with `sync-server template`: added, replaced, refused
/// with a mistyped placeholder (nothing changes), removed; an agent's desk has them once it
/// connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_manages_message_templates_and_desks_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(system_tests::relay_binary());
        c.args(["--data-dir", relay.data.to_str().unwrap()]).args(args);
        if let Some(url) = &relay.store {
            c.env("CREWDESK_STORE", url);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let templates =
        || relay.open_store().teams().unwrap().into_iter().find(|t| t.id.as_str() == demo::SALES).unwrap().templates;
    let before = templates().len();
    let (ok, out) = run(&["template", demo::SALES, "--name", "Refund", "--text", "Hi {name}, {agent} here: refunded."]);
    assert!(ok, "{out}");
    let (ok, out) =
        run(&["template", demo::SALES, "--name", "Refund", "--text", "Hello {name}, your refund is on its way."]);
    assert!(ok, "{out}");
    let refund = templates().into_iter().find(|t| t.name == "Refund").unwrap();
    assert_eq!(refund.text, "Hello {name}, your refund is on its way.");
    assert_eq!(templates().len(), before + 1, "replaced, not added twice");
    // A mistyped placeholder is refused with the ones that exist; nothing changes.
    let (ok, out) = run(&["template", demo::SALES, "--name", "Refund", "--text", "Hi {nmae}"]);
    assert!(!ok && out.contains("unknown placeholder {nmae}") && out.contains("{agent}"), "{out}");
    assert_eq!(templates().into_iter().find(|t| t.name == "Refund").unwrap(), refund);
    let (ok, out) = run(&["template", demo::SALES, "--name", "Refund"]);
    assert!(!ok && out.contains("--text") && out.contains("--remove"), "{out}");
    // bob's desk gets the team's templates when it connects.
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let seen = bob.with(|r| r.teams().iter().find(|t| t.id.as_str() == demo::SALES).map(|t| t.templates.clone()));
    assert!(seen.unwrap().contains(&refund));
    let (ok, out) = run(&["template", demo::SALES, "--name", "Refund", "--remove"]);
    assert!(ok, "{out}");
    assert_eq!(templates().len(), before);
    let (ok, out) = run(&["template", demo::SALES, "--name", "Refund", "--remove"]);
    assert!(!ok && out.contains("no template named Refund"), "{out}");
    relay.stop().await;
}

/// Admins manage a team's templates from the desk through `PUT /api/teams/{team}/templates`: the
/// whole list is replaced and answered back; a representative is refused (403), an agent of
/// another team learns nothing (404), a list the core refuses changes nothing (400, saying why),
/// and a desk that connects afterwards has the new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_replace_a_teams_templates_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let put = |who: &str, body: serde_json::Value| {
        reqwest::Client::new()
            .put(format!("{}/api/teams/{}/templates", relay.url(), demo::SALES))
            .bearer_auth(&tokens[who])
            .json(&body)
            .send()
    };
    let templates =
        || relay.open_store().teams().unwrap().into_iter().find(|t| t.id.as_str() == demo::SALES).unwrap().templates;
    let list = serde_json::json!({ "templates": [
        { "name": "Greeting", "text": "Hi {name}, {agent} here." },
        { "name": "Bye", "text": "Thanks for writing,\n{agent}" },
    ]});
    let saved = put("ada", list.clone()).await.unwrap();
    assert_eq!(saved.status().as_u16(), 200);
    assert_eq!(saved.json::<serde_json::Value>().await.unwrap(), list);
    assert_eq!(templates().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["Greeting", "Bye"]);
    // Refused: a representative, an agent of another team, a mistyped placeholder, two of one name.
    let r = put("bob", serde_json::json!({ "templates": [] })).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("only admins of the team may manage its templates"));
    assert_eq!(put("dave", serde_json::json!({ "templates": [] })).await.unwrap().status().as_u16(), 404);
    let r = put("ada", serde_json::json!({ "templates": [{ "name": "Typo", "text": "Hi {nmae}" }] })).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("unknown placeholder {nmae}"));
    let twice = serde_json::json!({ "templates": [{ "name": "A", "text": "a" }, { "name": "A", "text": "b" }] });
    assert_eq!(put("ada", twice).await.unwrap().status().as_u16(), 400);
    assert_eq!(put("ada", serde_json::json!({ "templates": 5 })).await.unwrap().status().as_u16(), 400);
    // An anonymous visitor announcing 3 MiB is answered 404 before sending any of it; an admin's body
    // over the limit gets 413.
    let path = format!("/api/teams/{}/templates", demo::SALES);
    assert_eq!(raw_put(relay.addr, &path, None, 3 << 20, 0).await, 404);
    assert_eq!(raw_put(relay.addr, &path, Some(&tokens["ada"]), 3 << 20, 3 << 20).await, 413);
    assert_eq!(templates().len(), 2, "nothing refused was saved");
    // carol's desk connects and has the list.
    let carol = Agent::start(&relay, &tokens, "carol");
    carol.connected().await;
    let seen = carol.with(|r| r.teams().iter().find(|t| t.id.as_str() == demo::SALES).map(|t| t.templates.clone()));
    assert_eq!(seen.unwrap(), templates());
    relay.stop().await;
}

/// A PUT over a raw connection: the head announces `announced` bytes of body, then `sent` bytes
/// are written (in the background: the relay may answer and close before taking them all). The
/// status the relay answers with (0: closed without one), within 10 s.
async fn raw_put(addr: std::net::SocketAddr, path: &str, token: Option<&str>, announced: usize, sent: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n{auth}content-length: {announced}\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b' '; 64 * 1024];
        let mut left = sent;
        while left > 0 {
            let n = left.min(chunk.len());
            if write.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Keep the connection open until the answer is read.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.len() > 12 {
                break;
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|s| s.parse().ok()).unwrap_or(0)
}
