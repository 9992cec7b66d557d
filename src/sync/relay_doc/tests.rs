//! The relay core's unit tests: waiting changes, commits and advertising, the queues' bounds.
use super::*;
use crate::domain::{AgentId, Channel, Customer, CustomerId, MessageBody, MessageId, Role, TeamMode};
use automerge::ActorId;

const ID: &str = "2jQ5Vc7u9o1Wk6Bq3TXYtY7cWKdV";
const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn stored() -> Automerge {
    let new = doc::NewConversation {
        id: ID.into(),
        team: "sales".into(),
        channel: Channel::WebWidget,
        customer: Customer { id: CustomerId("c1".into()), name: "Jane".into(), email: None, phone: None, notes: None },
        created_at: NOW.plus(-60_000),
    };
    doc::create(ActorId::random(), &new).unwrap()
}

fn bob() -> ChangeAuthor {
    ChangeAuthor {
        agent: "bob".into(),
        team: "sales".into(),
        role: Role::Representative,
        mode: TeamMode::Open,
        foreign_actors: Vec::new(),
        members: Default::default(),
    }
}

/// bob's replica: joins, then replies (two changes, the second depending on the first).
fn join_and_reply(base: &Automerge) -> (Automerge, Vec<Change>) {
    let mut copy = base.fork().with_actor(ActorId::random());
    let bob = AgentId::from("bob");
    copy.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &bob, true)).unwrap();
    let join = copy.get_last_local_change().unwrap();
    let m = Message {
        id: MessageId("m1".into()),
        at: NOW,
        author: doc::crew(&bob),
        body: MessageBody::Text { text: "hello".into() },
    };
    copy.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
    let reply = copy.get_last_local_change().unwrap();
    (copy, vec![join, reply])
}

/// A sync message from `doc` with its heads and no changes (the changes go beside it).
fn heads_of(doc: &Automerge) -> sync::Message {
    let mut state = sync::State::new();
    let bytes = doc.generate_sync_message(&mut state).unwrap().encode();
    sync::Message::decode(&bytes).unwrap()
}

static BOB_WAITS: std::sync::LazyLock<WaitingBudget> = std::sync::LazyLock::new(WaitingBudget::new);

/// A sync message from bob on connection 1.
fn from_bob<'a>(
    message: sync::Message,
    changes: Vec<Change>,
    author: &'a ChangeAuthor,
    waiting: &'a WaitingBudget,
) -> Incoming<'a> {
    Incoming { conn: 1, peer_id: "bob", message, changes, is_request: false, author: Some(author), waiting }
}

fn relay() -> RelayDoc {
    let mut r = RelayDoc::new(ID, "relay", ActorId::random());
    r.load(stored(), "sales".into());
    r
}

fn commits(actions: &[Action]) -> Vec<u64> {
    actions.iter().filter_map(|a| if let Action::Commit { ticket, .. } = a { Some(*ticket) } else { None }).collect()
}

fn sends_to(actions: &[Action], conn: ConnId) -> usize {
    actions.iter().filter(|a| matches!(a, Action::Send(c, WireMessage::Sync { .. }) if *c == conn)).count()
}

#[test]
fn a_change_that_arrives_before_its_dependency_waits_and_is_judged_when_it_comes() {
    let mut r = relay();
    let base = r.doc().unwrap().fork();
    let (copy, changes) = join_and_reply(&base);
    // The reply alone: its dependency (the join) is missing. Nothing is applied or refused.
    let out = r.receive(from_bob(heads_of(&copy), vec![changes[1].clone()], &bob(), &BOB_WAITS), NOW);
    assert!(out.iter().any(|a| matches!(a, Action::Missing)), "{out:?}");
    assert!(commits(&out).is_empty());
    assert!(!out.iter().any(|a| matches!(a, Action::Send(_, WireMessage::Error { .. }))), "{out:?}");
    // The join arrives (the sender never sends the reply again): both are judged and committed.
    let out = r.receive(from_bob(heads_of(&copy), vec![changes[0].clone()], &bob(), &BOB_WAITS), NOW);
    let tickets = commits(&out);
    assert_eq!(tickets.len(), 1, "{out:?}");
    let heads = r.heads();
    assert_eq!(heads, copy.get_heads());
    let out = r.committed(tickets[0], Ok(()));
    assert!(out.iter().any(|a| matches!(a, Action::Stored { added } if added.len() == 1)), "{out:?}");
}

#[test]
fn nothing_is_advertised_while_a_commit_is_in_progress_and_the_sender_hears_its_heads_after() {
    let mut r = relay();
    r.follow(2, "carol");
    let base = r.doc().unwrap().fork();
    let (copy, changes) = join_and_reply(&base);
    let out = r.receive(from_bob(heads_of(&copy), changes, &bob(), &BOB_WAITS), NOW);
    let tickets = commits(&out);
    assert_eq!(tickets.len(), 1);
    assert!(r.advertise().is_empty(), "nothing before the commit returns");
    // bob reports the same heads as the relay's while the commit runs: he must still be told.
    let out = r.receive(from_bob(heads_of(&copy), Vec::new(), &bob(), &BOB_WAITS), NOW);
    assert_eq!(sends_to(&out, 1), 0, "{out:?}");
    assert!(out.iter().any(|a| matches!(a, Action::ScheduleFanout)), "the answer waits for the fan-out: {out:?}");
    let out = r.committed(tickets[0], Ok(()));
    assert_eq!(sends_to(&out, 1), 0, "{out:?}");
    let out = r.fanout();
    assert_eq!(sends_to(&out, 1), 1, "bob hears the relay's heads: {out:?}");
    assert_eq!(sends_to(&out, 2), 1, "carol hears of the reply: {out:?}");
}

#[test]
fn a_failed_commit_drops_the_document_and_the_sender_hears_from_the_relay_again() {
    let mut r = relay();
    let base = r.doc().unwrap().fork();
    let (copy, changes) = join_and_reply(&base);
    let out = r.receive(from_bob(heads_of(&copy), changes, &bob(), &BOB_WAITS), NOW);
    let out = r.committed(commits(&out)[0], Err("disk full".into()));
    assert!(out.iter().any(|a| matches!(a, Action::Reload)));
    assert!(out.iter().any(|a| matches!(a, Action::Send(1, WireMessage::Error { message, .. }) if message.starts_with(&format!("document {ID}: ")))));
    assert!(!r.is_stored());
    // bob stays a follower with a fresh state: once the document is read again, the fan-out
    // tells him what the relay holds (and he sends his changes again).
    assert!(r.follows(1));
    r.load(stored(), "sales".into());
    assert_eq!(sends_to(&r.fanout(), 1), 1);
}

#[test]
fn the_waiting_queue_is_bounded() {
    let mut r = relay();
    let base = r.doc().unwrap().fork();
    let mut copy = base.fork().with_actor(ActorId::random());
    let agent = AgentId::from("bob");
    copy.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &agent, true)).unwrap();
    let mut later = Vec::new();
    for i in 0..=MAX_DEFERRED_CHANGES {
        let m = Message {
            id: MessageId(format!("m{i}")),
            at: NOW,
            author: doc::crew(&agent),
            body: MessageBody::Text { text: "x".into() },
        };
        copy.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
        later.push(copy.get_last_local_change().unwrap());
    }
    // Everything but the join: all of it waits, and the queue overflows.
    let out = r.receive(from_bob(heads_of(&copy), later, &bob(), &BOB_WAITS), NOW);
    assert!(
        out.iter().any(
            |a| matches!(a, Action::Send(1, WireMessage::Error { message, .. }) if message.contains("starts over"))
        ),
        "{out:?}"
    );
}

#[test]
fn what_one_connection_has_waiting_is_bounded_across_documents() {
    let waiting = WaitingBudget::new();
    let agent = AgentId::from("bob");
    // Changes that wait in each document (their join is held back), about 3.4 MiB a document,
    // under the bound of one document: the fifth document finds the connection's bound.
    let mut seed = 7_u64;
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                char::from(b'a' + (seed >> 59) as u8 % 26)
            })
            .collect()
    };
    let mut docs = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let mut r = relay();
        let mut copy = r.doc().unwrap().fork().with_actor(ActorId::random());
        copy.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &agent, true)).unwrap();
        let mut later = Vec::new();
        for i in 0..34 {
            let m = Message {
                id: MessageId(format!("m{i}")),
                at: NOW,
                author: doc::crew(&agent),
                body: MessageBody::Text { text: noise(100_000) },
            };
            copy.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
            later.push(copy.get_last_local_change().unwrap());
        }
        answers.push(r.receive(from_bob(heads_of(&copy), later, &bob(), &waiting), NOW));
        docs.push(r);
        assert!(waiting.in_use() <= MAX_WAITING_PER_CONNECTION);
    }
    let overflowed = |out: &[Action]| {
        out.iter().any(
            |a| matches!(a, Action::Send(1, WireMessage::Error { message, .. }) if message.contains("starts over")),
        )
    };
    assert!(answers[..4].iter().all(|out| !overflowed(out)), "four documents' queues fit");
    assert!(overflowed(&answers[4]), "the fifth is over the connection's bound: {:?}", answers[4]);
    let four = waiting.in_use();
    assert!(four > 3 * MAX_WAITING_PER_CONNECTION / 4, "{four}");
    // A document the connection leaves gives its part back.
    docs[0].disconnect(1);
    assert!(waiting.in_use() < four * 4 / 5, "{} of {four}", waiting.in_use());
    drop(docs);
    assert_eq!(waiting.in_use(), 0, "every part given back");
}

/// Through the wire and back, as the relay reads a message (its flags included).
fn wire(m: sync::Message) -> sync::Message {
    sync::Message::decode(&m.encode()).unwrap()
}

#[test]
fn acknowledgements_are_taken_as_automerge_takes_them() {
    use automerge::transaction::Transactable;
    use rand::{Rng, SeedableRng};
    // A hub and three peers editing and syncing in a seeded random order, messages sometimes lost
    // and connections sometimes starting over. Every message the hub gets is taken the relay's
    // way (changes applied first, then the rest) and automerge's way, from the same state.
    let (mut taken, mut handed_back) = (0, 0);
    for seed in 0..20_u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut hub = Automerge::new().with_actor(ActorId::random());
        let mut peers: Vec<(Automerge, sync::State, sync::State)> = (0..3)
            .map(|_| (Automerge::new().with_actor(ActorId::random()), sync::State::new(), sync::State::new()))
            .collect();
        for step in 0..400 {
            let i = rng.random_range(0..peers.len());
            let (doc, theirs, ours) = &mut peers[i];
            match rng.random_range(0..10) {
                0 | 1 => {
                    let mut tx = doc.transaction();
                    tx.put(automerge::ROOT, format!("k{}", rng.random_range(0..5)), step).unwrap();
                    tx.commit();
                }
                2 => {
                    let mut tx = hub.transaction();
                    tx.put(automerge::ROOT, "hub", step).unwrap();
                    tx.commit();
                }
                3 if rng.random_bool(0.2) => (*theirs, *ours) = (sync::State::new(), sync::State::new()),
                3..=6 => {
                    let Some(m) = doc.generate_sync_message(theirs) else { continue };
                    if rng.random_bool(0.1) {
                        continue;
                    }
                    let mut m = wire(m);
                    for chunk in std::mem::replace(&mut m.changes, sync::ChunkList::empty()).iter() {
                        hub.load_incremental(chunk).unwrap();
                    }
                    let mut by_automerge = ours.clone();
                    hub.clone().receive_sync_message(&mut by_automerge, m.clone()).unwrap();
                    match take_acknowledgement(&hub, ours, m) {
                        None => {
                            taken += 1;
                            assert_eq!(*ours, by_automerge, "seed {seed}, step {step}");
                        }
                        Some(_) => {
                            handed_back += 1;
                            *ours = by_automerge;
                        }
                    }
                }
                _ => {
                    let Some(m) = hub.generate_sync_message(ours) else { continue };
                    if !rng.random_bool(0.1) {
                        doc.receive_sync_message(theirs, wire(m)).unwrap();
                    }
                }
            }
        }
    }
    // Both ways are exercised: the test compares something.
    assert!(taken > 200 && handed_back > 200, "{taken} taken, {handed_back} handed to automerge");
}

#[test]
fn followers_in_one_state_hear_what_automerge_makes_for_each() {
    let mut r = relay();
    for (conn, peer) in [(2, "carol"), (3, "dan"), (4, "erin"), (5, "frank")] {
        r.follow(conn, peer);
    }
    // Everyone hears of the conversation, then bob's join and reply.
    let _ = r.fanout();
    let base = r.doc().unwrap().fork();
    let (copy, changes) = join_and_reply(&base);
    let out = r.receive(from_bob(heads_of(&copy), changes, &bob(), &BOB_WAITS), NOW);
    let _ = r.committed(commits(&out)[0], Ok(()));
    let before: HashMap<ConnId, sync::State> = r.peers.iter().map(|(c, p)| (*c, p.state.clone())).collect();
    assert!(before.values().filter(|s| **s == before[&2]).count() >= 4, "the followers share one state");
    let doc = r.doc().unwrap().fork();
    let out = r.fanout();
    for (conn, state) in before {
        let mut expected = state.clone();
        let data = doc.generate_sync_message(&mut expected).map(outgoing);
        let sent: Vec<&Vec<u8>> = out
            .iter()
            .filter_map(|a| match a {
                Action::Send(c, WireMessage::Sync { data, .. }) if *c == conn => Some(data),
                _ => None,
            })
            .collect();
        assert_eq!(sent, data.iter().collect::<Vec<_>>(), "conn {conn}");
        assert_eq!(r.peers[&conn].state, expected, "conn {conn}");
    }
    assert_eq!(sends_to(&out, 3), 1, "{out:?}");
}

#[test]
fn a_forged_acknowledgement_is_taken_as_automerge_takes_it() {
    // A modified client acknowledges the relay's heads but asks for changes that do not exist,
    // claims a last sync the relay never had, says it is read-only, and repeats it: what the
    // relay keeps and answers is what automerge would.
    let doc = stored();
    let unknown = ChangeHash([7; 32]);
    let mut forged = heads_of(&doc);
    forged.need = vec![unknown; 3];
    forged.have =
        vec![sync::Have { last_sync: vec![unknown], bloom: sync::BloomFilter::from_hashes([unknown].iter()) }];
    let mut flags = sync::MessageFlags::new();
    flags.set(sync::MessageFlags::READ_ONLY);
    forged.flags = Some(flags);
    let forged = wire(forged);
    let (mut ours, mut by_automerge) = (sync::State::new(), sync::State::new());
    for round in 0..3 {
        let _ = doc.generate_sync_message(&mut ours);
        let _ = doc.generate_sync_message(&mut by_automerge);
        let taken = take_acknowledgement(&doc, &mut ours, forged.clone());
        assert!(taken.is_none(), "round {round}: the relay takes it itself");
        doc.clone().receive_sync_message(&mut by_automerge, forged.clone()).unwrap();
        assert_eq!(ours, by_automerge, "round {round}");
        let answer = |state: &mut sync::State| doc.generate_sync_message(state).map(outgoing);
        assert_eq!(answer(&mut ours), answer(&mut by_automerge), "round {round}");
    }
}
