//! The relay's trust boundary, tried as a signed-in agent with a modified client would: every
//! change is judged on its own by the core's judge (creation included), every sync message is
//! parsed within limits before automerge sees it, and each refusal is an `error` frame naming the
//! rule. After each attack the relay still serves everyone and the stored conversation is unchanged.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use automerge::sync::SyncDoc;
use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ObjType, ROOT, ReadDoc};
use crewdesk::demo;
use crewdesk::domain::{
    AgentId, Author, Channel, Customer, CustomerId, Message, MessageBody, MessageId, TeamId, Timestamp,
};
use crewdesk::replica::doc::{self, DocError};
use crewdesk::sync::wire::WireMessage;
use system_tests::{Agent, RawClient, TestRelay, attempt, eventually, fetch, next_about, send_sync, sync_with};
use tokio_tungstenite::tungstenite::Message as Frame;

/// Refusals per agent and minute before the relay stops reading its changes (the relay's figure).
const MAX_REFUSALS: usize = 30;

fn text(t: &str) -> MessageBody {
    MessageBody::Text { text: t.into() }
}

fn crew(id: &str, agent: &str, at: Timestamp, body: MessageBody) -> Message {
    Message { id: MessageId(id.into()), at, author: doc::crew(&agent.into()), body }
}

fn nested(depth: usize) -> impl FnOnce(&mut Transaction<'_>) -> Result<(), DocError> {
    move |tx| {
        let (_, messages) = tx.get(ROOT, "messages")?.unwrap();
        let m = tx.put_object(&messages, "m-deep", ObjType::Map)?;
        tx.put(&m, "id", "m-deep")?;
        let mut obj = tx.put_object(&m, "body", ObjType::Map)?;
        for _ in 0..depth {
            obj = tx.put_object(&obj, "x", ObjType::Map)?;
        }
        Ok(())
    }
}

fn attachment(blob: &str) -> impl FnOnce(&mut Transaction<'_>) -> Result<(), DocError> {
    let blob = blob.to_owned();
    move |tx| {
        doc::set_in_room(tx, &"bob".into(), true)?;
        let body = MessageBody::Attachment { blob, file_name: "passwd".into(), mime: "text/plain".into(), size: 10 };
        doc::add_message(tx, &crew("m-file", "bob", Timestamp::now(), body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_change_is_refused_with_its_rule_and_everyone_else_keeps_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let carol = Agent::start(&relay, &tokens, "carol");
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    carol.has(&id).await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = fetch(&mut bob, id.as_str()).await;
    let stored = |relay: &TestRelay| {
        let (_, d) = relay.open_store().load_document(id.as_str()).unwrap().unwrap();
        Automerge::load(&d).unwrap().get_heads()
    };
    let heads = stored(&relay);

    type Forge = Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), DocError>>;
    let future = Timestamp::now().plus(24 * 3600 * 1000);
    let cases: Vec<(&str, Forge)> = vec![
        // One change nested 3,000 maps deep used to overflow the relay's stack.
        ("nests deeper than", Box::new(nested(3_000))),
        // A file reference that walks out of the blob store, or is not a content address at all.
        ("content address", Box::new(attachment("sha256:../../../../etc/passwd"))),
        ("content address", Box::new(attachment("sha256:/proc/self/environ"))),
        ("content address", Box::new(attachment("sha256:a"))),
        // A counter near its maximum: one more increment used to overflow inside automerge (a
        // panic in builds with overflow checks). No counter gets in.
        (
            "has no counters",
            Box::new(|tx| {
                let (_, c) = tx.get(ROOT, "customer")?.unwrap();
                Ok(tx.put(&c, "notes", automerge::ScalarValue::counter(i64::MAX))?)
            }),
        ),
        ("cannot change its id, team, channel", Box::new(|tx| Ok(tx.put(ROOT, "channel", "whatsapp")?))),
        ("cannot change its id, team, channel", Box::new(|tx| Ok(tx.put(ROOT, "created_at", 0)?))),
        ("unknown field", Box::new(|tx| Ok(tx.put(ROOT, "junk", "x".repeat(200_000))?))),
        ("over a limit", Box::new(|tx| Ok(tx.put(ROOT, "junk", "x".repeat(2 << 20))?))),
        (
            "dated in the future",
            Box::new(move |tx| {
                doc::set_in_room(tx, &"bob".into(), true)?;
                doc::add_message(tx, &crew("m-late", "bob", future, text("From tomorrow")))
            }),
        ),
        (
            "http(s) URL",
            Box::new(|tx| {
                doc::set_in_room(tx, &"bob".into(), true)?;
                let body = MessageBody::ConferenceInvitation { url: "javascript:alert(1)".into() };
                doc::add_message(tx, &crew("m-js", "bob", Timestamp::now(), body))
            }),
        ),
        (
            "customer messages come only",
            Box::new(|tx| {
                doc::set_in_room(tx, &"bob".into(), true)?;
                let m = Message { author: Author::Customer, ..crew("m-c", "bob", Timestamp::now(), text("Refund me")) };
                doc::add_message(tx, &m)
            }),
        ),
        (
            "customer's id cannot change",
            Box::new(|tx| {
                doc::set_in_room(tx, &"bob".into(), true)?;
                let (_, c) = tx.get(ROOT, "customer")?.unwrap();
                Ok(tx.put(&c, "id", "someone-else")?)
            }),
        ),
    ];
    for (rule, forge) in cases {
        let got = attempt(&mut bob, id.as_str(), &copy, forge).await;
        assert!(got.contains(rule), "expected a refusal naming `{rule}`, got `{got}`");
        assert!(got.contains(id.as_str()), "the refusal names the conversation: {got}");
        assert_eq!(stored(&relay), heads, "nothing of a refused change is stored ({rule})");
    }
    // The same connection is still served: an honest change goes through.
    let join = attempt(&mut bob, id.as_str(), &copy, |tx| doc::set_in_room(tx, &"bob".into(), true)).await;
    assert_eq!(join, "accepted");
    // Everyone else too, and nobody saw anything forged.
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    carol.act(&id, |r| r.send(&id, text("still here"), Timestamp::now()).unwrap());
    eventually(10, "carol's reply is stored", || carol.with(|r| r.unsynced().unwrap().0) == 0).await;
    assert_eq!(carol.message_texts(&id), ["Hello?", "still here"]);
    relay.stop().await;
}

/// A sync message with one bloom filter, as automerge encodes it (v1, no heads, no changes).
fn with_bloom(entries: u8, bits_per_entry: u8, probes: &[u8], bits: usize) -> Vec<u8> {
    let bloom = [&[entries, bits_per_entry][..], probes, &vec![0xaa; bits]].concat();
    [&[0x42, 0x00, 0x00, 0x01, 0x00, bloom.len() as u8][..], &bloom, &[0x00]].concat()
}

/// A compressed change chunk whose body inflates to `size` zero bytes.
fn compressed_bomb(size: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![0; size]).unwrap();
    let body = z.finish().unwrap();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 0x02];
    let mut n = body.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        chunk.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    chunk.extend(body);
    chunk
}

fn with_changes(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut m = automerge::sync::Message::decode(&[0x42, 0, 0, 0, 0]).unwrap();
    m.changes = chunks.to_vec().into();
    m.encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automerge_bombs_are_refused_before_automerge_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let carol = Agent::start(&relay, &tokens, "carol");
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    carol.has(&id).await;
    // Built before connecting: deflating 64 MiB takes a few seconds in a debug build, longer than
    // the relay waits for a silent connection.
    let whole_document =
        doc::create(automerge::ActorId::random(), &new_conversation(id.as_str(), Channel::Email)).unwrap().save();
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        // bits_per_entry = 0 divided by zero under the conversation's lock.
        ("bits per entry", with_bloom(1, 0, &[7], 0)),
        // 2^32 - 1 probes cost minutes of CPU.
        ("probes", with_bloom(1, 10, &[0xff, 0xff, 0xff, 0xff, 0x0f], 2)),
        // 64 MiB of zeros in a few dozen KiB.
        ("inflate", with_changes(&[compressed_bomb(64 << 20)])),
        // A whole document: its compressed columns cannot be bounded before automerge reads them.
        ("document", with_changes(&[whole_document])),
        ("not automerge", with_changes(&[b"garbage".to_vec()])),
    ];
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = fetch(&mut bob, id.as_str()).await;
    for (what, bytes) in bombs {
        send_sync(&mut bob, id.as_str(), bytes).await;
        match next_about(&mut bob, id.as_str()).await {
            Some(WireMessage::Error { message, .. }) => {
                assert!(message.contains("over a limit") || message.contains("malformed"), "{what}: {message}");
            }
            other => panic!("{what}: expected an error, got {other:?}"),
        }
    }
    // A change asked for twice made automerge panic while the relay answered (found by fuzzing).
    let head = copy.get_heads()[0];
    let twice = [&[0x42, 0x00, 0x02][..], &head.0, &head.0, &[0x00, 0x00]].concat();
    send_sync(&mut bob, id.as_str(), twice).await;
    match next_about(&mut bob, id.as_str()).await {
        Some(WireMessage::Error { message, .. }) => assert!(message.contains("twice"), "{message}"),
        other => panic!("a change asked for twice: expected an error, got {other:?}"),
    }
    // Ids longer than any automerge-repo peer uses are refused as malformed.
    let long = WireMessage::Sync {
        sender_id: "x".repeat(10_000),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        data: vec![0x42, 0, 0, 0, 0],
    };
    bob.send(&long).await;
    assert!(matches!(bob.next().await, Some(WireMessage::Error { message, .. }) if message.contains("longer than")));
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    carol.act(&id, |r| r.send(&id, text("still here"), Timestamp::now()).unwrap());
    eventually(10, "carol's reply is stored", || carol.with(|r| r.unsynced().unwrap().0) == 0).await;
    relay.stop().await;
}

fn new_conversation(id: &str, channel: Channel) -> doc::NewConversation {
    doc::NewConversation {
        id: id.into(),
        team: demo::SALES.into(),
        channel,
        customer: Customer {
            id: CustomerId("c-forged".into()),
            name: "Mallory".into(),
            email: Some("mallory@example.com".into()),
            phone: Some("+15550100".into()),
            notes: None,
        },
        created_at: Timestamp::now(),
    }
}

/// Offers a new document to the relay and sends what it asks for; returns the error or
/// "unavailable" it answers with, or "stored" when it took the conversation.
async fn create(client: &mut RawClient, id: &str, d: &Automerge) -> String {
    let mut state = automerge::sync::State::new();
    assert!(sync_with(client, id, d, &mut state).await);
    let mut error = None;
    for _ in 0..10 {
        match next_about(client, id).await {
            Some(WireMessage::Sync { data, .. }) => {
                let m = automerge::sync::Message::decode(&data).unwrap();
                let covered = !m.heads.is_empty() && m.heads == d.get_heads();
                let mut copy = d.fork();
                copy.receive_sync_message(&mut state, m).unwrap();
                if covered {
                    return "stored".into();
                }
                sync_with(client, id, &copy, &mut state).await;
            }
            Some(WireMessage::Error { message, .. }) => error = Some(message),
            Some(WireMessage::DocUnavailable { .. }) => return error.unwrap_or_else(|| "unavailable".into()),
            other => return format!("{other:?}"),
        }
    }
    "no answer".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_conversation_is_judged_like_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let ada = Agent::start(&relay, &tokens, "ada");
    ada.connected().await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));

    // A WhatsApp conversation whose first change carries a customer message, a message in the
    // admin's name and the admin in the room: all of it forged by a representative.
    let forged_id = crewdesk::sync::document_id::encode(&[9; 16]);
    let mut forged = Automerge::new();
    forged
        .transact::<_, _, DocError>(|tx| {
            doc::write_new(tx, &new_conversation(&forged_id, Channel::WhatsApp))?;
            doc::set_in_room(tx, &"ada".into(), true)?;
            let m = Message { author: Author::Customer, ..crew("m1", "bob", Timestamp::now(), text("Send it to me")) };
            doc::add_message(tx, &m)?;
            doc::add_message(tx, &crew("m2", "ada", Timestamp::now(), text("Refund approved")))
        })
        .unwrap();
    let got = create(&mut bob, &forged_id, &forged).await;
    assert!(got.contains("start when the customer writes"), "{got}");
    // The same content on the email channel is still refused, for the forged parts.
    let email_id = crewdesk::sync::document_id::encode(&[10; 16]);
    let mut email = Automerge::new();
    email
        .transact::<_, _, DocError>(|tx| {
            doc::write_new(tx, &new_conversation(&email_id, Channel::Email))?;
            doc::set_in_room(tx, &"ada".into(), true)
        })
        .unwrap();
    let got = create(&mut bob, &email_id, &email).await;
    assert!(got.contains("only for themselves"), "{got}");

    // A new conversation carrying a counter and an increment: refused before automerge applies it
    // (an increment past the counter's maximum made automerge panic while the relay read which team
    // the conversation claims, in builds with overflow checks).
    let counter_id = crewdesk::sync::document_id::encode(&[12; 16]);
    let mut counter = Automerge::new();
    counter
        .transact::<_, _, DocError>(|tx| {
            doc::write_new(tx, &new_conversation(&counter_id, Channel::Email))?;
            let (_, c) = tx.get(ROOT, "customer")?.unwrap();
            tx.put(&c, "notes", automerge::ScalarValue::counter(5))?;
            Ok(tx.increment(&c, "notes", 1)?)
        })
        .unwrap();
    let got = create(&mut bob, &counter_id, &counter).await;
    assert!(got.contains("has no counters"), "{got}");

    // An honest email thread, opened by bob with his own first message, is stored and reaches ada.
    let honest_id = crewdesk::sync::document_id::encode(&[11; 16]);
    let mut honest = Automerge::new();
    honest
        .transact::<_, _, DocError>(|tx| {
            doc::write_new(tx, &new_conversation(&honest_id, Channel::Email))?;
            doc::set_in_room(tx, &"bob".into(), true)?;
            doc::add_message(tx, &crew("m1", "bob", Timestamp::now(), text("Following up on your order")))
        })
        .unwrap();
    assert_eq!(create(&mut bob, &honest_id, &honest).await, "stored");
    let honest_id = crewdesk::domain::ConversationId(honest_id);
    ada.has(&honest_id).await;
    assert!(ada.with(|r| r.summary(&crewdesk::domain::ConversationId(forged_id.clone())).is_none()));
    assert!(ada.with(|r| r.summary(&crewdesk::domain::ConversationId(email_id.clone())).is_none()));
    let store = relay.open_store();
    assert!(store.load_document(&forged_id).unwrap().is_none(), "nothing forged is stored");
    assert!(store.load_document(&email_id).unwrap().is_none(), "nothing forged is stored");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_reply_and_leave_made_offline_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    carol.has(&id).await;
    // Offline, bob joins, replies and leaves: three changes, each judged on its own when they arrive.
    bob.disconnect().await;
    bob.with(|r| r.join(&id, Timestamp::now()).unwrap());
    bob.with(|r| r.send(&id, text("Answered from the train"), Timestamp::now()).unwrap());
    bob.with(|r| r.leave(&id).unwrap());
    assert_eq!(bob.with(|r| r.unsynced().unwrap().0), 3);
    bob.reconnect();
    eventually(15, "carol sees the reply", || carol.message_texts(&id).contains(&"Answered from the train".into()))
        .await;
    eventually(15, "bob's outbox is empty", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    assert!(carol.with(|r| r.summary(&id).unwrap().crew_in_room.is_empty()), "bob left again");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_frames_do_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let carol = Agent::start(&relay, &tokens, "carol");
    let ada = Agent::start(&relay, &tokens, "ada");
    carol.connected().await;
    ada.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    carol.has(&id).await;
    ada.has(&id).await;
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = fetch(&mut bob, id.as_str()).await;
    // 1,000 refused changes (a new one each time, so none is refused from memory), sent without
    // waiting for the answers, while carol keeps writing. After MAX_REFUSALS the relay reads no
    // more of them: bob's connection is closed with 4008.
    let forged = |copy: &Automerge, n: usize| {
        let mut attempt = copy.fork();
        attempt
            .transact::<_, _, DocError>(|tx| {
                let m = Message {
                    author: Author::Customer,
                    ..crew(&format!("f{n}"), "bob", Timestamp::now(), text("forged"))
                };
                doc::add_message(tx, &m)
            })
            .unwrap();
        let change = attempt.get_last_local_change().unwrap();
        let mut m = automerge::sync::Message::decode(&[0x42, 0, 0, 0, 0]).unwrap();
        m.heads = attempt.get_heads();
        m.changes = vec![change.raw_bytes().to_vec()].into();
        WireMessage::Sync {
            sender_id: "raw".into(),
            target_id: "relay".into(),
            document_id: id.0.clone(),
            data: m.encode(),
        }
    };
    let frames: Vec<WireMessage> = (0..1_000).map(|n| forged(&copy, n)).collect();
    let again = forged(&copy, 1_000);
    let hostile = tokio::spawn(async move {
        let mut sent = 0;
        for f in &frames {
            if !bob.send_raw(Frame::Binary(f.encode().into())).await {
                break;
            }
            sent += 1;
        }
        let (code, _, errors) = bob.closed(std::time::Duration::from_secs(30)).await;
        (sent, code, errors.iter().filter(|e| e.contains("; refused (change")).count())
    });
    for n in 0..20 {
        carol.act(&id, |r| r.send(&id, text(&format!("reply {n}")), Timestamp::now()).unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eventually(30, "ada has every reply", || ada.message_texts(&id).len() == 21).await;
    let (sent, code, refused) = hostile.await.unwrap();
    assert_eq!(code, 4008, "too many refused changes");
    assert!(refused > 0 && refused <= MAX_REFUSALS + 1, "{refused} refusals of {sent} frames sent");
    assert!(ada.message_texts(&id).iter().all(|t| t != "forged"));
    // The limit is the agent's, not the connection's: a new connection is closed at its first change.
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    bob.send(&again).await;
    assert_eq!(bob.closed(std::time::Duration::from_secs(5)).await.0, 4008);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_writes_with_a_teammates_actor() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let carol = Agent::start(&relay, &tokens, "carol");
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    carol.has(&id).await;
    carol.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    eventually(10, "carol's join is stored", || carol.with(|r| r.unsynced().unwrap().0) == 0).await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = fetch(&mut bob, id.as_str()).await;
    // bob takes carol's actor (and so her next sequence number) for a change of his own.
    let joined = copy.get_changes(&[]).into_iter().find(|c| {
        let at = copy.fork_at(&[c.hash()]).unwrap();
        at.get_heads() == vec![c.hash()] && doc::read_header(&at).unwrap().crew_in_room.contains(&"carol".into())
    });
    let carols = joined.expect("carol's join").actor_id().clone();
    let forged = copy.fork().with_actor(carols);
    let got = attempt(&mut bob, id.as_str(), &forged, |tx| doc::set_in_room(tx, &"bob".into(), true)).await;
    assert!(got.contains("another agent's actor"), "{got}");
    // Carol's own next change (with that same sequence number) still goes through.
    carol.act(&id, |r| r.send(&id, text("mine"), Timestamp::now()).unwrap());
    eventually(10, "carol's reply is stored", || carol.with(|r| r.unsynced().unwrap().0) == 0).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_because_the_rules_changed_offline_is_taken_back_and_its_reply_shown_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    carol.has(&id).await;
    // Offline, bob joins and replies (Sales is an open team as far as his replica knows);
    // meanwhile an admin switches Sales to grab mode, where representatives grab instead.
    bob.disconnect().await;
    bob.with(|r| r.join(&id, Timestamp::now()).unwrap());
    bob.with(|r| r.send(&id, text("Typed on the train"), Timestamp::now()).unwrap());
    let store = relay.open_store();
    let mut sales = store.teams().unwrap().into_iter().find(|t| t.id.as_str() == demo::SALES).unwrap();
    sales.mode = crewdesk::domain::TeamMode::Grab;
    store.put_team(&sales).unwrap();
    bob.reconnect();
    eventually(15, "bob sees why", || bob.with(|r| r.refusal(&id).map(str::to_owned)).is_some()).await;
    let reason = bob.with(|r| r.refusal(&id).unwrap().to_owned());
    assert!(reason.contains("grab"), "{reason}");
    // The refused join and the reply that depends on it are taken back: nothing waits for ever,
    // and the reply is shown as not delivered, with why, for bob to copy.
    eventually(15, "bob's outbox is empty", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    eventually(15, "the reply is shown as not delivered", || {
        bob.with(|r| r.undelivered(&id).unwrap().iter().any(|u| u.state == "failed"))
    })
    .await;
    let undelivered = bob.with(|r| r.undelivered(&id).unwrap());
    assert_eq!(undelivered.len(), 1, "{undelivered:?}");
    assert_eq!(undelivered[0].message.body, text("Typed on the train"));
    assert!(!bob.message_texts(&id).contains(&"Typed on the train".into()), "taken back out of the conversation");
    // bob keeps syncing the conversation: a customer message reaches him, and carol never saw the reply.
    relay.customer_writes(&tokens["ada"], &id, "Anyone there?", Timestamp::now()).await;
    eventually(15, "bob still syncs", || bob.message_texts(&id).contains(&"Anyone there?".into())).await;
    assert!(!carol.message_texts(&id).contains(&"Typed on the train".into()));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_typed_offline_by_an_agent_removed_from_the_team_is_shown_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    eventually(15, "the join is synced", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    bob.disconnect().await;
    bob.with(|r| r.send(&id, text("Sent after I was removed"), Timestamp::now()).unwrap());
    let store = relay.open_store();
    assert!(store.remove_member(&TeamId::from(demo::SALES), &AgentId::from("bob")).unwrap());
    bob.reconnect();
    eventually(15, "bob's outbox is empty", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    let undelivered = bob.with(|r| r.undelivered(&id).unwrap());
    assert_eq!(undelivered.len(), 1, "{undelivered:?}");
    assert_eq!(undelivered[0].state, "failed");
    assert!(undelivered[0].reason.contains("does not share"), "{}", undelivered[0].reason);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_typed_offline_in_a_conversation_an_admin_closed_meanwhile_never_gets_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut bob = Agent::start(&relay, &tokens, "bob");
    let ada = Agent::start(&relay, &tokens, "ada");
    bob.connected().await;
    ada.connected().await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    bob.has(&id).await;
    ada.has(&id).await;
    // Offline, bob joins and replies; meanwhile ada (admin) closes the conversation.
    bob.disconnect().await;
    bob.with(|r| r.join(&id, Timestamp::now()).unwrap());
    bob.with(|r| r.send(&id, text("Typed while it was being closed"), Timestamp::now()).unwrap());
    ada.act(&id, |r| r.close(&id, Timestamp::now()).unwrap());
    eventually(15, "the close is synced", || ada.with(|r| r.unsynced().unwrap().0) == 0).await;
    bob.reconnect();
    eventually(15, "bob's outbox is empty", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    // Either the reply went through (crew may follow up in a closed conversation) or it is shown
    // as not delivered with the reason: never both, never neither.
    let delivered = || ada.message_texts(&id).contains(&"Typed while it was being closed".into());
    let shown = || bob.with(|r| r.undelivered(&id).unwrap().iter().any(|u| u.state == "failed"));
    eventually(15, "the reply is delivered or shown as not delivered", || delivered() || shown()).await;
    assert!(!(delivered() && shown()), "delivered and shown as not delivered");
    relay.stop().await;
}

/// Text that does not compress (the relay counts the changes' bytes as they are).
fn noise(seed: u64, n: usize) -> String {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            char::from(b'a' + (s >> 59) as u8 % 26)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_never_get_their_dependencies_are_bounded_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let carol = Agent::start(&relay, &tokens, "carol");
    carol.connected().await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    // In each of six conversations, bob sends 3.4 MiB of replies whose first change (his join) he
    // never sends: every reply waits for it. One conversation's queue may hold that much, one
    // connection's queues together 16 MiB: the fifth or sixth conversation tells him to start over.
    let mut ids = Vec::new();
    let mut started_over = Vec::new();
    for c in 0..6_u64 {
        let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
        let mut copy = fetch(&mut bob, id.as_str()).await;
        copy.transact::<_, _, DocError>(|tx| doc::set_in_room(tx, &"bob".into(), true)).unwrap();
        let mut replies = Vec::new();
        for n in 0..34 {
            let m = crew(&format!("w{c}-{n}"), "bob", Timestamp::now(), text(&noise(c * 100 + n, 100_000)));
            copy.transact::<_, _, DocError>(|tx| doc::add_message(tx, &m)).unwrap();
            replies.push(copy.get_last_local_change().unwrap());
        }
        for batch in replies.chunks(8) {
            let mut m = automerge::sync::Message::decode(&[0x42, 0, 0, 0, 0]).unwrap();
            m.heads = copy.get_heads();
            m.changes = batch.iter().map(|c| c.raw_bytes().to_vec()).collect::<Vec<_>>().into();
            send_sync(&mut bob, id.as_str(), m.encode()).await;
        }
        // Every frame is answered (a request for the missing join, or the error) before the next
        // conversation.
        let mut answers = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(std::time::Duration::from_millis(1500), bob.next()).await {
            answers.push(m);
        }
        let over = answers.iter().any(
            |m| matches!(m, WireMessage::Error { message, .. } if message.contains(id.as_str()) && message.contains("starts over")),
        );
        started_over.push(over);
        ids.push(id);
    }
    assert_eq!(&started_over[..4], [false; 4], "four conversations' waiting replies fit");
    assert!(started_over[4] || started_over[5], "the connection's bound is met: {started_over:?}");
    // Nothing of it is stored, and everyone (bob too) is still served.
    let join = {
        let id = ids[0].as_str();
        let copy = fetch(&mut bob, id).await;
        attempt(&mut bob, id, &copy, |tx| doc::set_in_room(tx, &"bob".into(), true)).await
    };
    assert_eq!(join, "accepted");
    carol.has(&ids[5]).await;
    carol.act(&ids[5], |r| r.join(&ids[5], Timestamp::now()).unwrap());
    carol.act(&ids[5], |r| r.send(&ids[5], text("still here"), Timestamp::now()).unwrap());
    eventually(10, "carol's reply is stored", || carol.with(|r| r.unsynced().unwrap().0) == 0).await;
    assert_eq!(carol.message_texts(&ids[5]), ["Hello?", "still here"]);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_its_own_time_beside_each_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let id = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    let mut bob = RawClient::connect(&relay, Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let copy = fetch(&mut bob, id.as_str()).await;
    // A date in the past is the author's to choose (a reply typed offline yesterday), but the
    // relay keeps when it really arrived beside it.
    let yesterday = Timestamp::now().plus(-24 * 3600 * 1000);
    let sent = Timestamp::now();
    let got = attempt(&mut bob, id.as_str(), &copy, move |tx| {
        doc::set_in_room(tx, &"bob".into(), true)?;
        doc::add_message(tx, &crew("m-yesterday", "bob", yesterday, text("Typed yesterday")))
    })
    .await;
    assert_eq!(got, "accepted");
    let times = relay.open_store().message_times(id.as_str()).unwrap();
    let (_, at, received_at) = times.iter().find(|(m, _, _)| m == "m-yesterday").expect("recorded").clone();
    assert_eq!(at, yesterday.0);
    assert!(received_at >= sent.0 && received_at <= Timestamp::now().0, "{received_at} is the relay's time");
    relay.stop().await;
}
