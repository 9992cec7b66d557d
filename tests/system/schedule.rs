//! Five replicas follow seeded random schedules of agent actions, disconnects and reconnects
//! through a real relay on real sockets; at the end every replica holding a conversation has the
//! same document, the same index row and the same messages, none duplicated or lost. The protocol
//! itself is proven by the deterministic simulator (`tests/sim`, 10,000 seeds in `cargo xtask
//! test`); these few seeds check the IO around it (sockets, the sync driver, the group commit).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use crewdesk::domain::{Channel, CustomerEdit, MessageBody, Timestamp};
use rand::{Rng, SeedableRng};
use std::time::Duration;
use system_tests::{Agent, TestRelay, eventually};

const AGENTS: [&str; 5] = ["ada", "bob", "carol", "dave", "erin"];

async fn run(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let mut agents: Vec<Agent> = AGENTS.iter().map(|a| Agent::start(&relay, &tokens, a)).collect();
    let mut conversations = Vec::new();
    for (i, team) in [demo::SALES, demo::SUPPORT].into_iter().enumerate() {
        conversations.push(relay.customer_conversation(&tokens["ada"], team, Channel::ALL[i]).await);
    }
    let mut texts = 0;
    for step in 0..60 {
        let a = rng.random_range(0..agents.len());
        let id = conversations[rng.random_range(0..conversations.len())].clone();
        let at = Timestamp::now().plus(rng.random_range(-500..500));
        match rng.random_range(0..10) {
            0 => agents[a].disconnect().await,
            1 => agents[a].reconnect(),
            2 => {
                agents[a].act(&id, |r| r.join(&id, at).ok());
            }
            3 => {
                agents[a].act(&id, |r| r.leave(&id).ok());
            }
            4 => {
                agents[a].act(&id, |r| r.grab(&id, at).ok());
            }
            5 => {
                agents[a].act(&id, |r| r.close(&id, at).ok());
            }
            6 => {
                agents[a].act(&id, |r| {
                    r.edit_customer(&id, &CustomerEdit { notes: Some(format!("note {step}")), ..Default::default() })
                        .ok()
                });
            }
            7 => {
                // The customer writes (through the relay, never through a replica).
                if relay.customer_writes(&tokens["ada"], &id, &format!("customer {step}"), at).await {
                    texts += 1;
                }
            }
            _ => {
                if agents[a].act(&id, |r| r.send(&id, MessageBody::Text { text: format!("reply {step}") }, at).is_ok())
                {
                    texts += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
    for a in agents.iter_mut() {
        a.reconnect();
    }
    for a in &agents {
        eventually(30, &format!("seed {seed}: outboxes empty"), || a.with(|r| r.unsynced().unwrap().0) == 0).await;
    }
    let mut total = 0;
    for id in &conversations {
        let holders: Vec<&Agent> = agents.iter().filter(|a| a.with(|r| r.summary(id).is_some())).collect();
        assert!(holders.len() >= 3, "seed {seed}: {id} reached only {} replicas", holders.len());
        let state =
            |h: &Agent| h.with(|r| (r.summary(id).cloned(), r.stored_messages(id).unwrap(), r.heads(id).unwrap()));
        eventually(30, &format!("seed {seed}: {id} converges"), || {
            let all: Vec<_> = holders.iter().map(|h| state(h)).collect();
            all.iter().all(|x| *x == all[0])
        })
        .await;
        let reference = state(holders[0]);
        let ids: std::collections::BTreeSet<_> = reference.1.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), reference.1.len(), "seed {seed}: duplicated message");
        total += reference.1.len();
    }
    assert_eq!(total, 2 + texts, "seed {seed}: every accepted message arrives exactly once");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_converge_under_random_schedules() {
    for seed in 0..3 {
        run(seed).await;
    }
}
