//! Property: replicas that act concurrently and exchange changes in any order (whole documents,
//! single incremental chunks out of order, or automerge sync messages) end with identical
//! documents, identical index rows and identical materialized messages.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use automerge::sync;
use common::*;
use crewdesk::demo;
use crewdesk::domain::{Channel, ConversationId, CustomerEdit, Timestamp};
use crewdesk::replica::Replica;
use proptest::prelude::*;

const AGENTS: [&str; 3] = ["ada", "bob", "carol"];
const CONVERSATIONS: [(&str, &str, Channel); 3] = [
    ("c-sales", demo::SALES, Channel::WebWidget),
    ("c-support", demo::SUPPORT, Channel::Email),
    ("c-wa", demo::SALES, Channel::WhatsApp),
];

#[derive(Clone, Debug)]
enum Op {
    Join(usize, usize),
    Leave(usize, usize),
    Send(usize, usize, u8),
    Close(usize, usize),
    Edit(usize, usize, u8),
    Customer(usize, usize, u8),
    Grab(usize, usize),
    /// Deliver one recorded incremental chunk (possibly out of order) to a replica.
    Deliver(usize, usize),
    /// Copy everything from one replica to another.
    Push(usize, usize),
    /// Run automerge's sync protocol between two replicas until quiet.
    Sync(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..AGENTS.len();
    let c = 0..CONVERSATIONS.len();
    prop_oneof![
        (r.clone(), c.clone()).prop_map(|(a, b)| Op::Join(a, b)),
        (r.clone(), c.clone()).prop_map(|(a, b)| Op::Leave(a, b)),
        (r.clone(), c.clone(), any::<u8>()).prop_map(|(a, b, n)| Op::Send(a, b, n)),
        (r.clone(), c.clone()).prop_map(|(a, b)| Op::Close(a, b)),
        (r.clone(), c.clone(), any::<u8>()).prop_map(|(a, b, n)| Op::Edit(a, b, n)),
        (r.clone(), c.clone(), any::<u8>()).prop_map(|(a, b, n)| Op::Customer(a, b, n)),
        (r.clone(), c.clone()).prop_map(|(a, b)| Op::Grab(a, b)),
        (any::<usize>(), r.clone()).prop_map(|(a, b)| Op::Deliver(a, b)),
        (r.clone(), r.clone()).prop_map(|(a, b)| Op::Push(a, b)),
        (r.clone(), r).prop_map(|(a, b)| Op::Sync(a, b)),
    ]
}

fn two(replicas: &mut [Replica], a: usize, b: usize) -> (&mut Replica, &mut Replica) {
    if a < b {
        let (x, y) = replicas.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = replicas.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

fn sync_pair(a: &mut Replica, b: &mut Replica) {
    let ids: Vec<ConversationId> = {
        let mut ids = a.document_ids().unwrap();
        ids.extend(b.document_ids().unwrap());
        ids.sort();
        ids.dedup();
        ids
    };
    for id in ids {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        for _ in 0..20 {
            let ma = a.generate_sync_message(&id, &mut sa).unwrap();
            let mb = b.generate_sync_message(&id, &mut sb).unwrap();
            if ma.is_none() && mb.is_none() {
                break;
            }
            if let Some(m) = ma {
                b.receive_sync_message(&id, &mut sb, m).unwrap();
            }
            if let Some(m) = mb {
                a.receive_sync_message(&id, &mut sa, m).unwrap();
            }
        }
    }
}

/// Runs the schedule, checks convergence, and returns the number of messages everyone ends with.
fn run(ops: Vec<Op>) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: Vec<Replica> = AGENTS.iter().map(|a| open(dir.path(), a)).collect();
    for (id, team, channel) in CONVERSATIONS {
        replicas[0]
            .create_conversation(
                &new_conversation(id, team, channel),
                Some(customer_message(&format!("{id}-first"), T0, "Hi")),
            )
            .unwrap();
    }
    for i in 1..replicas.len() {
        let (a, b) = two(&mut replicas, 0, i);
        push(a, b);
    }
    // Incremental chunks each local action produced, for out-of-order delivery.
    let mut chunks: Vec<(ConversationId, Vec<u8>)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        // Every replica has its own clock, slightly off from the others.
        let at = |r: usize| T0.plus(step as i64 * 20 * Timestamp::SECOND + r as i64 * 7);
        let conv = |c: usize| ConversationId::from(CONVERSATIONS[c].0);
        let act = |replicas: &mut Vec<Replica>,
                   chunks: &mut Vec<(ConversationId, Vec<u8>)>,
                   r: usize,
                   c: usize,
                   f: &dyn Fn(&mut Replica, &ConversationId) -> bool| {
            let id = conv(c);
            let before = replicas[r].heads(&id).unwrap();
            // Refused actions (the rules say no) are part of the test too: they must change nothing.
            if f(&mut replicas[r], &id) {
                chunks.push((id.clone(), replicas[r].changes_since(&id, &before).unwrap()));
            } else {
                assert_eq!(replicas[r].heads(&id).unwrap(), before, "a refused action changed the document");
            }
        };
        match op {
            Op::Join(r, c) => act(&mut replicas, &mut chunks, r, c, &|x, id| x.join(id, at(r)).is_ok()),
            Op::Leave(r, c) => act(&mut replicas, &mut chunks, r, c, &|x, id| x.leave(id).is_ok()),
            Op::Send(r, c, n) => {
                act(&mut replicas, &mut chunks, r, c, &|x, id| x.send(id, text(&format!("reply {n}")), at(r)).is_ok())
            }
            Op::Close(r, c) => act(&mut replicas, &mut chunks, r, c, &|x, id| x.close(id, at(r)).is_ok()),
            Op::Edit(r, c, n) => act(&mut replicas, &mut chunks, r, c, &|x, id| {
                let edit = if n % 2 == 0 {
                    CustomerEdit { name: Some(format!("Name {n}")), ..Default::default() }
                } else {
                    CustomerEdit { phone: Some(format!("+47 {n}")), ..Default::default() }
                };
                x.edit_customer(id, &edit).is_ok()
            }),
            Op::Customer(r, c, n) => act(&mut replicas, &mut chunks, r, c, &|x, id| {
                x.record_customer_message(id, text(&format!("customer {n}")), at(r)).is_ok()
            }),
            Op::Grab(r, c) => act(&mut replicas, &mut chunks, r, c, &|x, id| x.grab(id, at(r)).is_ok()),
            Op::Deliver(k, r) => {
                if !chunks.is_empty() {
                    let (id, bytes) = &chunks[k % chunks.len()];
                    replicas[r].apply_changes(id, bytes).unwrap();
                }
            }
            Op::Push(a, b) if a != b => {
                let (x, y) = two(&mut replicas, a, b);
                push(x, y);
            }
            Op::Sync(a, b) if a != b => {
                let (x, y) = two(&mut replicas, a, b);
                sync_pair(x, y);
            }
            Op::Push(..) | Op::Sync(..) => {}
        }
    }
    // Reconnect everyone: a full exchange in both directions.
    for _ in 0..2 {
        for a in 0..replicas.len() {
            for b in 0..replicas.len() {
                if a != b {
                    let (x, y) = two(&mut replicas, a, b);
                    push(x, y);
                }
            }
        }
    }
    let reference = replicas[0].stored_summaries().unwrap();
    for r in replicas.iter_mut() {
        assert_eq!(r.stored_summaries().unwrap(), reference, "index rows differ for {}", r.agent());
        for (id, ..) in CONVERSATIONS {
            let id = ConversationId::from(id);
            let stored = r.stored_messages(&id).unwrap();
            assert_eq!(stored, r.document_messages(&id).unwrap(), "materialized messages match the document");
            let mut ids: Vec<_> = stored.iter().map(|m| m.id.clone()).collect();
            ids.dedup();
            assert_eq!(ids.len(), stored.len(), "no duplicated message");
        }
    }
    let first: Vec<_> =
        CONVERSATIONS.iter().map(|(id, ..)| replicas[0].stored_messages(&ConversationId::from(*id)).unwrap()).collect();
    for r in &replicas[1..] {
        let mine: Vec<_> =
            CONVERSATIONS.iter().map(|(id, ..)| r.stored_messages(&ConversationId::from(*id)).unwrap()).collect();
        assert_eq!(mine, first, "messages differ");
    }
    let heads: Vec<_> =
        CONVERSATIONS.iter().map(|(id, ..)| replicas[0].heads(&ConversationId::from(*id)).unwrap()).collect();
    for r in replicas.iter_mut().skip(1) {
        let mine: Vec<_> = CONVERSATIONS.iter().map(|(id, ..)| r.heads(&ConversationId::from(*id)).unwrap()).collect();
        assert_eq!(mine, heads, "documents differ");
    }
    first.iter().map(Vec::len).sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn replicas_converge(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn concurrent_sends_all_survive_in_time_order() {
    let total = run(vec![
        Op::Join(1, 0),
        Op::Join(2, 0),
        Op::Push(1, 2),
        Op::Send(1, 0, 1),
        Op::Send(2, 0, 2),
        Op::Customer(0, 0, 3),
        Op::Deliver(2, 1),
        Op::Deliver(1, 2),
    ]);
    // Three first messages, two concurrent replies, one customer message: nothing lost or doubled.
    assert_eq!(total, 6);
}
