//! The relay process killed with SIGKILL at random moments while agents write, then restarted:
//! no change any replica counted as synced is lost, and every replica converges.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use crewdesk::domain::{Channel, Message, MessageBody, MessageId, Timestamp};
use crewdesk::replica::doc::{self};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use system_tests::{Agent, RelayProcess, TestRelay, eventually, wait_listening};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_load_loses_no_acknowledged_change() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let dir = tempfile::tempdir().unwrap();
    // Accounts, then the relay's port: the test relay only lends us its setup and a free port.
    let (mut setup, tokens) = TestRelay::start(dir.path().to_owned()).await;
    setup.stop().await;
    let port = setup.addr.port();
    let mut child = RelayProcess::spawn(dir.path(), setup.store.as_deref(), port);
    wait_listening(port).await;

    let agents: Vec<(&str, Agent)> =
        ["bob", "carol", "erin"].into_iter().map(|a| (a, Agent::start(&setup, &tokens, a))).collect();
    let id = setup.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    for (_, a) in &agents {
        eventually(20, "everyone has the conversation", || a.with(|r| r.summary(&id).is_some())).await;
        a.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    }

    // Acknowledged = sent before a moment at which that replica's outbox was empty.
    let mut acked: BTreeSet<MessageId> = BTreeSet::new();
    let mut sent: HashMap<&str, Vec<MessageId>> = HashMap::new();
    let mut kills = 0;
    for round in 0..120 {
        let (name, agent) = &agents[round % agents.len()];
        let mid = agent.act(&id, |r| {
            r.send(&id, MessageBody::Text { text: format!("{name} {round}") }, Timestamp::now()).unwrap()
        });
        sent.entry(name).or_default().push(mid);
        for (name, agent) in &agents {
            if agent.with(|r| r.unsynced().unwrap().0) == 0 {
                acked.extend(sent.remove(name).unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(2..15))).await;
        if round % 30 == 17 {
            child.0.kill().unwrap(); // SIGKILL
            child.0.wait().unwrap();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..200))).await;
            child = RelayProcess::spawn(dir.path(), setup.store.as_deref(), port);
            wait_listening(port).await;
        }
    }
    assert_eq!(kills, 4);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agents.iter().any(|(_, a)| a.with(|r| r.unsynced().unwrap().0) > 0) {
        if std::time::Instant::now() > deadline {
            for (name, a) in &agents {
                let status = a.client().status().borrow().clone();
                eprintln!("{name}: unsynced {:?}, status {status:?}", a.with(|r| r.unsynced().unwrap()));
            }
            panic!("timed out waiting for: every outbox empties after the last restart");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything is durable now: every message sent counts as acknowledged.
    acked.extend(sent.into_values().flatten());
    assert!(acked.len() > 60, "only {} acknowledged messages", acked.len());
    // Every replica ends with all 121 messages (the first and 120 replies), identical everywhere.
    eventually(30, "replicas converge", || {
        let all: Vec<Vec<Message>> = agents.iter().map(|(_, a)| a.with(|r| r.stored_messages(&id).unwrap())).collect();
        all[0].len() == 121 && all.iter().all(|m| *m == all[0])
    })
    .await;
    let reference: Vec<Message> = agents[0].1.with(|r| r.stored_messages(&id).unwrap());
    // The relay's own storage (read after one more SIGKILL) holds every acknowledged message.
    child.kill();
    let store = setup.open_store();
    let (_, bytes) = store.load_document(id.as_str()).unwrap().unwrap();
    let stored = automerge::Automerge::load(&bytes).unwrap();
    let on_relay: BTreeSet<MessageId> = doc::all_messages(&stored).unwrap().into_iter().map(|m| m.id).collect();
    let missing: Vec<_> = acked.difference(&on_relay).collect();
    assert!(missing.is_empty(), "acknowledged but lost on the relay: {missing:?}");
    assert_eq!(reference.len(), 1 + 120, "no message lost or duplicated");
}
