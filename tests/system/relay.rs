//! The relay end to end on loopback: replicas converge through it, offline work is delivered after
//! a restart, access is per team, grabs have exactly one winner, hostile input is refused.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use crewdesk::domain::access::GrabState;
use crewdesk::domain::{Author, Channel, ConversationId, Message, MessageBody, TeamId, Timestamp};
use crewdesk::replica::doc::{self};
use crewdesk::sync::wire::WireMessage;
use system_tests::{Agent, RawClient, TestRelay, eventually, grab_all, one_owner_everywhere};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn text(t: &str) -> MessageBody {
    MessageBody::Text { text: t.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_see_each_other_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, text("Hi Maya, Bob here."), Timestamp::now()).unwrap());
    eventually(10, "carol sees bob's reply", || carol.message_texts(&id) == ["Hello?", "Hi Maya, Bob here."]).await;
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    carol.act(&id, |r| r.send(&id, text("Carol too."), Timestamp::now()).unwrap());
    eventually(10, "bob sees carol's reply", || bob.message_texts(&id).len() == 3).await;
    eventually(10, "index rows converge", || {
        bob.with(|r| r.stored_summaries().unwrap()) == carol.with(|r| r.stored_summaries().unwrap())
    })
    .await;
    eventually(10, "everything is durable on the relay", || {
        bob.with(|r| r.unsynced().unwrap().0) == 0 && carol.with(|r| r.unsynced().unwrap().0) == 0
    })
    .await;
    assert_eq!(bob.with(|r| r.summary(&id).unwrap().crew_in_room.len()), 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sends_are_delivered_once_in_order_after_the_relay_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    eventually(10, "carol has the conversation", || carol.message_texts(&id).len() == 1).await;
    eventually(10, "bob is fully synced", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;

    relay.stop().await;
    let mut status = bob.client().status();
    tokio::time::timeout(std::time::Duration::from_secs(10), status.wait_for(|s| !s.connected)).await.unwrap().unwrap();
    let base = Timestamp::now();
    for i in 0..5 {
        bob.act(&id, |r| r.send(&id, text(&format!("offline {i}")), base.plus(i)).unwrap());
    }
    assert_eq!(bob.with(|r| r.unsynced().unwrap()), (5, vec![id.clone()]), "five changes wait for the relay");
    eventually(5, "the status shows them", || bob.client().status().borrow().unsynced_changes == 5).await;

    relay.restart().await;
    let expected: Vec<String> =
        std::iter::once("Hello?".to_owned()).chain((0..5).map(|i| format!("offline {i}"))).collect();
    eventually(20, "carol receives the offline messages", || carol.message_texts(&id) == expected).await;
    eventually(10, "bob's outbox empties", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    // Once each: the relay's stored document holds each message once, in order.
    assert_eq!(bob.message_texts(&id), expected);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_per_team_and_refusals_look_like_missing_documents() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let sales_id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WhatsApp).await;
    eventually(10, "stored on the relay", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;

    // dave is only in Support: the Sales conversation is "unavailable", like one that does not exist.
    let mut dave = RawClient::connect(&relay, Some(&tokens["dave"])).await;
    assert!(matches!(dave.join().await, WireMessage::Peer { .. }));
    let missing = doc::new_conversation_id(&mut rand::rng());
    for doc_id in [sales_id.0.clone(), missing.0.clone()] {
        let empty = automerge::Automerge::new();
        assert!(sync_with(&mut dave, &doc_id, &empty, &mut automerge::sync::State::new(), true).await);
        match dave.next().await.unwrap() {
            WireMessage::DocUnavailable { document_id, .. } => assert_eq!(document_id, doc_id),
            other => panic!("expected doc-unavailable, got {other:?}"),
        }
    }

    // Tokens: missing, unknown and revoked are refused with an error and a closed connection.
    let store = relay.open_store();
    assert_eq!(store.revoke_tokens(&"carol".into(), None).unwrap(), 1);
    for token in [None, Some("cdt_not-a-token"), Some(tokens["carol"].as_str())] {
        let mut client = RawClient::connect(&relay, token).await;
        match client.next().await {
            Some(WireMessage::Error { message, .. }) => assert!(message.contains("authentication failed"), "{message}"),
            other => panic!("expected an error for {token:?}, got {other:?}"),
        }
        assert_eq!(client.next().await, None, "connection closed");
    }
    // The HTTP API refuses a revoked token too, and answers a valid one.
    assert_eq!(http_status(&relay, "/api/me", Some(&tokens["carol"])).await, 401);
    assert_eq!(http_status(&relay, "/api/me", None).await, 401);
    assert_eq!(http_status(&relay, "/api/me", Some(&tokens["dave"])).await, 200);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grab_race_has_exactly_one_owner_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let ada = Agent::start(&relay, &tokens, "ada");
    let reps: Vec<Agent> = ["bob", "dave", "erin"].iter().map(|a| Agent::start(&relay, &tokens, a)).collect();
    ada.connected().await;
    for r in &reps {
        r.connected().await;
    }
    let id = relay.customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::WebWidget).await;
    for r in &reps {
        eventually(10, "the representative has the conversation", || r.with(|x| x.summary(&id).is_some())).await;
    }
    // The relay is down: every grab is made offline and waits for confirmation.
    eventually(10, "ada's conversation is on the relay", || ada.with(|r| r.unsynced().unwrap().0) == 0).await;
    relay.stop().await;
    let now = Timestamp::now();
    for (i, r) in reps.iter().enumerate() {
        r.act(&id, |x| x.grab(&id, now.plus(i as i64)).unwrap());
        assert_eq!(r.with(|x| x.conversation(&id, now).unwrap().grab), GrabState::AwaitingConfirmation);
    }
    relay.restart().await;
    let states = || {
        reps.iter()
            .map(|r| r.with(|x| x.conversation(&id, Timestamp::now()).map(|d| d.grab).unwrap_or(GrabState::Lost)))
            .collect::<Vec<_>>()
    };
    eventually(20, "everyone knows the winner", || {
        let owners: Vec<_> =
            reps.iter().chain([&ada]).map(|r| r.with(|x| x.summary(&id).and_then(|s| s.owner.clone()))).collect();
        owners.iter().all(|o| o.is_some() && *o == owners[0])
    })
    .await;
    let states = states();
    assert_eq!(states.iter().filter(|s| **s == GrabState::Won).count(), 1, "{states:?}");
    assert_eq!(states.iter().filter(|s| **s == GrabState::Lost).count(), 2, "{states:?}");
    let owner = ada.with(|x| x.summary(&id).unwrap().owner.clone().unwrap());
    assert!(ada.with(|x| x.summary(&id).unwrap().crew_in_room.contains(&owner)), "the winner is in the room");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_an_error_and_everyone_else_keeps_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    eventually(10, "carol has it", || carol.message_texts(&id).len() == 1).await;

    let mut evil = RawClient::connect(&relay, Some(&tokens["erin"])).await;
    assert!(matches!(evil.join().await, WireMessage::Peer { .. }));
    // Malformed CBOR, a text frame, and garbage where a sync message belongs: each gets an error.
    assert!(evil.send_raw(WsMessage::Binary(vec![0xff, 0x00, 0x13].into())).await);
    assert!(matches!(evil.next().await, Some(WireMessage::Error { message, .. }) if message.contains("malformed")));
    assert!(evil.send_raw(WsMessage::Text("hello".into())).await);
    assert!(matches!(evil.next().await, Some(WireMessage::Error { message, .. }) if message.contains("binary")));
    evil.send(&WireMessage::Sync {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        data: b"garbage".to_vec(),
    })
    .await;
    assert!(matches!(evil.next().await, Some(WireMessage::Error { message, .. }) if message.contains("malformed")));
    // An oversized frame closes that connection.
    let _ = evil.send_raw(WsMessage::Binary(vec![0_u8; 9 * 1024 * 1024].into())).await;
    assert_eq!(evil.next().await, None);

    // Everyone else is still served, and the stored conversation is intact.
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, text("still here"), Timestamp::now()).unwrap());
    eventually(10, "carol still syncs", || carol.message_texts(&id) == ["Hello?", "still here"]).await;
    relay.stop().await;
}

/// Sends the relay the sync message (or, with `request`, the request) that the document's sync
/// state calls for; false when it calls for none.
async fn sync_with(
    client: &mut RawClient,
    id: &str,
    d: &automerge::Automerge,
    state: &mut automerge::sync::State,
    request: bool,
) -> bool {
    use automerge::sync::SyncDoc;
    let Some(m) = d.generate_sync_message(state) else { return false };
    let (sender_id, target_id, document_id, data) = ("raw".into(), "relay".into(), id.to_owned(), m.encode());
    let m = match request {
        true => WireMessage::Request { sender_id, target_id, document_id, data },
        false => WireMessage::Sync { sender_id, target_id, document_id, data },
    };
    client.send(&m).await;
    true
}

/// Starts creating a document on the relay: the first sync message (heads only). The relay asks
/// for the changes or says it will not have the document.
async fn offer(client: &mut RawClient, id: &str, d: &automerge::Automerge, state: &mut automerge::sync::State) {
    assert!(sync_with(client, id, d, state, false).await, "a first sync message");
}

/// A plain automerge document, not a conversation (what a general sync server would keep).
fn plain_document(n: i64) -> automerge::Automerge {
    use automerge::transaction::Transactable;
    let mut d = automerge::Automerge::new();
    d.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "count", n)).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_that_are_not_conversations_are_refused_and_cannot_pile_up() {
    use automerge::sync::SyncDoc;
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut client = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(client.join().await, WireMessage::Peer { .. }));

    // A whole document that is not a conversation: once it has arrived, it is answered as unavailable.
    let id = crewdesk::sync::document_id::encode(&[7; 16]);
    let mut d = plain_document(1);
    let mut state = automerge::sync::State::new();
    offer(&mut client, &id, &d, &mut state).await;
    loop {
        match next_about(&mut client, &id).await {
            Some(WireMessage::Sync { data, .. }) => {
                d.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
                sync_with(&mut client, &id, &d, &mut state, false).await;
            }
            Some(WireMessage::DocUnavailable { document_id, .. }) if document_id == id => break,
            other => panic!("expected the relay to refuse the document, got {other:?}"),
        }
    }
    // Nobody can read it: it was never stored.
    let mut other = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(other.join().await, WireMessage::Peer { .. }));
    let empty = automerge::Automerge::new();
    assert!(sync_with(&mut other, &id, &empty, &mut automerge::sync::State::new(), true).await);
    assert!(matches!(next_about(&mut other, &id).await, Some(WireMessage::DocUnavailable { .. })));

    // Documents begun and never finished: a connection holds at most 64 at once.
    let mut begun = Vec::new();
    for i in 0..64_u8 {
        let id = crewdesk::sync::document_id::encode(&[i.wrapping_add(100); 16]);
        let (mut d, mut state) = (plain_document(i.into()), automerge::sync::State::new());
        offer(&mut client, &id, &d, &mut state).await;
        let Some(WireMessage::Sync { data, .. }) = next_about(&mut client, &id).await else {
            panic!("document {i} is not asked for")
        };
        d.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
        begun.push((id, d, state));
    }
    let one_too_many = crewdesk::sync::document_id::encode(&[250; 16]);
    offer(&mut client, &one_too_many, &plain_document(0), &mut automerge::sync::State::new()).await;
    assert!(matches!(next_about(&mut client, &one_too_many).await, Some(WireMessage::DocUnavailable { .. })));
    // Finishing one (it is refused, not being a conversation) frees its place.
    let (id, d, mut state) = begun.pop().unwrap();
    assert!(sync_with(&mut client, &id, &d, &mut state, false).await, "the changes the relay asked for");
    assert!(matches!(next_about(&mut client, &id).await, Some(WireMessage::DocUnavailable { .. })));
    offer(&mut client, &one_too_many, &plain_document(0), &mut automerge::sync::State::new()).await;
    assert!(matches!(next_about(&mut client, &one_too_many).await, Some(WireMessage::Sync { .. })));

    // The relay serves everyone else meanwhile.
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let conversation = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    eventually(10, "bob has the new conversation", || bob.message_texts(&conversation).len() == 1).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_flood_is_cut_to_its_rate_and_followers_stay_connected() {
    use automerge::sync::SyncDoc;
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    let ephemeral = |n: u64, bytes: usize| WireMessage::Ephemeral {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        count: n,
        session_id: "flood".into(),
        data: vec![7; bytes],
    };
    // carol follows the conversation (asks for it and gets it).
    let mut carol = RawClient::connect(&relay, Some(&tokens["carol"])).await;
    assert!(matches!(carol.join().await, WireMessage::Peer { .. }));
    let (mut copy, mut state) = (automerge::Automerge::new(), automerge::sync::State::new());
    assert!(sync_with(&mut carol, id.as_str(), &copy, &mut state, true).await);
    let Some(WireMessage::Sync { data, .. }) = next_about(&mut carol, id.as_str()).await else {
        panic!("carol gets the conversation")
    };
    copy.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
    assert!(!copy.get_heads().is_empty());

    // bob floods it with 1,000 ephemeral messages at once.
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    for n in 0..1_000 {
        bob.send(&ephemeral(n, 16)).await;
    }
    match bob.next().await {
        Some(WireMessage::Error { message, .. }) => assert!(message.contains("too many ephemeral"), "{message}"),
        other => panic!("expected bob to be told, got {other:?}"),
    }
    // An oversized one is refused outright.
    bob.send(&ephemeral(1_000, 5 * 1024)).await;
    let mut told_size = false;
    while let Some(m) = bob.next().await {
        if let WireMessage::Error { message, .. } = m
            && message.contains("4 KiB")
        {
            told_size = true;
            break;
        }
    }
    assert!(told_size, "bob is told the size limit");

    // carol got the burst and what the rate allows, not the flood, and is still connected.
    let mut received = 0;
    while let Ok(Some(m)) = tokio::time::timeout(std::time::Duration::from_millis(1_500), carol.next()).await {
        match m {
            WireMessage::Ephemeral { data, .. } => {
                assert_eq!(data.len(), 16, "the oversized message is not passed on");
                received += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((50..=100).contains(&received), "carol received {received} of 1,000");
    sync_with(&mut carol, id.as_str(), &copy, &mut state, false).await;
    // A second later bob may send again, and carol, still connected, hears it.
    bob.send(&ephemeral(2_000, 16)).await;
    let mut heard = false;
    while let Some(m) = carol.next().await {
        if matches!(m, WireMessage::Ephemeral { count: 2_000, .. }) {
            heard = true;
            break;
        }
    }
    assert!(heard, "carol is still connected and hears bob's next message");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed_and_agents_still_connect() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let started = std::time::Instant::now();
    // 200 connections that never say anything, and one that sends its request head a byte at a time.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    let mut trickle = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    trickle.write_all(b"GET /health HTTP/1.1\r\nHost: relay\r\n").await.unwrap();
    let trickling = tokio::spawn(async move {
        // One header byte every 200 ms: the head is never finished; the relay closes it.
        for _ in 0..100 {
            if trickle.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let mut buf = [0_u8; 64];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), trickle.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    // Meanwhile an agent connects and syncs as usual.
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    // Every idle connection is closed by the relay (end of stream or reset) within the head timeout.
    for mut c in idle {
        let mut buf = [0_u8; 16];
        match tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            other => panic!("an idle connection was not closed: {other:?}"),
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(9), "closed after {:?}", started.elapsed());
    assert!(trickling.await.unwrap(), "the trickling connection was closed");
    assert_eq!(http_status(&relay, "/health", None).await, 200);
    relay.stop().await;
}

/// The next message about one document (announcements of others are skipped).
async fn next_about(client: &mut RawClient, id: &str) -> Option<WireMessage> {
    loop {
        let m = client.next().await?;
        let about = match &m {
            WireMessage::Sync { document_id, .. }
            | WireMessage::Request { document_id, .. }
            | WireMessage::DocUnavailable { document_id, .. } => document_id == id,
            WireMessage::Error { .. } => true,
            _ => false,
        };
        if about {
            return Some(m);
        }
    }
}

async fn http_status(relay: &TestRelay, path: &str, token: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n", relay.addr);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_automerge_repo_client_reads_and_appends() {
    let interop = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop");
    assert!(
        interop.join("node_modules/@automerge/automerge-repo").exists(),
        "the npm clients are not installed: run `npm install --prefix tests/interop` (cargo xtask test does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, text("Written in Rust"), Timestamp::now()).unwrap());
    eventually(10, "stored on the relay", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;

    let url = format!("ws://{}/?token={}", relay.addr, tokens["carol"]);
    let output = tokio::process::Command::new("node")
        .arg(interop.join("append.mjs"))
        .args([url.as_str(), id.as_str(), "m-from-npm", "Written by an npm automerge-repo client", "carol"])
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node failed: {stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(r#"messages: ["Hello?","Written in Rust"]"#), "{stdout}");
    assert!(stdout.contains("synced"), "{stdout}");
    eventually(10, "the Rust replica sees the npm client's message", || {
        bob.message_texts(&id).last().map(String::as_str) == Some("Written by an npm automerge-repo client")
    })
    .await;
    let summary = bob.with(|r| r.summary(&id).unwrap().clone());
    assert_eq!(summary.message_count, 3);
    let last = bob.with(|r| r.stored_messages(&id).unwrap().pop().unwrap());
    assert_eq!(last.author, doc::crew(&"carol".into()), "written in carol's name, as her token says");

    // A token for a team without this conversation gets "unavailable" from the npm client too.
    let url = format!("ws://{}/?token={}", relay.addr, tokens["dave"]);
    let output = tokio::process::Command::new("node")
        .arg(interop.join("append.mjs"))
        .args([url.as_str(), id.as_str(), "m-denied", "should not arrive", "dave"])
        .output()
        .await
        .expect("node runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unavailable"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simultaneous_grabs_some_offline_have_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, mut tokens) = TestRelay::start(dir.path().to_owned()).await;
    let store = relay.open_store();
    let names: Vec<String> = (0..50).map(|i| format!("rep{i:02}")).collect();
    for name in &names {
        let member = crewdesk::domain::Member {
            agent: name.as_str().into(),
            name: name.clone(),
            role: crewdesk::domain::Role::Representative,
        };
        store.add_member(&TeamId::from(demo::SUPPORT), &member).unwrap();
        tokens.insert(name.clone(), store.issue_token(&name.as_str().into(), "test").unwrap());
    }
    let ada = Agent::start(&relay, &tokens, "ada");
    let mut reps: Vec<Agent> = names.iter().map(|n| Agent::start(&relay, &tokens, n)).collect();
    let id = relay.customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::WhatsApp).await;
    ada.connected().await;
    for r in &reps {
        eventually(30, "every representative has the conversation", || r.with(|x| x.summary(&id).is_some())).await;
    }
    // Every fifth representative is offline when grabbing.
    for r in reps.iter_mut().step_by(5) {
        r.disconnect().await;
    }
    let requested = grab_all(&reps, &id);
    assert!(requested >= 10, "{requested} grabs");
    for r in reps.iter_mut() {
        r.reconnect();
    }
    one_owner_everywhere(&reps, &[&ada], &id, requested).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cannot_record_itself_as_grab_winner() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let ada = Agent::start(&relay, &tokens, "ada");
    ada.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::Email).await;
    ada.has(&id).await;

    // dave fetches the document with the bare protocol, writes himself in as owner, and syncs.
    let mut dave = RawClient::connect(&relay, Some(&tokens["dave"])).await;
    assert!(matches!(dave.join().await, WireMessage::Peer { .. }));
    let mut copy = automerge::Automerge::new();
    let mut state = automerge::sync::State::new();
    use automerge::sync::SyncDoc;
    assert!(sync_with(&mut dave, id.as_str(), &copy, &mut state, true).await);
    for _ in 0..10 {
        match dave.next().await {
            Some(WireMessage::Sync { data, .. }) => {
                copy.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
                if doc::check_schema(&copy).unwrap_or(false) {
                    break;
                }
                sync_with(&mut dave, id.as_str(), &copy, &mut state, false).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(doc::check_schema(&copy).unwrap(), "dave received the conversation");
    // Forgeries dave tries, one at a time (each from the relay's last state): putting bob in the room,
    // asking to grab in erin's name, touching history, and recording himself as the owner.
    type Forge = fn(&mut automerge::transaction::Transaction<'_>) -> Result<(), doc::DocError>;
    let forgeries: [(&str, Forge); 11] = [
        ("join and leave only for themselves", |tx| doc::set_in_room(tx, &"bob".into(), true)),
        ("grab only for themselves", |tx| doc::request_grab(tx, &"erin".into(), Timestamp(1))),
        ("cannot be changed or deleted", |tx| {
            use automerge::ReadDoc;
            use automerge::transaction::Transactable;
            let (_, messages) = tx.get(automerge::ROOT, "messages")?.unwrap();
            let (_, first) = tx.get(&messages, "m-first")?.unwrap();
            let (_, body) = tx.get(&first, "body")?.unwrap();
            tx.put(&body, "text", "I never asked anything")?;
            Ok(())
        }),
        ("cannot be changed or deleted", |tx| {
            use automerge::ReadDoc;
            use automerge::transaction::Transactable;
            let (_, messages) = tx.get(automerge::ROOT, "messages")?.unwrap();
            tx.delete(&messages, "m-first")?;
            Ok(())
        }),
        ("only in their own name", |tx| {
            let m = Message {
                id: "m-erin".into(),
                at: Timestamp(2),
                author: doc::crew(&"erin".into()),
                body: text("Refund approved"),
            };
            doc::add_message(tx, &m)
        }),
        ("only in conversations they have joined", |tx| {
            let m =
                Message { id: "m-dave".into(), at: Timestamp(2), author: doc::crew(&"dave".into()), body: text("Hi") };
            doc::add_message(tx, &m)
        }),
        ("or admins, close it", |tx| doc::close(tx, Timestamp(3))),
        ("or admins, edit the customer's details", |tx| {
            doc::edit_customer(tx, &crewdesk::domain::CustomerEdit { notes: Some("VIP".into()), ..Default::default() })
        }),
        ("come only from the customer's channel", |tx| {
            let m =
                Message { id: "m-cust".into(), at: Timestamp(2), author: Author::Customer, body: text("Refund me") };
            doc::add_message(tx, &m)
        }),
        ("only in their own name", |tx| {
            let m = Message {
                id: "m-system".into(),
                at: Timestamp(2),
                author: Author::System,
                body: text("Closed by admin"),
            };
            doc::add_message(tx, &m)
        }),
        ("only the relay records who won a grab", |tx| doc::record_owner(tx, &"dave".into())),
    ];
    for (refusal, forge) in forgeries {
        let mut attempt = copy.fork();
        let mut attempt_state = automerge::sync::State::new();
        attempt.transact::<_, _, doc::DocError>(forge).unwrap();
        let mut refused = false;
        for _ in 0..10 {
            if !sync_with(&mut dave, id.as_str(), &attempt, &mut attempt_state, false).await {
                break;
            }
            match dave.next().await {
                Some(WireMessage::Error { message, .. }) => {
                    assert!(message.contains(refusal), "{message}");
                    refused = true;
                    break;
                }
                Some(WireMessage::Sync { data, .. }) => {
                    attempt
                        .receive_sync_message(&mut attempt_state, automerge::sync::Message::decode(&data).unwrap())
                        .unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused, "the relay refused: {refusal}");
    }
    // Nobody else ever sees the forged owner, and the stored document has none.
    let bob = Agent::start(&relay, &tokens, "bob");
    eventually(10, "bob has the conversation", || bob.with(|r| r.summary(&id).is_some())).await;
    assert_eq!(bob.with(|r| r.summary(&id).unwrap().owner.clone()), None);
    assert_eq!(ada.with(|r| r.summary(&id).unwrap().owner.clone()), None);
    let s = bob.with(|r| r.summary(&id).unwrap().clone());
    assert!(s.crew_in_room.is_empty() && s.grab_requests.is_empty(), "no forged room entry or grab request: {s:?}");
    assert_eq!(bob.message_texts(&id), ["Hello?"], "no forged, edited or deleted message");
    relay.stop().await;
}

async fn http_post_json(relay: &TestRelay, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        relay.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_widget_customer_reaches_the_crew_with_presence_and_gets_replies() {
    use futures_util::{SinkExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;

    // A customer starts a chat; hostile text is stored and shown as text, never as HTML.
    let hostile = "<script>alert('x')</script> Hello & welcome";
    let body = format!(
        r#"{{"name":"Maya Hansen","email":"maya@example.com","text":"{}","location":"Europe/Oslo · nb-NO"}}"#,
        hostile.replace('\'', "\\u0027")
    );
    let (status, answer) =
        http_post_json(&relay, &format!("/api/widget/{}/conversations", relay.widget_key("sales")), &body).await;
    assert_eq!(status, 200, "{answer}");
    let session = answer.split("\"session\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned();
    let id = ConversationId(
        answer.split("\"conversation\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned(),
    );
    eventually(10, "bob sees the new web-widget conversation", || bob.message_texts(&id) == [hostile]).await;

    // Bad input is refused with a clear error; unknown teams and sessions too.
    assert_eq!(
        http_post_json(
            &relay,
            &format!("/api/widget/{}/conversations", relay.widget_key("sales")),
            r#"{"name":"","text":"hi"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(http_post_json(&relay, "/api/widget/nope/conversations", r#"{"name":"A","text":"hi"}"#).await.0, 404);
    // An unknown session is told so on the socket (a browser cannot read an upgrade's status).
    let (mut forged, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/widget/ws?session=cws_forged", relay.addr))
            .await
            .unwrap();
    let first = forged.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(first.contains("\"code\":\"session\""), "{first}");
    let Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(close)))) = forged.next().await else {
        panic!("the socket is closed")
    };
    assert_eq!(u16::from(close.code), 4001);

    // The customer's browser connects: the crew sees Online and the location within a second.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/widget/ws?session={session}", relay.addr)).await.unwrap();
    // Without a GeoIP database the location is unknown (not the browser's guess).
    eventually(5, "online without a location on bob's replica", || {
        bob.with(|r| r.summary(&id).map(|s| (s.presence.online, s.presence.location.clone()))) == Some((true, None))
    })
    .await;
    let mut received = String::new();
    while !received.contains("welcome") {
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = ws.next().await {
            received.push_str(&t);
        }
    }
    assert!(received.contains("\"from\":\"customer\""), "{received}");

    // The crew replies; the widget receives it. The customer writes back; the crew sees it.
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, text("Hi Maya, how can I help?"), Timestamp::now()).unwrap());
    let mut crew_reply = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !crew_reply && std::time::Instant::now() < deadline {
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
            tokio::time::timeout(std::time::Duration::from_secs(1), ws.next()).await
        {
            crew_reply = t.contains("Hi Maya, how can I help?") && t.contains("\"from\":\"crew\"");
        }
    }
    assert!(crew_reply, "the widget shows the crew's reply");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(r#"{"type":"message","text":"Thanks!"}"#.into()))
        .await
        .unwrap();
    eventually(10, "bob sees the customer's reply", || {
        bob.message_texts(&id).last().map(String::as_str) == Some("Thanks!")
    })
    .await;

    // The customer leaves: offline, with a last-active time.
    ws.close(None).await.unwrap();
    eventually(5, "offline on bob's replica", || {
        bob.with(|r| r.summary(&id).map(|s| (s.presence.online, s.presence.last_active.is_some())))
            == Some((false, true))
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_fallback_sends_each_message_once_batched_while_the_customer_is_offline() {
    use futures_util::StreamExt;
    let sink = system_tests::SmtpSink::start().await;
    let smtp = sink.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start_with(dir.path().to_owned(), move |c| c.smtp = Some(smtp.clone())).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let (status, answer) = http_post_json(
        &relay,
        &format!("/api/widget/{}/conversations", relay.widget_key("sales")),
        r#"{"name":"Maya Hansen","email":"maya@example.com","text":"Where is my parcel?"}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let session = answer.split("\"session\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned();
    let id = ConversationId(
        answer.split("\"conversation\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned(),
    );
    eventually(10, "bob has the conversation", || bob.with(|r| r.summary(&id).is_some())).await;
    // The customer closed the page: the desktop shows the fallback, and replies go by email.
    assert!(bob.with(|r| r.conversation(&id, Timestamp::now()).unwrap().email_fallback));
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    for t in ["Hi Maya!", "Your parcel left our warehouse today.", "Tracking: 4471."] {
        bob.act(&id, |r| r.send(&id, text(t), Timestamp::now()).unwrap());
    }
    eventually(15, "one email arrives", || !sink.received().is_empty()).await;
    // Nothing more arrives for those messages: each is sent exactly once.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mails = sink.received();
    assert_eq!(mails.len(), 1, "three quick messages, one email: {mails:?}");
    for t in ["Hi Maya!", "Your parcel left our warehouse today.", "Tracking: 4471."] {
        assert!(mails[0].contains(t), "{t} in {}", mails[0]);
    }
    assert!(mails[0].contains("maya@example.com"), "{}", mails[0]);
    assert!(mails[0].contains("Bob Okafor"), "{}", mails[0]);

    // A file goes with its email, once bob's app has uploaded it.
    bob.attach(&id, "delivery-note.pdf", "application/pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\ndelivery note for Maya\n");
    eventually(15, "the email with the file arrives", || sink.received().len() == 2).await;
    let mail = sink.received()[1].clone();
    assert!(mail.contains("multipart/mixed"), "{mail}");
    assert!(mail.contains("filename=\"delivery-note.pdf\""), "{mail}");
    assert!(mail.contains("application/pdf"), "{mail}");
    assert!(mail.contains("Content-Transfer-Encoding: base64"), "{mail}");
    assert!(mail.contains("JVBERi0xLjQKJeLjz9MKZGVsaXZlcnkgbm90ZSBmb3IgTWF5YQo="), "the file's bytes (base64): {mail}");

    // Back online in the widget: replies go there, not by email.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/widget/ws?session={session}", relay.addr)).await.unwrap();
    eventually(5, "online again", || bob.with(|r| r.summary(&id).is_some_and(|s| s.presence.online))).await;
    bob.act(&id, |r| r.send(&id, text("Anything else?"), Timestamp::now()).unwrap());
    let mut seen = false;
    while !seen {
        // (The relay pings the widget's socket too.)
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => seen = t.contains("Anything else?"),
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_)))) => {}
            _ => break,
        }
    }
    assert!(seen, "the widget shows the reply");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), 2, "no email while the customer is online");
    relay.stop().await;
}

fn answer_field(answer: &str, field: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(answer).unwrap();
    v[field].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_location_comes_from_geoip_and_starts_are_limited_per_address() {
    use system_tests::mmdb::{GeoEntry, write};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("test-city.mmdb");
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
    // A database that cannot be read stops the relay with an error naming the file.
    let broken = dir.path().join("broken.mmdb");
    std::fs::write(&broken, b"not a database").unwrap();
    let config =
        sync_server::Config { data_dir: dir.path().join("other"), geoip: Some(broken.clone()), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = sync_server::run(listener, config, async {}).await.unwrap_err().to_string();
    assert!(error.contains("broken.mmdb"), "{error}");

    let data = dir.path().join("relay");
    let (mut relay, tokens) = TestRelay::start_with(data, move |c| {
        c.geoip = Some(db.clone());
        c.widget_starts_per_ip = 2;
    })
    .await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let start = r#"{"name":"Ines","text":"Hi","location":"Europe/Lisbon · pt-PT"}"#;
    let (status, answer) =
        http_post_json(&relay, &format!("/api/widget/{}/conversations", relay.widget_key("sales")), start).await;
    assert_eq!(status, 200, "{answer}");
    let (session, id) = (answer_field(&answer, "session"), ConversationId(answer_field(&answer, "conversation")));
    // The customer's browser connects at once, before bob's replica has the conversation: the
    // presence still reaches bob.
    let (_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/widget/ws?session={session}", relay.addr)).await.unwrap();
    eventually(5, "the GeoIP location on bob's replica", || {
        bob.with(|r| r.summary(&id).and_then(|s| s.presence.location.clone())) == Some("Loopville, Testland".into())
    })
    .await;

    // One address may start only so many conversations; the next gets a clear 429.
    assert_eq!(
        http_post_json(&relay, &format!("/api/widget/{}/conversations", relay.widget_key("sales")), start).await.0,
        200
    );
    let (status, answer) =
        http_post_json(&relay, &format!("/api/widget/{}/conversations", relay.widget_key("sales")), start).await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("too many conversations"), "{answer}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_relay_address_is_reached_over_tls() {
    // A server that is not speaking TLS: the client must try a TLS handshake (and fail on it), not
    // refuse the address for want of TLS support.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Not TLS\r\n\r\n").await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let replica = crewdesk::replica::Replica::open(dir.path().join("r.sqlite3"), "bob".into()).unwrap();
    let replica = std::sync::Arc::new(std::sync::Mutex::new(replica));
    let (events, _rx) = tokio::sync::mpsc::channel(16);
    let client = sync_client::SyncClient::spawn(
        sync_client::ClientConfig::new(format!("https://{addr}"), "token"),
        replica,
        events,
    );
    let mut status = client.status();
    let error = tokio::time::timeout(std::time::Duration::from_secs(10), status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(!error.contains("not compiled") && !error.contains("not supported"), "{error}");
    assert!(
        error.to_lowercase().contains("tls") || error.contains("InvalidContentType") || error.contains("corrupt"),
        "{error}"
    );
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_import_customer_conversations_and_nobody_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    let post = |path: String, token: &str, body: serde_json::Value| {
        let request = reqwest::Client::new().post(format!("{}{path}", relay.url())).bearer_auth(token).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let start = |team: &str| serde_json::json!({ "team": team, "channel": "email", "customer": { "name": "Rosa Diaz", "email": "rosa@example.com" }, "text": "Imported question", "id": "ticket-17" });
    // Only an admin of the team: a representative is told so, anyone else learns nothing.
    assert_eq!(post("/api/import/conversations".into(), &tokens["bob"], start(demo::SALES)).await.0, 403);
    assert_eq!(post("/api/import/conversations".into(), &tokens["dave"], start(demo::SALES)).await.0, 404);
    assert_eq!(post("/api/import/conversations".into(), "forged", start(demo::SALES)).await.0, 404);
    let (status, answer) =
        post("/api/import/conversations".into(), &tokens["ada"], serde_json::json!({ "team": "sales" })).await;
    assert_eq!(status, 400, "{answer}");
    let mut bad = start(demo::SALES);
    bad["customer"]["email"] = "not an email".into();
    assert_eq!(post("/api/import/conversations".into(), &tokens["ada"], bad).await.0, 400);

    let (status, answer) = post("/api/import/conversations".into(), &tokens["erin"], start(demo::SALES)).await;
    assert_eq!(status, 201, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let id = ConversationId(v["conversation"].as_str().unwrap().to_owned());
    bob.has(&id).await;
    let s = bob.with(|r| r.summary(&id).unwrap().clone());
    assert_eq!((s.channel, s.customer.name.as_str()), (Channel::Email, "Rosa Diaz"));
    assert!(s.waiting_since.is_some(), "an imported customer message waits for a reply");

    // More customer messages; with an id the import is idempotent.
    let path = format!("/api/import/conversations/{}/messages", id.0);
    let follow_up = serde_json::json!({ "text": "Any news?", "id": "ticket-17-2" });
    assert_eq!(post(path.clone(), &tokens["erin"], follow_up.clone()).await.0, 201);
    assert_eq!(post(path.clone(), &tokens["erin"], follow_up).await.0, 200);
    assert_eq!(post(path.clone(), &tokens["bob"], serde_json::json!({ "text": "forged" })).await.0, 403);
    assert_eq!(post(path.clone(), &tokens["dave"], serde_json::json!({ "text": "forged" })).await.0, 404);
    assert_eq!(post(path, &tokens["erin"], serde_json::json!({ "text": "   " })).await.0, 400);
    eventually(10, "bob sees the follow-up once", || bob.message_texts(&id) == ["Imported question", "Any news?"])
        .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_is_compacted_when_loaded_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    // One commit (and one stored chunk) per message.
    for i in 0..120 {
        bob.act(&id, |r| r.send(&id, text(&format!("reply {i}")), Timestamp::now()).unwrap());
        eventually(10, "synced", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    }
    let store = relay.open_store();
    assert!(store.chunk_count(id.as_str()).unwrap() > 100);
    // Loaded again after a restart: merged into one chunk in the background.
    relay.stop().await;
    relay.restart().await;
    let carol = Agent::start(&relay, &tokens, "carol");
    eventually(20, "carol has every message", || carol.message_texts(&id).len() == 121).await;
    eventually(20, "the conversation is one chunk", || store.chunk_count(id.as_str()).unwrap() == 1).await;
    // Work goes on after the merge, and a later load has everything.
    bob.act(&id, |r| r.send(&id, text("after the merge"), Timestamp::now()).unwrap());
    eventually(20, "carol sees the new message", || carol.message_texts(&id).len() == 122).await;
    relay.stop().await;
    relay.restart().await;
    let erin = Agent::start(&relay, &tokens, "erin");
    eventually(20, "a fresh replica gets all 122", || erin.message_texts(&id).len() == 122).await;
    assert_eq!(erin.message_texts(&id), bob.message_texts(&id));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_automerge_repo_client_cannot_forge() {
    let interop = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop");
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let ada = Agent::start(&relay, &tokens, "ada");
    ada.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    ada.has(&id).await;
    let forge = |args: Vec<String>| {
        let url = format!("ws://{}/?token={}", relay.addr, tokens["bob"]);
        tokio::process::Command::new("node").arg(interop.join("forge.mjs")).arg(url).args(args).output()
    };
    // A new conversation forged at creation: a customer message, a message in ada's name, ada in the room.
    let output = forge(vec!["create".into(), demo::SALES.into(), "bob".into()]).await.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node failed: {stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("refused: document") && stdout.contains("start when the customer writes"), "{stdout}");
    let forged = stdout.lines().find_map(|l| l.strip_prefix("document: ")).unwrap().trim().to_owned();
    // A customer message written into an existing conversation.
    let output = forge(vec!["customer".into(), id.0.clone(), "bob".into()]).await.expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("refused: document") && stdout.contains("customer messages come only"), "{stdout}");
    // Nothing of it reached ada or the store.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(ada.with(|r| r.summary(&ConversationId(forged.clone())).is_none()));
    assert_eq!(ada.message_texts(&id), ["Hello?"]);
    assert!(relay.open_store().load_document(&forged).unwrap().is_none());
    relay.stop().await;
}
