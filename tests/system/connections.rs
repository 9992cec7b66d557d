//! Connections and credentials, tried as an attacker would (issue 16): every refusal says why,
//! connections are bounded, revocation reaches open sockets, bad tokens cost no database work.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::sync::wire::WireMessage;
use std::time::{Duration, Instant};
use system_tests::{RawClient, TestRelay};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The next `error` frame's text (other protocol messages are skipped), within a second.
async fn next_error(client: &mut RawClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_frame(left).await {
            Some(Frame::Binary(b)) => {
                if let WireMessage::Error { message, .. } = WireMessage::decode(&b).unwrap() {
                    return message;
                }
            }
            other => panic!("expected an error frame within a second, got {other:?}"),
        }
    }
}

/// The connection is still served: a `request` for an unknown document is answered.
async fn still_served(client: &mut RawClient) {
    let request = WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: "4NMNnkMhL8jXrdJ9jamS2qTnAyUq".into(),
        data: automerge::sync::Message::encode(
            automerge::sync::SyncDoc::generate_sync_message(
                &automerge::Automerge::new(),
                &mut automerge::sync::State::new(),
            )
            .unwrap(),
        ),
    };
    client.send(&request).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_frame(left).await {
            Some(Frame::Binary(b)) => match WireMessage::decode(&b).unwrap() {
                WireMessage::DocUnavailable { .. } | WireMessage::Error { .. } => return,
                _ => continue,
            },
            other => panic!("the connection was not kept: {other:?}"),
        }
    }
}

#[tokio::test]
async fn text_frames_and_unknown_types_are_answered_and_the_connection_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start(dir.path().into()).await;
    let mut client = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    // Before the handshake.
    assert!(client.send_raw(Frame::Text("hello?".into())).await);
    assert!(next_error(&mut client).await.contains("text frames are not part of the protocol"));
    assert!(matches!(client.join().await, WireMessage::Peer { .. }));
    // After it.
    assert!(client.send_raw(Frame::Text("{\"type\":\"sync\"}".into())).await);
    assert!(next_error(&mut client).await.contains("text frames are not part of the protocol"));
    client.send(&WireMessage::Other { kind: "subscribe-to-everything".into() }).await;
    let error = next_error(&mut client).await;
    assert!(error.contains("unknown message type \"subscribe-to-everything\""), "{error}");
    // automerge-repo's messages the relay has no use for are not errors.
    client.send(&WireMessage::Other { kind: "remote-subscription-change".into() }).await;
    still_served(&mut client).await;
}

/// A client frame header announcing `len` bytes of binary payload (masked, as clients must).
fn frame_header(len: u64) -> Vec<u8> {
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header
}

#[tokio::test]
async fn an_oversized_frame_is_closed_with_1009_and_the_limit_as_soon_as_its_header_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start_with(dir.path().into(), |c| c.max_frame_bytes = 1024 * 1024).await;
    for joined in [true, false] {
        let mut client = RawClient::connect(&relay, Some(&tokens["bob"])).await;
        if joined {
            assert!(matches!(client.join().await, WireMessage::Peer { .. }));
        }
        // 32 MiB announced; only 4 KiB of it ever sent.
        client.write_bytes(&[frame_header(32 * 1024 * 1024), vec![0; 4096]].concat()).await;
        let started = Instant::now();
        match client.next_frame(Duration::from_secs(3)).await {
            Some(Frame::Close(Some(close))) => {
                assert_eq!(close.code, CloseCode::Size, "joined: {joined}");
                assert!(close.reason.contains("33554432"), "{}", close.reason);
                assert!(close.reason.contains("limit of 1048576 bytes"), "{}", close.reason);
            }
            other => panic!("expected close 1009 (joined: {joined}), got {other:?} after {:?}", started.elapsed()),
        }
        assert!(started.elapsed() < Duration::from_secs(1), "closed after {:?}", started.elapsed());
    }
    // Everyone else is still served.
    let mut other = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(other.join().await, WireMessage::Peer { .. }));
    still_served(&mut other).await;
}

/// One attacker's connection: a request head announcing a 10 MiB body, then a byte every 300 ms
/// until the relay answers or closes. Returns the status code it got (0: closed without one) and
/// how long the connection stayed open; `None` if it was still open after 15 s.
async fn slow_body(addr: std::net::SocketAddr, key: String) -> Option<(u16, Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut read, mut write) = tcp.into_split();
    let head = format!(
        "POST /api/widget/{key}/conversations HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\ncontent-length: 10485760\r\n\r\n{{"
    );
    let _ = write.write_all(head.as_bytes()).await;
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        // Data that arrived before a reset is still read first.
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    trickle.abort();
    ended.ok()?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((status, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_over_the_caps_end_by_themselves_while_agents_sync_and_health_answers() {
    use crewdesk::domain::{Channel, MessageBody, Timestamp};
    use system_tests::Agent;
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start_with(dir.path().into(), |c| {
        c.max_connections = 150;
        c.max_connections_per_address = 60;
        c.body_timeout = Duration::from_secs(1);
        c.min_body_rate = 1024;
    })
    .await;
    let id = relay.customer_conversation(&tokens["ada"], "sales", Channel::WebWidget).await;
    let key = relay.widget_key("sales");
    let (bob, carol) = (Agent::start(&relay, &tokens, "bob"), Agent::start(&relay, &tokens, "carol"));
    bob.has(&id).await;
    carol.has(&id).await;
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());

    // 300 attackers at once, all from one address.
    let attackers: Vec<_> = (0..300).map(|_| tokio::spawn(slow_body(relay.addr, key.clone()))).collect();
    let http = reqwest::Client::new();
    let mut most_open = 0;
    let mut delays = Vec::new();
    for n in 0..10 {
        // /health answers throughout.
        // (The relay shares this test's two threads with 300 attackers: a second or two at worst.)
        let health: serde_json::Value = tokio::time::timeout(Duration::from_secs(3), async {
            http.get(format!("{}/health", relay.url())).send().await.unwrap().json().await.unwrap()
        })
        .await
        .expect("/health answers during the attack");
        most_open = most_open.max(health["open_connections"].as_u64().unwrap());
        // The signed-in agents keep syncing.
        let text = format!("reply {n} during the attack");
        let sent = Instant::now();
        carol.act(&id, |r| r.send(&id, MessageBody::Text { text: text.clone() }, Timestamp::now()).unwrap());
        system_tests::eventually(5, "bob gets carol's reply", || bob.message_texts(&id).contains(&text)).await;
        delays.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut answers = Vec::new();
    for a in attackers {
        answers.push(a.await.unwrap().expect("every slow connection ends by itself within 15 s"));
    }
    let refused = answers.iter().filter(|(s, _)| *s == 503).count();
    let too_slow = answers.iter().filter(|(s, _)| *s == 408).count();
    assert_eq!(refused + too_slow, answers.len(), "each was answered 503 or 408: {answers:?}");
    assert!(refused > 0 && too_slow > 0, "{refused} over the caps, {too_slow} too slow");
    // A body at 3 bytes a second is cut off soon after the 1 s grace.
    assert!(answers.iter().all(|(_, t)| *t < Duration::from_secs(5)), "{answers:?}");
    assert!(most_open <= 150, "{most_open} connections open");
    delays.sort();
    assert!(delays[delays.len() - 1] < Duration::from_secs(2), "fan-out delays {delays:?}");
}

#[tokio::test]
async fn over_the_per_address_cap_websockets_get_1013_and_requests_503_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start_with(dir.path().into(), |c| c.max_connections_per_address = 3).await;
    let idle: Vec<_> = futures_util::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(relay.addr))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    match over.next_frame(Duration::from_secs(1)).await {
        Some(Frame::Close(Some(close))) => {
            assert_eq!(close.code, CloseCode::Again);
            assert!(close.reason.contains("3 connections open"), "{}", close.reason);
        }
        other => panic!("expected close 1013, got {other:?}"),
    }
    let http = reqwest::Client::new();
    let me = http.get(format!("{}/api/me", relay.url())).bearer_auth(&tokens["bob"]).send().await.unwrap();
    assert_eq!(me.status(), 503);
    assert!(me.text().await.unwrap().contains("the most one address may"));
    let health = http.get(format!("{}/health", relay.url())).send().await.unwrap();
    assert_eq!(health.status(), 200, "/health is served over the caps");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(again.join().await, WireMessage::Peer { .. }), "served again once under the cap");
}

#[tokio::test]
async fn revoking_a_token_closes_its_open_socket_within_a_second_and_a_role_change_reconnects() {
    use crewdesk::domain::{AgentId, TeamId};
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start(dir.path().into()).await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let mut carol = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(carol.join().await, WireMessage::Peer { .. }));
    // As `sync-server revoke-token bob` does it: another connection to the store.
    let revoked = Instant::now();
    assert_eq!(relay.open_store().revoke_tokens(&AgentId::from("bob"), None).unwrap(), 1);
    let (code, reason, errors) = bob.closed(Duration::from_secs(1)).await;
    assert!(revoked.elapsed() < Duration::from_secs(1), "closed after {:?}", revoked.elapsed());
    assert_eq!(code, 4001);
    assert_eq!(reason, "signed out: token revoked");
    assert!(errors.iter().any(|e| e.starts_with("signed out: token revoked")), "{errors:?}");
    // The revoked token no longer signs in.
    let mut again = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert_eq!(again.closed(Duration::from_secs(1)).await.0, 4001);
    // Carol is removed from Sales: her socket is closed to sync again with her new access.
    assert!(relay.open_store().remove_member(&TeamId("sales".into()), &AgentId::from("carol")).unwrap());
    let (code, reason, _) = carol.closed(Duration::from_secs(1)).await;
    assert_eq!(code, 4005, "{reason}");
    let mut carol = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(carol.join().await, WireMessage::Peer { .. }), "carol still signs in");
}

#[tokio::test]
async fn the_desktop_driver_stops_and_reports_signed_out_when_its_token_is_revoked() {
    use crewdesk::domain::AgentId;
    use system_tests::Agent;
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start(dir.path().into()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    relay.open_store().revoke_tokens(&AgentId::from("bob"), None).unwrap();
    let mut status = bob.client().status();
    let st = tokio::time::timeout(Duration::from_secs(2), status.wait_for(|s| s.signed_out))
        .await
        .expect("signed out within 2 s")
        .unwrap()
        .clone();
    assert!(!st.connected);
    assert!(st.last_error.unwrap().starts_with("signed out: token revoked"));
    // It does not retry: the relay sees no more sign-ins with the token.
    let http = reqwest::Client::new();
    let health = |relay_url: String| {
        let http = http.clone();
        async move {
            let h: serde_json::Value =
                http.get(format!("{relay_url}/health")).send().await.unwrap().json().await.unwrap();
            h["token_lookups"].as_u64().unwrap()
        }
    };
    let before = health(relay.url()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(health(relay.url()).await, before, "no sign-in attempted after being signed out");
    assert!(bob.client().status().borrow().signed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_flood_costs_no_database_work_and_does_not_stop_a_good_agent() {
    use crewdesk::domain::{Channel, MessageBody, Timestamp};
    use system_tests::Agent;
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = TestRelay::start(dir.path().into()).await;
    let id = relay.customer_conversation(&tokens["ada"], "sales", Channel::WebWidget).await;
    let (bob, carol) = (Agent::start(&relay, &tokens, "bob"), Agent::start(&relay, &tokens, "carol"));
    bob.has(&id).await;
    carol.has(&id).await;
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    let http = reqwest::Client::new();
    let lookups = || {
        let http = http.clone();
        let url = relay.url();
        async move {
            let h: serde_json::Value = http.get(format!("{url}/health")).send().await.unwrap().json().await.unwrap();
            h["token_lookups"].as_u64().unwrap()
        }
    };
    let (bob, carol, id) = (&bob, &carol, &id);
    let reply = |n: usize| async move {
        let text = format!("reply {n}");
        let sent = Instant::now();
        carol.act(id, |r| r.send(id, MessageBody::Text { text: text.clone() }, Timestamp::now()).unwrap());
        system_tests::eventually(5, "bob gets carol's reply", || bob.message_texts(id).contains(&text)).await;
        sent.elapsed()
    };
    let quiet: Vec<Duration> = {
        let mut d = Vec::new();
        for n in 0..5 {
            d.push(reply(n).await);
        }
        d
    };
    let before = lookups().await;
    // 2,000 sign-ins with made-up tokens, 50 at a time, while carol keeps replying.
    let url = relay.url();
    let flood = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut statuses = Vec::new();
        for round in 0..40 {
            let batch =
                (0..50).map(|n| http.get(format!("{url}/api/me")).bearer_auth(format!("cdt_forged{round}x{n}")).send());
            for r in futures_util::future::join_all(batch).await {
                statuses.push(r.unwrap().status().as_u16());
            }
        }
        statuses
    });
    let mut loaded = Vec::new();
    for n in 5..15 {
        loaded.push(reply(n).await);
    }
    let statuses = flood.await.unwrap();
    let looked_up = lookups().await - before;
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 429).count() >= 1_900, "most are refused without a lookup");
    assert!(looked_up <= 25, "{looked_up} tokens looked up for 2,000 attempts");
    let worst = |d: &[Duration]| d.iter().max().copied().unwrap();
    println!("reply delays quiet {quiet:?}, during the flood {loaded:?}");
    assert!(worst(&loaded) < Duration::from_secs(1), "during the flood: {loaded:?}");
}

/// An office behind one address: 200 agents whose tokens the relay has not seen yet sign in at
/// once (a relay restart, everyone reconnecting). They are checked a few at a time and all get
/// in: the limit is on failed sign-ins, not on sign-ins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_good_sign_ins_at_once_from_one_address_all_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, _) = TestRelay::start(dir.path().to_owned()).await;
    let store = relay.open_store();
    let tokens: Vec<String> =
        (0..200).map(|i| store.issue_token(&"bob".into(), &format!("laptop {i}")).unwrap()).collect();
    let http = reqwest::Client::new();
    let url = relay.url();
    let answers =
        futures_util::future::join_all(tokens.iter().map(|t| http.get(format!("{url}/api/me")).bearer_auth(t).send()))
            .await;
    let statuses: Vec<u16> = answers.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    relay.stop().await;
}
