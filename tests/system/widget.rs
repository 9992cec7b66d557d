//! The web widget against the real relay: it runs only on the team's listed origins and with the
//! team's current key; every crew message reaches the open widget whole, even one synced late with
//! an earlier time; and the customers' limits hold (per session across sockets, sockets per
//! session, presence floods, trusted proxies, silent sockets).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::domain::{ConversationId, MessageBody, TeamId, Timestamp};
use crewdesk::sync::wire::WireMessage;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::{Duration, Instant};
use system_tests::{Agent, RawClient, Socket, TestRelay, eventually, follow, next_json, typing_seen, widget_socket};
use tokio_tungstenite::tungstenite::Message as Frame;

const SHOP: &str = "http://shop.test:8088";
const ELSEWHERE: &str = "http://elsewhere.test";

fn allow_shop(relay: &TestRelay) {
    relay.open_store().set_widget_origins(&TeamId("sales".into()), &[SHOP.to_owned()]).unwrap();
}

/// `POST /api/widget/{key}/conversations` as a page on `origin` (or a program, with none).
async fn start_chat(relay: &TestRelay, key: &str, origin: Option<&str>, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}/api/widget/{key}/conversations", relay.url()))
        .json(&serde_json::json!({ "name": "Maya Hansen", "email": "maya@example.com", "text": "Hello?" }));
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

async fn started(relay: &TestRelay, key: &str) -> (String, ConversationId) {
    let r = start_chat(relay, key, Some(SHOP), &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    (v["session"].as_str().unwrap().to_owned(), ConversationId(v["conversation"].as_str().unwrap().to_owned()))
}

/// Messages the widget receives until `done` holds for all of them (at most `secs`).
async fn messages_until(ws: &mut Socket, secs: u64, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut all = Vec::new();
    while !done(&all) {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs().max(1);
        assert!(Instant::now() < deadline, "timed out; the widget got {all:#?}");
        if let Some(v) = next_json(ws, left).await
            && v["type"] == "messages"
        {
            all.extend(v["messages"].as_array().unwrap().iter().cloned());
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_runs_only_on_the_teams_origins_with_its_current_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, _tokens) = TestRelay::start(dir.path().to_owned()).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    assert!(key.starts_with("wk_") && key != "sales", "{key}");
    let client = reqwest::Client::new();
    let preflight = |path: String, origin: &'static str, headers: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", relay.url()))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", headers)
            .send()
    };

    // The shop's page may start a chat: the preflight and the answer say so.
    let ok = preflight(format!("/api/widget/{key}/conversations"), SHOP, "content-type").await.unwrap();
    assert_eq!(ok.status().as_u16(), 204);
    assert_eq!(ok.headers()["access-control-allow-origin"], SHOP);
    assert!(ok.headers()["access-control-allow-headers"].to_str().unwrap().contains("content-type"));
    let r = start_chat(&relay, &key, Some(SHOP), &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], SHOP);
    let session = r.json::<Value>().await.unwrap()["session"].as_str().unwrap().to_owned();

    // Another site may not: no preflight, no readable answer, no conversation.
    let refused = preflight(format!("/api/widget/{key}/conversations"), ELSEWHERE, "content-type").await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert!(!refused.headers().contains_key("access-control-allow-origin"));
    let r = start_chat(&relay, &key, Some(ELSEWHERE), &[]).await;
    assert_eq!(r.status().as_u16(), 403);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // ... but its widget can tell why, from the settings route (which tells it nothing else).
    let why = client.get(format!("{}/api/widget/{key}/settings", relay.url())).header("origin", ELSEWHERE);
    let why = why.send().await.unwrap();
    assert_eq!(why.status().as_u16(), 403);
    assert_eq!(why.headers()["access-control-allow-origin"], ELSEWHERE);
    let text = why.text().await.unwrap();
    assert!(text.contains("not enabled on http://elsewhere.test") && !text.contains("Sales"), "{text}");
    let settings = client.get(format!("{}/api/widget/{key}/settings", relay.url())).header("origin", SHOP);
    let settings: Value = settings.send().await.unwrap().json().await.unwrap();
    assert_eq!(settings["team"], "Sales");
    assert!(!settings["greeting"].as_str().unwrap().is_empty());

    // Files: the upload's preflight (custom x-file-name header) follows the session's team.
    let upload = format!("/api/widget/blobs?session={session}");
    let ok = preflight(upload.clone(), SHOP, "content-type, x-file-name").await.unwrap();
    assert_eq!(ok.status().as_u16(), 204);
    assert!(ok.headers()["access-control-allow-headers"].to_str().unwrap().contains("x-file-name"));
    assert_eq!(preflight(upload, ELSEWHERE, "x-file-name").await.unwrap().status().as_u16(), 403);

    // The socket: the shop's page chats; another site's page is told why and closed.
    let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
    messages_until(&mut ws, 10, |m| m.iter().any(|m| m["text"] == "Hello?")).await;
    let mut other = widget_socket(&relay, &session, Some(ELSEWHERE)).await;
    let error = next_json(&mut other, 5).await.unwrap();
    assert_eq!(error["code"], "origin", "{error}");
    assert!(error["error"].as_str().unwrap().contains("not enabled on http://elsewhere.test"));
    let Some(Ok(Frame::Close(Some(close)))) = other.next().await else { panic!("closed") };
    assert_eq!(u16::from(close.code), 4003);

    // The team id is not a key; a rotated key retires the old snippet at once.
    assert_eq!(start_chat(&relay, "sales", Some(SHOP), &[]).await.status().as_u16(), 404);
    let new_key = relay.open_store().rotate_widget_key(&TeamId("sales".into())).unwrap();
    assert_ne!(new_key, key);
    assert_eq!(start_chat(&relay, &key, Some(SHOP), &[]).await.status().as_u16(), 404);
    assert_eq!(start_chat(&relay, &new_key, Some(SHOP), &[]).await.status().as_u16(), 200);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_crew_reply_with_an_earlier_time_still_reaches_the_open_widget_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let mut bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let (session, id) = started(&relay, &key).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
    messages_until(&mut ws, 10, |m| m.len() == 1).await;

    // Bob goes offline and writes a long reply with line breaks; its time is now.
    bob.disconnect().await;
    let long = format!("Hello Maya,\n\nyour parcel:\n{}\n\n— Bob", "left the warehouse today and ".repeat(20));
    let written_at = Timestamp::now();
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: long.clone() }, written_at).unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Meanwhile the customer writes twice (later times), and sees both.
    for t in ["Are you there?", "Hello??"] {
        ws.send(Frame::Text(serde_json::json!({ "type": "message", "text": t, "ref": t }).to_string().into()))
            .await
            .unwrap();
    }
    let got = messages_until(&mut ws, 10, |m| m.iter().filter(|m| m["from"] == "customer").count() == 2).await;
    assert!(got.iter().all(|m| m["at"].as_i64().unwrap() > written_at.0), "{got:#?}");

    // Bob is back: his earlier reply is synced after the later messages, and still arrives, whole.
    bob.reconnect();
    let got = messages_until(&mut ws, 15, |m| m.iter().any(|m| m["from"] == "crew")).await;
    let reply = got.iter().find(|m| m["from"] == "crew").unwrap();
    assert_eq!(reply["text"], long.as_str(), "the whole text, line breaks included");
    assert_eq!(reply["name"], "Bob Okafor");
    assert_eq!(reply["at"].as_i64().unwrap(), written_at.0);

    // A reconnect gets everything, in (time, id) order, each message once.
    drop(ws);
    let mut again = widget_socket(&relay, &session, Some(SHOP)).await;
    let all = messages_until(&mut again, 10, |m| m.len() >= 4).await;
    let texts: Vec<&str> = all.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["Hello?", long.as_str(), "Are you there?", "Hello??"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), messages_until(&mut again, 2, |m| !m.is_empty()))
            .await
            .is_err(),
        "nothing is sent twice"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_limited_per_session_across_sockets_and_sockets_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, _tokens) = TestRelay::start_with(dir.path().to_owned(), |c| c.widget_sockets_per_session = 2).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let (session, _id) = started(&relay, &key).await;
    let mut a = widget_socket(&relay, &session, Some(SHOP)).await;
    let mut b = widget_socket(&relay, &session, Some(SHOP)).await;
    // A third window of the same chat is refused, with the reason.
    let mut c = widget_socket(&relay, &session, Some(SHOP)).await;
    assert_eq!(next_json(&mut c, 5).await.unwrap()["code"], "sockets");
    let Some(Ok(Frame::Close(Some(close)))) = c.next().await else { panic!("closed") };
    assert_eq!(u16::from(close.code), 4008);

    // Twelve messages over two sockets of one session: ten are stored, two refused, each answered.
    for i in 0..6 {
        for (ws, side) in [(&mut a, "a"), (&mut b, "b")] {
            let m = serde_json::json!({ "type": "message", "text": format!("{side}{i}"), "ref": format!("{side}{i}") });
            ws.send(Frame::Text(m.to_string().into())).await.unwrap();
        }
    }
    let mut answers = Vec::new();
    for ws in [&mut a, &mut b] {
        let mut n = 0;
        while n < 6 {
            let v = next_json(ws, 10).await.expect("an answer per message");
            if v["type"] == "sent" || v["type"] == "error" {
                answers.push(v);
                n += 1;
            }
        }
    }
    let sent = answers.iter().filter(|v| v["type"] == "sent").count();
    let refused: Vec<&Value> = answers.iter().filter(|v| v["code"] == "rate").collect();
    assert_eq!((sent, refused.len()), (10, 2), "{answers:#?}");
    assert!(refused.iter().all(|v| v["error"].as_str().unwrap().contains("too fast") && v["ref"].is_string()));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_flood_reaches_the_crew_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let (session, id) = started(&relay, &key).await;
    // An agent's connection following the conversation counts the presence messages it gets.
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = automerge::Automerge::new();
    let request = automerge::sync::SyncDoc::generate_sync_message(&copy, &mut automerge::sync::State::new());
    let data = request.unwrap().encode();
    bob.send(&WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        data,
    })
    .await;
    let counter = tokio::spawn(async move {
        let (mut presence, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(6));
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), bob.next()).await {
                Ok(Some(WireMessage::Ephemeral { document_id, data, .. })) if document_id == id.0 => {
                    presence.push(crewdesk::sync::presence::decode(&data).unwrap().online);
                }
                Ok(None) => break,
                _ => {}
            }
        }
        presence
    });
    // 150 opens and closes in about two seconds.
    let started = Instant::now();
    for _ in 0..150 {
        let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
        ws.close(None).await.unwrap();
    }
    let flood = started.elapsed();
    let presence = counter.await.unwrap();
    let bound = 2 + flood.as_secs() as usize + 1;
    assert!(
        !presence.is_empty() && presence.len() <= bound,
        "{} presence messages for 300 opens and closes in {flood:?} (at most {bound})",
        presence.len()
    );
    assert_eq!(presence.last(), Some(&false), "in the end the customer is offline: {presence:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_proxies_name_the_customers_address() {
    use system_tests::mmdb::{GeoEntry, write};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("city.mmdb");
    std::fs::write(
        &db,
        write(&[
            GeoEntry {
                network: [127, 0, 0, 0].into(),
                prefix: 8,
                city: "Loopville",
                country: "Testland",
                iso_code: "TL",
            },
            GeoEntry { network: [10, 0, 0, 0].into(), prefix: 8, city: "Tentown", country: "Netland", iso_code: "NL" },
        ]),
    )
    .unwrap();
    let located = |trusted: bool| {
        let db = db.clone();
        move |c: &mut sync_server::Config| {
            c.geoip = Some(db.clone());
            c.widget_starts_per_ip = 2;
            if trusted {
                c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            }
        }
    };
    let location_of = |relay: &TestRelay, session: &str| {
        let store = relay.open_store();
        store.widget_session(session).unwrap().unwrap().1
    };
    // Default: nobody is trusted, the header is ignored (the address is the TCP peer's).
    let (mut relay, _) = TestRelay::start_with(dir.path().join("untrusted"), located(false)).await;
    let key = relay.widget_key("sales");
    let forged = [("x-forwarded-for", "10.1.2.3")];
    let r = start_chat(&relay, &key, None, &forged).await;
    let session = r.json::<Value>().await.unwrap()["session"].as_str().unwrap().to_owned();
    assert_eq!(location_of(&relay, &session).as_deref(), Some("Loopville, Testland"));
    assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", "10.9.9.9")]).await.status().as_u16(), 200);
    assert_eq!(
        start_chat(&relay, &key, None, &[("x-forwarded-for", "10.7.7.7")]).await.status().as_u16(),
        429,
        "a header cannot escape the per-address limit"
    );
    relay.stop().await;

    // Behind a trusted proxy: the address it names, counted per address (IPv6 per /64).
    let (mut relay, _) = TestRelay::start_with(dir.path().join("trusted"), located(true)).await;
    let key = relay.widget_key("sales");
    let r = start_chat(&relay, &key, None, &[("x-forwarded-for", "6.6.6.6, 10.1.2.3")]).await;
    let session = r.json::<Value>().await.unwrap()["session"].as_str().unwrap().to_owned();
    assert_eq!(location_of(&relay, &session).as_deref(), Some("Tentown, Netland"), "the entry our proxy added");
    assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", "10.1.2.3")]).await.status().as_u16(), 200);
    assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", "10.1.2.3")]).await.status().as_u16(), 429);
    assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", "10.4.5.6")]).await.status().as_u16(), 200);
    for (ip, status) in [("2001:db8:1:2::1", 200), ("2001:db8:1:2:ffff::9", 200), ("2001:db8:1:2:abcd::7", 429)] {
        assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", ip)]).await.status().as_u16(), status, "{ip}");
    }
    assert_eq!(start_chat(&relay, &key, None, &[("x-forwarded-for", "2001:db8:1:3::1")]).await.status().as_u16(), 200);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_widget_socket_that_answers_no_ping_is_closed_and_the_customer_goes_offline() {
    let dir = tempfile::tempdir().unwrap();
    // (The test relay pings every second: silent for three is closed.)
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let (session, id) = started(&relay, &key).await;
    bob.has(&id).await;
    let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
    eventually(5, "online", || bob.with(|r| r.summary(&id).is_some_and(|s| s.presence.online))).await;
    // Another customer's browser answers pings (tungstenite answers while reading) and stays.
    let (other_session, _) = started(&relay, &key).await;
    let mut active = widget_socket(&relay, &other_session, Some(SHOP)).await;
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            let read = tokio::time::timeout(Duration::from_millis(500), active.next()).await;
            if let Ok(Some(Ok(Frame::Close(_)) | Err(_)) | None) = read {
                return false;
            }
        }
        true
    });
    // This one stops answering (nothing reads the socket, so no pong goes back).
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The relay closed it: a close frame (4010) if it is still readable, or the connection is gone
    // (the relay closed with our unanswered pings unread, which resets the connection).
    let mut closed = None;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match frame {
            Ok(Frame::Close(c)) => {
                closed = Some(c.map_or(0, |c| u16::from(c.code)));
                break;
            }
            Ok(_) => {}
            Err(_) => {
                closed = Some(4010);
                break;
            }
        }
    }
    assert_eq!(closed, Some(4010), "closed for silence");
    assert!(reader.await.unwrap(), "a socket that answers pings stays open");
    eventually(5, "offline", || bob.with(|r| r.summary(&id).is_some_and(|s| !s.presence.online))).await;
    relay.stop().await;
}

/// 📝 An internal note is for the crew: the open widget never gets it, the customer's email never
/// carries it, and it does not answer the waiting customer; the reply after it arrives as usual.
/// ↪ A hand-over likewise never reaches the customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_notes_and_hand_overs_never_reach_the_widget_or_the_customers_email() {
    let sink = system_tests::SmtpSink::start().await;
    let smtp = sink.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start_with(dir.path().to_owned(), move |c| c.smtp = Some(smtp.clone())).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    // Maya Hansen, maya@example.com, "Hello?"
    let (session, id) = started(&relay, &key).await;
    bob.has(&id).await;
    carol.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
    messages_until(&mut ws, 10, |m| m.len() == 1).await;

    // Online: a note, then a reply. The widget gets the reply only; carol sees both.
    let note = "Customer is a reseller, check the B2B price list";
    bob.act(&id, |r| r.send(&id, MessageBody::Note { text: note.into() }, Timestamp::now()).unwrap());
    let waiting = || bob.with(|r| r.summary(&id).unwrap().waiting_since);
    assert!(waiting().is_some(), "a note does not answer the waiting customer");
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: "Hello Maya!".into() }, Timestamp::now()).unwrap());
    let got = messages_until(&mut ws, 10, |m| m.iter().any(|m| m["text"] == "Hello Maya!")).await;
    assert!(got.iter().all(|m| m["text"] != note), "{got:#?}");
    eventually(10, "carol sees the note", || carol.message_texts(&id).iter().any(|t| t.contains(note))).await;
    assert!(waiting().is_none(), "the reply answers her");

    // Offline (she closed the page, she left an email): a note, then a reply; one email, no note.
    drop(ws);
    eventually(10, "the desk shows the email fallback", || {
        bob.with(|r| r.conversation(&id, Timestamp::now()).unwrap().email_fallback)
    })
    .await;
    let second = "Second note: do not promise Friday";
    bob.act(&id, |r| r.send(&id, MessageBody::Note { text: second.into() }, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: "It ships on Monday.".into() }, Timestamp::now()).unwrap());
    eventually(15, "the email arrives", || sink.received().iter().any(|m| m.contains("It ships on Monday."))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails = sink.received();
    assert!(mails.iter().all(|m| !m.contains(note) && !m.contains(second)), "{mails:?}");
    // A note alone sends nothing.
    let before = sink.received().len();
    bob.act(&id, |r| r.send(&id, MessageBody::Note { text: "Third note".into() }, Timestamp::now()).unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), before, "a note alone sends no email");
    // ↪ A hand-over is for the crew too: carol is in the conversation, bob out, no email.
    bob.act(&id, |r| r.transfer(&id, &"carol".into(), Timestamp::now()).unwrap());
    eventually(10, "carol has it", || {
        carol.with(|r| r.summary(&id).is_some_and(|s| s.is_in_room(&"carol".into()) && !s.is_in_room(&"bob".into())))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), before, "a hand-over sends no email");
    // And a reconnecting widget never gets the notes or the hand-over either.
    let mut again = widget_socket(&relay, &session, Some(SHOP)).await;
    let all = messages_until(&mut again, 10, |m| m.iter().any(|m| m["text"] == "It ships on Monday.")).await;
    let crew_only = |t: &str| t.contains("note") || t.contains("carol") || t.contains("hand");
    assert!(all.iter().all(|m| !crew_only(m["text"].as_str().unwrap_or(""))), "{all:#?}");
    assert_eq!(all.len(), 3, "Hello?, Hello Maya!, It ships on Monday.: {all:#?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_other_side_named_by_the_relay_and_at_most_every_two_seconds() {
    use crewdesk::sync::presence::Typing;
    use system_tests::{typing_claim, widget_typing_frame};
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    allow_shop(&relay);
    let key = relay.widget_key("sales");
    let (session, id) = started(&relay, &key).await;
    let mut ws = widget_socket(&relay, &session, Some(SHOP)).await;
    messages_until(&mut ws, 10, |m| m.iter().any(|m| m["text"] == "Hello?")).await;
    // bob and carol follow the conversation.
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    bob.send(&follow(&id)).await;
    let mut carol = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(carol.join().await, WireMessage::Peer { .. }));
    carol.send(&follow(&id)).await;
    // carol listens all along (a connection that reads nothing stops answering pings).
    let carol_hears = {
        let id = id.clone();
        tokio::spawn(async move { typing_seen(&mut carol, &id, 6).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The customer types: 20 keystrokes' worth of frames in a second reach the crew once.
    for _ in 0..20 {
        ws.send(Frame::Text(r#"{"type":"typing"}"#.into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = typing_seen(&mut bob, &id, 2).await;
    assert_eq!(seen, [Typing::Customer], "once per two seconds");
    // bob's client claims ada is typing: the widget and carol hear that bob is.
    bob.send(&typing_claim(&id, "ada")).await;
    let frame = widget_typing_frame(&mut ws, 5).await;
    assert_eq!(frame["name"], "Bob Okafor");
    let seen = carol_hears.await.unwrap();
    assert_eq!(seen, [Typing::Customer, Typing::Crew("bob".into())], "named by the relay");
    relay.stop().await;
}
