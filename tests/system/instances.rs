//! Several relay instances over one PostgreSQL database: agents on different instances see each
//! other, move between instances, race for grabs across them, survive an instance's SIGKILL and
//! a dropped LISTEN connection; and a SQLite deployment moves to PostgreSQL intact.
//! Needs `CREWDESK_TEST_POSTGRES` (`cargo xtask test` starts a throwaway cluster).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use crewdesk::domain::{Channel, Member, Message, MessageBody, MessageId, Role, TeamId, Timestamp};
use crewdesk::replica::doc;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;
use sync_server::store::Store;
use system_tests::{
    Agent, RawClient, RelayProcess, TestRelay, eventually, free_port, grab_all, one_owner_everywhere,
    postgres_database, relay_binary, wait_listening,
};

/// `n` relay instances in this process over one fresh PostgreSQL database, with the demo accounts.
async fn instances(n: usize, dir: &Path) -> (Vec<TestRelay>, HashMap<String, String>) {
    let (first, tokens) = TestRelay::start_on(dir.join("i0"), Some(postgres_database())).await;
    let mut all = vec![first];
    for i in 1..n {
        let next = all[0].another_instance(dir.join(format!("i{i}"))).await;
        all.push(next);
    }
    (all, tokens)
}

/// Two instances; bob (in the room) on the first, carol on the second, both with a new Sales
/// conversation started through the first.
async fn bob_and_carol_on_two_instances(
    dir: &Path,
) -> (Vec<TestRelay>, HashMap<String, String>, Agent, Agent, crewdesk::domain::ConversationId) {
    let (relays, tokens) = instances(2, dir).await;
    let bob = Agent::start(&relays[0], &tokens, "bob");
    let carol = Agent::start(&relays[1], &tokens, "carol");
    let id = relays[0].customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    bob.has(&id).await;
    carol.has(&id).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    (relays, tokens, bob, carol, id)
}

/// Adds representatives `prefix00…` to a team and returns their tokens.
fn add_reps(store: &Store, team: &str, prefix: &str, n: usize, tokens: &mut HashMap<String, String>) -> Vec<String> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i:02}")).collect();
    for name in &names {
        let member = Member { agent: name.as_str().into(), name: name.clone(), role: Role::Representative };
        store.add_member(&TeamId::from(team), &member).unwrap();
        tokens.insert(name.clone(), store.issue_token(&name.as_str().into(), "test").unwrap());
    }
    names
}

fn messages(a: &Agent, id: &crewdesk::domain::ConversationId) -> Vec<Message> {
    a.with(|r| r.stored_messages(id).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_three_instances_converge_while_moving_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, mut tokens) = instances(3, dir.path()).await;
    let names = add_reps(&relays[0].open_store(), demo::SALES, "rep", 6, &mut tokens);
    let mut agents: Vec<(String, usize, Agent)> =
        names.iter().enumerate().map(|(i, n)| (n.clone(), i % 3, Agent::start(&relays[i % 3], &tokens, n))).collect();
    // A conversation started through instance 1 reaches agents on every instance.
    let id = relays[1].customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    for (_, _, a) in &agents {
        a.has(&id).await;
        a.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1257);
    let mut expected: BTreeSet<MessageId> = BTreeSet::new();
    expected.insert(MessageId::from("m-first"));
    for round in 0..150 {
        let k = rng.random_range(0..agents.len());
        let (name, at, agent) = &mut agents[k];
        match rng.random_range(0..10) {
            // Off the network; back later, through another instance (a load balancer's choice).
            0 if agent.client.is_some() => {
                agent.disconnect().await;
                *at = (*at + rng.random_range(1..3)) % 3;
                agent.move_to(relays[*at].url());
            }
            1 if agent.client.is_none() => agent.reconnect(),
            _ => {
                let text = format!("{name} {round}");
                let mid = agent.act(&id, |r| r.send(&id, MessageBody::Text { text }, Timestamp::now()).unwrap());
                expected.insert(mid);
            }
        }
        if round % 40 == 20 {
            // The customer writes through instance 2.
            assert!(
                relays[2].customer_writes(&tokens["ada"], &id, &format!("customer {round}"), Timestamp::now()).await
            );
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..8))).await;
    }
    for (_, _, a) in agents.iter_mut() {
        a.reconnect();
    }
    let customer_messages = 4;
    eventually(60, "every replica has every message, identically", || {
        let all: Vec<Vec<Message>> = agents.iter().map(|(_, _, a)| messages(a, &id)).collect();
        all[0].len() == expected.len() + customer_messages && all.iter().all(|m| *m == all[0])
    })
    .await;
    let reference = messages(&agents[0].2, &id);
    let ids: HashSet<&MessageId> = reference.iter().map(|m| &m.id).collect();
    assert_eq!(ids.len(), reference.len(), "no message duplicated");
    assert!(expected.iter().all(|m| ids.contains(m)), "no message lost");
    for r in relays.iter_mut() {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_grabs_spread_over_three_instances_have_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, mut tokens) = instances(3, dir.path()).await;
    let names = add_reps(&relays[0].open_store(), demo::SUPPORT, "grabber", 50, &mut tokens);
    let ada = Agent::start(&relays[0], &tokens, "ada");
    let mut reps: Vec<Agent> =
        names.iter().enumerate().map(|(i, n)| Agent::start(&relays[i % 3], &tokens, n)).collect();
    let id = relays[2].customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::WhatsApp).await;
    for r in &reps {
        eventually(60, "every representative has the conversation", || r.with(|x| x.summary(&id).is_some())).await;
    }
    // Every fifth representative grabs offline and comes back through another instance.
    for (i, r) in reps.iter_mut().enumerate().step_by(5) {
        r.disconnect().await;
        r.move_to(relays[(i + 1) % 3].url());
    }
    let requested = grab_all(&reps, &id);
    assert!(requested >= 10, "{requested} grabs");
    for r in reps.iter_mut() {
        r.reconnect();
    }
    let owner = one_owner_everywhere(&reps, &[&ada], &id, requested).await;
    // The stored conversation names the same owner.
    let (_, bytes) = relays[1].open_store().load_document(id.as_str()).unwrap().unwrap();
    let stored = doc::read_header(&automerge::Automerge::load(&bytes).unwrap()).unwrap();
    assert_eq!(stored.owner, Some(owner));
    for r in relays.iter_mut() {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_during_load_loses_nothing_and_its_agents_move_on() {
    let dir = tempfile::tempdir().unwrap();
    // Accounts through a relay in this process, then three relay processes on the same database.
    let (mut setup, mut tokens) = TestRelay::start_on(dir.path().join("setup"), Some(postgres_database())).await;
    let names = add_reps(&setup.open_store(), demo::SALES, "rep", 6, &mut tokens);
    let id = setup.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    setup.stop().await;
    let url = setup.store.clone();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut processes: Vec<Option<RelayProcess>> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| Some(RelayProcess::spawn(&dir.path().join(format!("p{i}")), url.as_deref(), *p)))
        .collect();
    for p in &ports {
        wait_listening(*p).await;
    }
    let at = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    let mut agents: Vec<(String, Agent)> =
        names.iter().enumerate().map(|(i, n)| (n.clone(), Agent::start_at(at(i % 3), &tokens, n))).collect();
    for (_, a) in &agents {
        a.has(&id).await;
        a.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0dead);
    let mut acked: BTreeSet<MessageId> = BTreeSet::new();
    let mut sent: HashMap<String, Vec<MessageId>> = HashMap::new();
    for round in 0..120 {
        let (name, agent) = &agents[round % agents.len()];
        let mid = agent.act(&id, |r| {
            r.send(&id, MessageBody::Text { text: format!("{name} {round}") }, Timestamp::now()).unwrap()
        });
        sent.entry(name.clone()).or_default().push(mid);
        for (name, agent) in &agents {
            if agent.with(|r| r.unsynced().unwrap().0) == 0 {
                acked.extend(sent.remove(name).unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(2..15))).await;
        if round == 50 {
            // SIGKILL instance 0 mid-load; its agents come back through the other two.
            processes[0].take().unwrap().kill();
            for (i, (_, a)) in agents.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
                a.disconnect().await;
                a.move_to(at(1 + i % 2));
                a.reconnect();
            }
        }
    }
    assert!(!acked.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agents.iter().any(|(_, a)| a.with(|r| r.unsynced().unwrap().0) > 0) {
        assert!(std::time::Instant::now() < deadline, "replicas still have unsynced changes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(60, "replicas converge", || {
        let all: Vec<Vec<Message>> = agents.iter().map(|(_, a)| messages(a, &id)).collect();
        all[0].len() == 121 && all.iter().all(|m| *m == all[0])
    })
    .await;
    // PostgreSQL holds every acknowledged message.
    let (_, bytes) = setup.open_store().load_document(id.as_str()).unwrap().unwrap();
    let stored = automerge::Automerge::load(&bytes).unwrap();
    let on_relay: BTreeSet<MessageId> = doc::all_messages(&stored).unwrap().into_iter().map(|m| m.id).collect();
    let missing: Vec<_> = acked.difference(&on_relay).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    drop(processes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listen_connection_is_caught_up_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, tokens, bob, carol, id) = bob_and_carol_on_two_instances(dir.path()).await;
    let url = relays[0].store.clone().unwrap();
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Cut both instances' LISTEN connections again and again while bob writes and a new
    // conversation starts: notifications sent meanwhile are lost, the changes must not be.
    let mut terminated = 0;
    let mut second = None;
    for i in 0..20 {
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'crewdesk-listen' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        terminated += rows.len();
        bob.act(&id, |r| {
            r.send(&id, MessageBody::Text { text: format!("during outage {i}") }, Timestamp::now()).unwrap()
        });
        if i == 10 {
            second = Some(relays[0].customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(terminated >= 2, "the LISTEN connections were cut ({terminated})");
    eventually(30, "carol has every message bob wrote", || carol.message_texts(&id).len() == 21).await;
    carol.has(&second.unwrap()).await;
    for r in relays.iter_mut() {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_demo_deployment_to_postgres_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sqlite");
    // A SQLite deployment: demo accounts and conversations, then live work on top.
    let (mut relay, tokens) = TestRelay::start_on(data.clone(), None).await;
    {
        let store = relay.open_store();
        let docs: Vec<_> = demo::conversations(&demo::DemoSpec::default(), Timestamp::now())
            .unwrap()
            .into_iter()
            .map(|c| {
                let team = doc::read_header(&c.document).unwrap().team;
                (c.id.0, team, c.document.save())
            })
            .collect();
        assert!(store.import_documents(&docs).unwrap() > 10);
        store.revoke_tokens(&"dave".into(), None).unwrap();
        // Each team's widget key and origins move too (a key is made when an admin first asks).
        store.set_widget_origins(&TeamId::from(demo::SALES), &["https://shop.example.com".into()]).unwrap();
        store.set_widget_greeting(&TeamId::from(demo::SALES), Some("Hej!")).unwrap();
        store.widget_settings(&TeamId::from(demo::SUPPORT)).unwrap();
    }
    let bob = Agent::start(&relay, &tokens, "bob");
    let id = relay.customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::WhatsApp).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.grab(&id, Timestamp::now()).unwrap());
    eventually(20, "bob owns it", || bob.with(|r| r.summary(&id).and_then(|s| s.owner.clone())).is_some()).await;
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: "On it".into() }, Timestamp::now()).unwrap());
    let photo = system_tests::png(200, 100);
    let hash = bob.attach(&id, "label.png", "image/png", &photo);
    eventually(20, "synced", || bob.with(|r| r.unsynced().unwrap().0) == 0).await;
    eventually(20, "uploaded", || bob.with(|r| r.pending_blob_uploads().unwrap().is_empty())).await;
    relay.stop().await;

    let pg = postgres_database();
    let run = |args: &[&str]| std::process::Command::new(relay_binary()).args(args).output().unwrap();
    let out = run(&["migrate", "--from", &format!("sqlite://{}", data.display()), "--to", &pg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("identical heads"), "{stdout}");
    // Into a database that already has data: refused, and nothing changes.
    let again = run(&["migrate", "--from", &format!("sqlite://{}", data.display()), "--to", &pg]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty database"));

    let (before, after) = (Store::open(&data).unwrap(), relay_store(&pg));
    assert_eq!(before.describe().unwrap(), after.describe().unwrap(), "teams, members, roles, tokens, widget keys");
    let sales = TeamId::from(demo::SALES);
    assert_eq!(before.widget_settings(&sales).unwrap(), after.widget_settings(&sales).unwrap());
    let key = after.widget_settings(&sales).unwrap().unwrap().key;
    assert_eq!(after.widget_by_key(&key).unwrap().unwrap().origins, ["https://shop.example.com"]);
    assert_eq!(before.storage_id().unwrap(), after.storage_id().unwrap());
    let teams = [TeamId::from(demo::SALES), TeamId::from(demo::SUPPORT)];
    let ids = before.documents_of(&teams).unwrap();
    let mut after_ids = after.documents_of(&teams).unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    after_ids.sort();
    assert_eq!(sorted, after_ids);
    for d in &ids {
        let heads =
            |s: &Store| automerge::Automerge::load(&s.load_document(d).unwrap().unwrap().1).unwrap().get_heads();
        assert_eq!(heads(&before), heads(&after), "document {d}");
    }
    for (agent, token) in &tokens {
        assert_eq!(before.authenticate(token).unwrap(), after.authenticate(token).unwrap(), "{agent}'s token");
    }
    assert!(after.authenticate(&tokens["dave"]).unwrap().is_none(), "revoked stays revoked");
    assert_eq!(after.log_grabs(id.as_str(), &[]).unwrap(), vec!["bob".into()], "the grab log moved");

    // The relay on PostgreSQL serves the same conversations to the same tokens.
    let (mut moved, _) = TestRelay::start_on(dir.path().join("pg"), Some(pg)).await;
    let bob_again = Agent::start(&moved, &tokens, "bob");
    bob_again.has(&id).await;
    eventually(20, "the migrated conversation arrives whole", || {
        bob_again.message_texts(&id) == bob.message_texts(&id)
    })
    .await;
    // The attachment moved into the database: the new relay (with an empty data directory) serves it.
    assert_eq!(sync_client::download_blob(bob_again.config(), &id, &hash, false).await.unwrap(), photo);
    moved.stop().await;
}

fn relay_store(url: &str) -> Store {
    Store::connect(&sync_server::store::StoreUrl::parse(url).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_sent_through_one_instance_downloads_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, _tokens, bob, carol, id) = bob_and_carol_on_two_instances(dir.path()).await;
    bob.connected().await;
    let photo = system_tests::png(400, 300);
    let hash = bob.attach(&id, "receipt.png", "image/png", &photo);
    eventually(15, "the upload finished", || bob.with(|r| r.pending_blob_uploads().unwrap().is_empty())).await;
    eventually(15, "carol sees the attachment", || {
        messages(&carol, &id)
            .iter()
            .any(|m| matches!(&m.body, MessageBody::Attachment { file_name, .. } if file_name == "receipt.png"))
    })
    .await;
    // Instance 1 never received the upload: it serves the file from PostgreSQL.
    assert!(!relays[1].data.join("blobs").join(hash.shard()).join(hash.as_str()).exists());
    assert_eq!(sync_client::download_blob(carol.config(), &id, &hash, false).await.unwrap(), photo);
    let thumb = sync_client::download_blob(carol.config(), &id, &hash, true).await.unwrap();
    assert!(image::load_from_memory(&thumb).unwrap().width() <= 320);
    for r in relays.iter_mut() {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_starts_from_one_address_are_limited_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _tokens) =
        TestRelay::start_on_with(dir.path().join("a"), Some(postgres_database()), |c| c.widget_starts_per_ip = 3).await;
    let mut b = a.another_instance(dir.path().join("b")).await;
    let key = a.widget_key("sales");
    let start = |relay: &TestRelay| {
        reqwest::Client::new()
            .post(format!("{}/api/widget/{key}/conversations", relay.url()))
            .header("content-type", "application/json")
            .body(r#"{"name":"Ines","text":"Hi"}"#)
            .send()
    };
    // Three starts spread over both instances use up the address's allowance on both.
    for relay in [&a, &b, &a] {
        assert_eq!(start(relay).await.unwrap().status().as_u16(), 200);
    }
    for relay in [&b, &a] {
        let refused = start(relay).await.unwrap();
        assert_eq!(refused.status().as_u16(), 429);
        assert!(refused.text().await.unwrap().contains("too many conversations"));
    }
    a.stop().await;
    b.stop().await;
}

/// A modified client sends two different changes with the same actor and sequence number, one to
/// each of two instances, at once. Both instances judge theirs acceptable; the store keeps the first
/// to commit and refuses the other, and the conversation stays loadable everywhere (before, both
/// were stored and no instance could read the conversation again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_with_one_actor_and_sequence_number_on_two_instances_leave_the_conversation_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (relays, tokens) = instances(2, dir.path()).await;
    let id = relays[0].customer_conversation(&tokens["ada"], demo::SALES, Channel::WebWidget).await;
    let mut on_a = system_tests::RawClient::connect(&relays[0], Some(&tokens["bob"])).await;
    let mut on_b = system_tests::RawClient::connect(&relays[1], Some(&tokens["bob"])).await;
    on_a.join().await;
    on_b.join().await;
    let base = system_tests::fetch(&mut on_a, id.as_str()).await;
    let actor = automerge::ActorId::random();
    let said = |text: &'static str| {
        let message = Message {
            id: MessageId(format!("m-{text}")),
            at: Timestamp::now(),
            author: doc::crew(&"bob".into()),
            body: MessageBody::Text { text: text.into() },
        };
        move |tx: &mut automerge::transaction::Transaction<'_>| {
            doc::set_in_room(tx, &"bob".into(), true)?;
            doc::add_message(tx, &message)
        }
    };
    let (one, two) = (base.fork().with_actor(actor.clone()), base.fork().with_actor(actor));
    let (a, b) = tokio::join!(
        system_tests::attempt(&mut on_a, id.as_str(), &one, said("one")),
        system_tests::attempt(&mut on_b, id.as_str(), &two, said("two")),
    );
    let accepted = [&a, &b].iter().filter(|r| r.as_str() == "accepted").count();
    assert_eq!(accepted, 1, "one is stored, the other refused: {a} / {b}");
    // Every instance reads the conversation, with exactly one of the two replies, the same one; so
    // does a third instance that reads it from storage.
    let third = relays[0].another_instance(dir.path().join("i2")).await;
    let mut texts = Vec::new();
    for relay in [&relays[0], &relays[1], &third] {
        let mut c = system_tests::RawClient::connect(relay, Some(&tokens["carol"])).await;
        c.join().await;
        // Another instance's commit reaches this one within moments.
        let mut said = Vec::new();
        for _ in 0..40 {
            let copy = system_tests::fetch(&mut c, id.as_str()).await;
            said = doc::all_messages(&copy)
                .unwrap()
                .into_iter()
                .filter_map(|m| match m.body {
                    MessageBody::Text { text } if text == "one" || text == "two" => Some(text),
                    _ => None,
                })
                .collect();
            if !said.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        said.sort();
        texts.push(said);
    }
    assert_eq!(texts[0].len(), 1, "{texts:?}");
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_closes_its_socket_on_another_instance_within_a_second() {
    use crewdesk::domain::AgentId;
    use crewdesk::sync::wire::WireMessage;
    let dir = tempfile::tempdir().unwrap();
    let (relays, tokens) = instances(2, dir.path()).await;
    let mut bob = RawClient::connect(&relays[1], Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    let mut carol = RawClient::connect(&relays[1], Some(&tokens["carol"])).await;
    assert!(matches!(carol.join().await, WireMessage::Peer { .. }));
    // Revoked through the first instance's database connection (as `sync-server revoke-token bob`
    // does, from any machine): bob's socket on the second instance closes within a second.
    let revoked = std::time::Instant::now();
    assert_eq!(relays[0].open_store().revoke_tokens(&AgentId::from("bob"), None).unwrap(), 1);
    let (code, reason, errors) = bob.closed(Duration::from_secs(1)).await;
    assert!(revoked.elapsed() < Duration::from_secs(1), "closed after {:?}", revoked.elapsed());
    assert_eq!((code, reason.as_str()), (4001, "signed out: token revoked"));
    assert!(errors.iter().any(|e| e.starts_with("signed out: token revoked")), "{errors:?}");
    // Neither instance takes the token any more; carol, on the same instance, is still served.
    for relay in &relays {
        let mut again = RawClient::connect(relay, Some(&tokens["bob"])).await;
        assert_eq!(again.closed(Duration::from_secs(1)).await.0, 4001);
    }
    assert!(carol.next_frame(Duration::from_millis(300)).await.is_none_or(|f| !f.is_close()), "carol stays");
}

/// Typing crosses instances both ways: a web-widget customer typing through the first instance
/// reaches an agent following the conversation on the second, and that agent typing reaches the
/// customer's widget on the first, named by the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_crosses_instances_both_ways() {
    use crewdesk::domain::ConversationId;
    use crewdesk::sync::presence::Typing;
    use crewdesk::sync::wire::WireMessage;
    use futures_util::SinkExt;
    use system_tests::{follow, typing_claim, typing_seen, widget_socket, widget_typing_frame};
    use tokio_tungstenite::tungstenite::Message as Frame;
    const SHOP: &str = "http://shop.test:8088";
    let dir = tempfile::tempdir().unwrap();
    let (relays, tokens) = instances(2, dir.path()).await;
    relays[0].open_store().set_widget_origins(&TeamId::from("sales"), &[SHOP.to_owned()]).unwrap();
    let key = relays[0].widget_key("sales");
    let started: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/api/widget/{key}/conversations", relays[0].url()))
        .header("origin", SHOP)
        .json(&serde_json::json!({ "name": "Maya Hansen", "text": "Hello?" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = ConversationId(started["conversation"].as_str().unwrap().to_owned());
    let mut ws = widget_socket(&relays[0], started["session"].as_str().unwrap(), Some(SHOP)).await;
    // bob follows the conversation through the second instance.
    let mut bob = RawClient::connect(&relays[1], Some(&tokens["bob"])).await;
    assert!(matches!(bob.join().await, WireMessage::Peer { .. }));
    bob.send(&follow(&id)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.send(Frame::Text(r#"{"type":"typing"}"#.into())).await.unwrap();
    assert_eq!(typing_seen(&mut bob, &id, 2).await, [Typing::Customer], "the customer's typing on bob's instance");
    // bob's client says ada is typing: the widget on the other instance shows bob's name.
    bob.send(&typing_claim(&id, "ada")).await;
    let frame = widget_typing_frame(&mut ws, 5).await;
    assert_eq!(frame["name"], "Bob Okafor");
}

/// ↪ A hand-over made on one instance reaches the colleague on another: carol, on the second
/// instance, is in the conversation with the hand-over in its history and writes in it; bob, on the
/// first, is out of it and sees her reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_crosses_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (_relays, _tokens, bob, carol, id) = bob_and_carol_on_two_instances(dir.path()).await;
    eventually(20, "bob is in the room", || bob.with(|r| r.summary(&id).unwrap().is_in_room(&"bob".into()))).await;
    bob.act(&id, |r| r.transfer(&id, &"carol".into(), Timestamp::now()).unwrap());
    eventually(20, "carol has it on the other instance", || {
        carol.with(|r| {
            let s = r.summary(&id).unwrap();
            s.is_in_room(&"carol".into())
                && !s.is_in_room(&"bob".into())
                && s.handover.as_ref().is_some_and(|h| h.from.as_str() == "bob" && h.to.as_str() == "carol")
        })
    })
    .await;
    carol.act(&id, |r| r.send(&id, MessageBody::Text { text: "Carol here".into() }, Timestamp::now()).unwrap());
    eventually(20, "bob sees carol's reply", || {
        messages(&bob, &id).iter().any(|m| m.body == MessageBody::Text { text: "Carol here".into() })
    })
    .await;
}

/// The email channel on several instances: one follows the team's mailbox (a PostgreSQL lock);
/// when it is killed (SIGKILL) another takes the mailbox over and nothing is taken in twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_hands_the_teams_mailbox_to_another() {
    let dovecot = system_tests::Dovecot::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut setup, tokens) = TestRelay::start_on(dir.path().join("setup"), Some(postgres_database())).await;
    setup.stop().await;
    setup.open_store().set_mailbox(&dovecot.setting(demo::SALES)).unwrap();
    let url = setup.store.clone();
    // The first instance, a process of its own, takes the mailbox (it is alone).
    let first_port = free_port();
    let mut first = RelayProcess::spawn(&dir.path().join("p0"), url.as_deref(), first_port);
    wait_listening(first_port).await;
    let mut bob = Agent::start_at(format!("http://127.0.0.1:{first_port}"), &tokens, "bob");
    bob.connected().await;
    let emails = |agent: &Agent| {
        agent.with(|r| {
            r.stored_summaries().unwrap_or_default().into_iter().filter(|s| s.channel == Channel::Email).count()
        })
    };
    dovecot.deliver("From: Maya <maya@example.org>\r\nTo: support@example.com\r\nSubject: Lamp\r\nMessage-ID: <k1@example.org>\r\n\r\nWhere is my lamp?\r\n").await;
    eventually(30, "the first instance takes the mail in", || emails(&bob) == 1).await;
    // A second instance starts, then the first dies.
    let mut second = setup.another_instance(dir.path().join("p1")).await;
    bob.disconnect().await;
    first.kill();
    bob.move_to(second.url());
    bob.reconnect();
    bob.connected().await;
    dovecot.deliver("From: Leo <leo@example.net>\r\nTo: support@example.com\r\nSubject: Hours\r\nMessage-ID: <k2@example.net>\r\n\r\nOpen on Sunday?\r\n").await;
    eventually(40, "the second instance takes the mailbox over", || emails(&bob) == 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(emails(&bob), 2, "nothing taken in twice");
    let read = second.open_store().mailboxes().unwrap().into_iter().next().unwrap();
    assert_eq!(read.last_uid, 2);
    second.stop().await;
}
