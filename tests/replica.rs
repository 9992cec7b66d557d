//! The replica end to end on disk: agent actions, index rows, demo data, reopen, bad input.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::*;
use crewdesk::demo::{self, DemoSpec};
use crewdesk::domain::access::{GrabState, JoinKind};
use crewdesk::domain::filter::{Filter, Selection, View};
use crewdesk::domain::status::Status;
use crewdesk::domain::{AgentId, Channel, ConversationId, CustomerEdit, DomainError, Timestamp};
use crewdesk::replica::doc::{self, DocError};
use crewdesk::replica::{Applied, Replica, ReplicaError};

const MIN: i64 = Timestamp::MINUTE;

fn sel(s: Status) -> Filter {
    Filter { selection: Selection::Status(s), ..Filter::default() }
}

#[test]
fn demo_data_shows_every_status_on_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = open(dir.path(), "ada");
    let now = Timestamp::now();
    demo::fill(&mut ada, &DemoSpec::default(), now).unwrap();
    for status in Status::ALL {
        let listing = ada.list(&sel(status), now);
        assert!(listing.total > 0, "{status:?} is empty in the demo");
        assert_eq!(listing.total, listing.counts.of_status(status));
        for row in &listing.rows {
            let team = ada.team(&row.team).unwrap();
            assert!(status.holds(row, team, now), "{status:?} row {} does not hold", row.id);
        }
    }
    for channel in Channel::ALL {
        let f = Filter { channels: vec![channel], ..Filter::default() };
        let listing = ada.list(&f, now);
        assert!(listing.total > 0, "no open {channel:?} conversations");
        assert!(listing.rows.iter().all(|r| r.channel == channel));
    }
    // Bob is a representative of the grab-mode Support team: he does not see what others handle.
    let mut bob = open(dir.path(), "bob");
    push(&mut ada, &mut bob);
    let all = Filter { selection: Selection::View(View::AllChatroom), ..Filter::default() };
    let (ada_all, bob_all) = (ada.list(&all, now).total, bob.list(&all, now).total);
    assert!(bob_all < ada_all, "bob {bob_all} vs ada {ada_all}");
    assert!(!bob.notifications(now).is_empty(), "bob has grabbable conversations");
    assert!(ada.notifications(now).is_empty(), "admins do not grab");
}

#[test]
fn join_send_leave_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("c1");
    bob.create_conversation(
        &new_conversation("c1", demo::SALES, Channel::WebWidget),
        Some(customer_message("m1", T0, "Hello?")),
    )
    .unwrap();
    let at = |m: i64| T0.plus(m * MIN);
    // Waiting 4 minutes with nobody in the room.
    assert_eq!(bob.conversation(&id, at(4)).unwrap().badges, vec![Status::SoonToBe, Status::RepNeeded]);
    assert_eq!(bob.send(&id, text("hi"), at(4)).unwrap_err().to_string(), DomainError::NotInRoom.to_string());
    assert_eq!(bob.join(&id, at(4)).unwrap(), JoinKind::Join);
    assert_eq!(bob.conversation(&id, at(4)).unwrap().badges, vec![Status::SoonToBe, Status::Pending]);
    assert!(matches!(bob.join(&id, at(4)), Err(ReplicaError::Denied(DomainError::AlreadyInRoom))));
    bob.send(&id, text("Hi! How can I help?"), at(5)).unwrap();
    let detail = bob.conversation(&id, at(6)).unwrap();
    assert_eq!(detail.badges, Vec::<Status>::new());
    assert_eq!(detail.messages.len(), 2);
    assert_eq!(detail.summary.last_message.as_ref().unwrap().text, "Hi! How can I help?");
    assert!(detail.email_fallback, "web widget customer offline with an email");
    let joined = Filter { selection: Selection::View(View::Joined), ..Filter::default() };
    assert_eq!(bob.list(&joined, at(6)).total, 1);
    bob.leave(&id).unwrap();
    assert_eq!(bob.list(&joined, at(6)).total, 0);
    bob.join(&id, at(7)).unwrap();
    bob.close(&id, at(8)).unwrap();
    assert_eq!(bob.list(&sel(Status::Closed), at(9)).total, 1);
    assert_eq!(bob.list(&Filter::default(), at(9)).total, 0, "views exclude closed");
    // A new customer message reopens it, waiting again.
    bob.record_customer_message(&id, text("One more thing"), at(10)).unwrap();
    assert_eq!(bob.list(&sel(Status::Closed), at(11)).total, 0);
    assert_eq!(bob.conversation(&id, at(11)).unwrap().badges, vec![Status::Pending]);
    // Customer edits are validated and stored.
    let bad = CustomerEdit { email: Some("nope".into()), ..Default::default() };
    assert!(matches!(bob.edit_customer(&id, &bad), Err(ReplicaError::Denied(DomainError::InvalidCustomer(_)))));
    let good = CustomerEdit { name: Some("Maya Hansen".into()), phone: Some("+47 123".into()), ..Default::default() };
    bob.edit_customer(&id, &good).unwrap();
    let c = bob.customer(&id).unwrap();
    assert_eq!((c.name.as_str(), c.phone.as_deref()), ("Maya Hansen", Some("+47 123")));
    // Templates fill placeholders from the customer and the agent.
    bob.send_template(&id, "Greeting", at(12)).unwrap();
    let last = bob.conversation(&id, at(12)).unwrap().summary.last_message.unwrap();
    assert!(last.text.starts_with("Hi Maya Hansen, thanks for reaching out! I'm Bob Okafor"), "{}", last.text);
}

#[test]
fn grab_mode_join_is_a_grab_awaiting_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("g1");
    bob.create_conversation(
        &new_conversation("g1", demo::SUPPORT, Channel::Email),
        Some(customer_message("m1", T0, "Help")),
    )
    .unwrap();
    assert_eq!(bob.notifications(T0).len(), 1);
    assert_eq!(bob.join(&id, T0).unwrap(), JoinKind::Grab);
    let detail = bob.conversation(&id, T0).unwrap();
    assert_eq!(detail.grab, GrabState::AwaitingConfirmation);
    assert!(detail.summary.crew_in_room.is_empty(), "not in the room before the relay confirms");
    assert!(matches!(bob.grab(&id, T0), Err(ReplicaError::Denied(DomainError::GrabAlreadyRequested))));
    assert!(matches!(bob.send(&id, text("x"), T0), Err(ReplicaError::Denied(DomainError::NotInRoom))));
    // Ada (admin) joins directly and cannot grab.
    let mut ada = open(dir.path(), "ada");
    push(&mut bob, &mut ada);
    assert!(matches!(ada.grab(&id, T0), Err(ReplicaError::Denied(DomainError::AdminsDoNotGrab))));
    assert_eq!(ada.join(&id, T0).unwrap(), JoinKind::Join);
}

#[test]
fn merged_remote_changes_update_the_index_like_local_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let mut carol = open(dir.path(), "carol");
    let id = ConversationId::from("c1");
    bob.create_conversation(
        &new_conversation("c1", demo::SALES, Channel::WhatsApp),
        Some(customer_message("m1", T0, "Hi")),
    )
    .unwrap();
    push(&mut bob, &mut carol);
    bob.join(&id, T0).unwrap();
    carol.join(&id, T0).unwrap();
    bob.send(&id, text("from bob"), T0.plus(1000)).unwrap();
    carol.send(&id, text("from carol"), T0.plus(1000)).unwrap();
    push(&mut bob, &mut carol);
    push(&mut carol, &mut bob);
    assert_eq!(bob.stored_summaries().unwrap(), carol.stored_summaries().unwrap());
    assert_eq!(bob.stored_messages(&id).unwrap(), carol.stored_messages(&id).unwrap());
    assert_eq!(bob.stored_messages(&id).unwrap(), bob.document_messages(&id).unwrap());
    let s = bob.summary(&id).unwrap();
    assert_eq!(s.crew_in_room, vec![AgentId::from("bob"), AgentId::from("carol")]);
    assert_eq!(s.message_count, 3);
    // Re-applying the same changes is a no-op.
    let bytes = bob.changes_since(&id, &[]).unwrap();
    assert_eq!(carol.apply_changes(&id, &bytes).unwrap(), Applied::NothingNew);
}

#[test]
fn reopen_gives_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let now = Timestamp::now();
    let (summaries, messages, heads, online) = {
        let mut ada = open(dir.path(), "ada");
        demo::fill(&mut ada, &DemoSpec { conversations: 30, messages_per_conversation: 8, seed: 3 }, now).unwrap();
        let id = demo::conversation_id(2);
        ada.join(&id, now).ok();
        ada.send(&id, text("still here after reopen"), now).unwrap();
        let online = ada.list(&Filter::default(), now).counts.online;
        assert!(online > 0);
        (ada.stored_summaries().unwrap(), ada.stored_messages(&id).unwrap(), ada.heads(&id).unwrap(), online)
    };
    let mut ada = Replica::open(db_path(dir.path(), "ada"), AgentId::from("ada")).unwrap();
    let id = demo::conversation_id(2);
    assert_eq!(ada.stored_summaries().unwrap(), summaries);
    assert_eq!(ada.stored_messages(&id).unwrap(), messages);
    assert_eq!(ada.heads(&id).unwrap(), heads);
    assert_eq!(ada.document_messages(&id).unwrap(), messages);
    assert_eq!(ada.teams().len(), 2, "teams persist");
    assert_eq!(ada.list(&Filter::default(), now).counts.online, online, "presence persists");
    // A replica belongs to one agent.
    drop(ada);
    let err = Replica::open(db_path(dir.path(), "ada"), AgentId::from("bob")).err().unwrap();
    assert!(err.to_string().contains("belongs to ada"), "{err}");
}

#[test]
fn corrupt_changes_are_refused_and_nothing_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("c1");
    bob.create_conversation(
        &new_conversation("c1", demo::SALES, Channel::Email),
        Some(customer_message("m1", T0, "Hi")),
    )
    .unwrap();
    let before = (bob.stored_summaries().unwrap(), bob.stored_messages(&id).unwrap(), bob.heads(&id).unwrap());
    let good = bob.changes_since(&id, &[]).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    for garbage in
        [b"not automerge at all".to_vec(), flipped, good[..good.len() / 2].to_vec(), vec![0x85, 0x6f, 0x4a, 0x83]]
    {
        let err = bob.apply_changes(&id, &garbage).unwrap_err();
        assert!(matches!(err, ReplicaError::Document(DocError::Corrupt(_))), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert_eq!(
            (bob.stored_summaries().unwrap(), bob.stored_messages(&id).unwrap(), bob.heads(&id).unwrap()),
            before
        );
    }
    // Garbage for an unknown document stores nothing either.
    assert!(bob.apply_changes(&ConversationId::from("new"), b"junk").is_err());
    assert_eq!(bob.document_ids().unwrap(), vec![id.clone()]);
    // And the replica still works and reopens.
    bob.join(&id, T0).unwrap();
    drop(bob);
    let bob = Replica::open(db_path(dir.path(), "bob"), AgentId::from("bob")).unwrap();
    assert_eq!(bob.stored_messages(&id).unwrap().len(), 1);
}

#[test]
fn documents_from_a_newer_schema_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let new = new_conversation("future", demo::SALES, Channel::Email);
    let mut future = doc::create(automerge::ActorId::random(), &new).unwrap();
    future
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "schema", 99_i64)?;
            Ok(())
        })
        .unwrap();
    let err = bob.apply_changes(&new.id, &future.save()).unwrap_err();
    assert!(matches!(err, ReplicaError::Document(DocError::UnknownSchema { found: 99, .. })), "{err}");
    assert!(err.to_string().contains("newer Crewdesk"));
    assert!(bob.document_ids().unwrap().is_empty());
    assert!(bob.stored_summaries().unwrap().is_empty());
}

#[test]
fn a_replica_from_a_newer_version_is_not_opened_or_touched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path(), "bob");
    drop(open(dir.path(), "bob"));
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Replica::open(&path, AgentId::from("bob")).err().unwrap();
    assert!(matches!(err, ReplicaError::NewerSchema { found: 999, .. }), "{err}");
    assert!(err.to_string().contains("update Crewdesk"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(v, 999);
    drop(conn);
    assert_eq!(std::fs::read(&path).unwrap().len(), before.len());
}

#[test]
fn whatsapp_window_is_enforced_on_send() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("w1");
    bob.create_conversation(
        &new_conversation("w1", demo::SALES, Channel::WhatsApp),
        Some(customer_message("m1", T0, "Hi")),
    )
    .unwrap();
    bob.join(&id, T0).unwrap();
    let late = T0.plus(25 * Timestamp::HOUR);
    assert!(matches!(bob.send(&id, text("late"), late), Err(ReplicaError::Denied(DomainError::WhatsAppWindowClosed))));
    assert_eq!(bob.conversation(&id, late).unwrap().whatsapp_window_open, Some(false));
    bob.send_whatsapp_template(&id, "reconnect", vec!["Maya".into()], late).unwrap();
    let last = bob.conversation(&id, late).unwrap().summary.last_message.unwrap();
    assert_eq!(last.text, "Hi Maya, we replied to your question. Reply here to pick up where we left off.");
    assert!(matches!(
        bob.send_whatsapp_template(&id, "reconnect", vec![], late),
        Err(ReplicaError::Denied(DomainError::TemplateParams { expected: 1, given: 0 }))
    ));
}

#[test]
fn search_finds_customer_details_and_message_text_and_is_injection_safe() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("s1");
    bob.create_conversation(
        &new_conversation("s1", demo::SALES, Channel::Email),
        Some(customer_message("m1", T0, "My parcel to Trondheim is late")),
    )
    .unwrap();
    bob.create_conversation(
        &new_conversation("s2", demo::SALES, Channel::Email),
        Some(customer_message("m2", T0, "Invoice question")),
    )
    .unwrap();
    let f = Filter::default();
    let ids = |bob: &Replica, q: &str| {
        bob.list_search(&f, T0, q).unwrap().rows.into_iter().map(|r| r.id.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&bob, "trondh"), vec!["s1"], "prefix of a word in a message");
    assert_eq!(ids(&bob, "parcel late"), vec!["s1"], "every word must match");
    assert_eq!(ids(&bob, "s2@example"), vec!["s2"], "customer email");
    assert_eq!(ids(&bob, "Customer s1"), vec!["s1"], "customer name");
    assert!(ids(&bob, "\" OR 1=1 --").is_empty(), "hostile input is only words");
    assert!(bob.list_search(&f, T0, "NEAR( AND \"").is_ok());
    bob.join(&id, T0).unwrap();
    bob.send(&id, text("Tracking number 4471 sent"), T0.plus(1000)).unwrap();
    assert_eq!(ids(&bob, "4471"), vec!["s1"], "new messages are indexed in the same transaction");
    bob.edit_customer(&id, &CustomerEdit { phone: Some("+47 5550 1234".into()), ..Default::default() }).unwrap();
    assert_eq!(ids(&bob, "5550"), vec!["s1"], "edited customer details are re-indexed");

    // The index does not merge inside sends: segments pile up (bounded by FTS5's crisis merge)
    // until the desk tidies it between sends, a bounded step at a time. Every message stays found.
    let segments = |path: &std::path::Path| {
        let c = rusqlite::Connection::open(path).unwrap();
        let automerge: i64 =
            c.query_row("SELECT v FROM search_config WHERE k = 'automerge'", [], |r| r.get(0)).unwrap();
        assert_eq!(automerge, 0);
        c.query_row("SELECT count(*) FROM search_data", [], |r| r.get::<_, i64>(0)).unwrap()
    };
    let path = db_path(dir.path(), "bob");
    // Each send adds a segment (a row of `search_data`) until FTS5's crisis merge (64 segments).
    let mut i = 0;
    while i < 6 || segments(&path) < 8 {
        bob.send(&id, text(&format!("Update {i}: parcel number 88{i:02}")), T0.plus(2000 + i)).unwrap();
        i += 1;
        assert!(i < 40, "segments pile up between tidyings");
    }
    let before = segments(&path);
    let mut steps = 0;
    while bob.tidy_search().unwrap() {
        steps += 1;
        assert!(steps < 100, "tidying ends");
    }
    assert!(steps > 0, "there was something to merge");
    assert!(segments(&path) < before, "fewer index rows after merging ({before})");
    assert_eq!(ids(&bob, "8803"), vec!["s1"]);
    assert_eq!(ids(&bob, "trondh"), vec!["s1"]);
}

#[test]
fn unread_until_marked_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("u1");
    bob.create_conversation(
        &new_conversation("u1", demo::SALES, Channel::Email),
        Some(customer_message("m1", T0, "Hi")),
    )
    .unwrap();
    assert_eq!(bob.seen_counts([&id]).unwrap().get(&id), None);
    bob.mark_read(&id).unwrap();
    assert_eq!(bob.seen_counts([&id]).unwrap().get(&id), Some(&1));
    bob.record_customer_message(&id, text("again"), T0.plus(1)).unwrap();
    assert_eq!(bob.summary(&id).unwrap().message_count, 2, "one more than seen: unread");
}

#[test]
fn the_judge_tells_added_messages_from_touched_history() {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    let new = new_conversation("c-history", demo::SALES, Channel::Email);
    let mut d = doc::create(automerge::ActorId::random(), &new).unwrap();
    d.transact::<_, _, DocError>(|tx| doc::add_message(tx, &customer_message("m1", Timestamp(1), "Hello?"))).unwrap();
    let before = d.get_heads();
    let check = |f: &dyn Fn(&mut automerge::transaction::Transaction<'_>) -> Result<(), DocError>| {
        let mut fork = d.fork();
        fork.transact::<_, _, DocError>(|tx| f(tx)).unwrap();
        assert_eq!(fork.get_changes(&before).len(), 1);
        let change = fork.get_last_local_change().unwrap();
        let summary = crewdesk::replica::conversation::summarize(&fork, &change).unwrap();
        let touched = summary.touches_history || summary.root.contains("messages");
        (summary.added.into_iter().map(|m| m.id.to_string()).collect::<Vec<_>>(), touched)
    };
    let reply = |tx: &mut automerge::transaction::Transaction<'_>| {
        doc::add_message(
            tx,
            &crewdesk::domain::Message {
                author: doc::crew(&"bob".into()),
                ..customer_message("m2", Timestamp(2), "Hi!")
            },
        )
    };
    assert_eq!(check(&reply), (vec!["m2".to_owned()], false));
    // Other parts of the conversation change freely.
    assert_eq!(check(&|tx| doc::set_in_room(tx, &"bob".into(), true)), (vec![], false));
    let edit = CustomerEdit { notes: Some("VIP".into()), ..CustomerEdit::default() };
    assert_eq!(check(&|tx| doc::edit_customer(tx, &edit)), (vec![], false));
    // Sent messages do not.
    let edit_text = |tx: &mut automerge::transaction::Transaction<'_>| {
        let (_, messages) = tx.get(automerge::ROOT, "messages")?.unwrap();
        let (_, m1) = tx.get(&messages, "m1")?.unwrap();
        let (_, body) = tx.get(&m1, "body")?.unwrap();
        tx.put(&body, "text", "Goodbye")?;
        Ok(())
    };
    assert_eq!(check(&edit_text), (vec![], true));
    let delete = |tx: &mut automerge::transaction::Transaction<'_>| {
        let (_, messages) = tx.get(automerge::ROOT, "messages")?.unwrap();
        tx.delete(&messages, "m1")?;
        Ok(())
    };
    assert_eq!(check(&delete), (vec![], true));
    let replace = |tx: &mut automerge::transaction::Transaction<'_>| {
        doc::add_message(tx, &customer_message("m1", Timestamp(3), "Forged"))
    };
    assert_eq!(check(&replace), (vec![], true));
    let wipe = |tx: &mut automerge::transaction::Transaction<'_>| {
        tx.put_object(automerge::ROOT, "messages", automerge::ObjType::Map)?;
        Ok(())
    };
    assert!(check(&wipe).1);
    // A new message and an edit of an old one in the same change: touched.
    let both = |tx: &mut automerge::transaction::Transaction<'_>| {
        reply(tx)?;
        edit_text(tx)
    };
    assert_eq!(check(&both), (vec!["m2".to_owned()], true));
}

#[test]
fn the_list_is_a_window_over_every_row_and_the_count_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = open(dir.path(), "ada");
    let now = Timestamp::now();
    demo::fill(&mut ada, &DemoSpec::default(), now).unwrap();
    let all = Filter { limit: usize::MAX, ..Filter::default() };
    let everything = ada.list(&all, now);
    assert!(everything.total > 20, "the demo has enough rows: {}", everything.total);
    assert_eq!(everything.rows.len(), everything.total);
    // Windows of 7 rows, one after the other, give back the whole list in order.
    let mut seen = Vec::new();
    let mut offset = 0;
    while offset < everything.total {
        let window = ada.list(&Filter { limit: 7, offset, ..Filter::default() }, now);
        assert_eq!(window.total, everything.total, "the count covers everything");
        assert_eq!(window.offset, offset);
        seen.extend(window.rows.into_iter().map(|r| r.id.clone()));
        offset += 7;
    }
    let ids: Vec<ConversationId> = everything.rows.iter().map(|r| r.id.clone()).collect();
    assert_eq!(seen, ids);
    // Past the end, the window shows the last rows.
    let past = ada.list(&Filter { limit: 5, offset: everything.total + 100, ..Filter::default() }, now);
    assert_eq!(past.offset, everything.total - 5);
    assert_eq!(past.rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids[ids.len() - 5..]);
}

#[test]
fn a_template_filled_into_the_composer_and_edited_is_sent_as_that_template() {
    let dir = tempfile::tempdir().unwrap();
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("c1");
    bob.create_conversation(
        &new_conversation("c1", demo::SALES, Channel::WebWidget),
        Some(customer_message("m1", T0, "Hello?")),
    )
    .unwrap();
    bob.join(&id, T0).unwrap();
    let name = bob.team(&demo::SALES.into()).unwrap().templates[0].name.clone();
    bob.send_filled_template(&id, &name, "Edited before sending".into(), T0.plus(MIN)).unwrap();
    let last = bob.stored_messages(&id).unwrap().pop().unwrap();
    assert_eq!(
        last.body,
        crewdesk::domain::MessageBody::Template { template: name, text: "Edited before sending".into() }
    );
    assert!(matches!(
        bob.send_filled_template(&id, "no such template", "x".into(), T0.plus(MIN)),
        Err(ReplicaError::UnknownTemplate(..))
    ));
}

#[test]
fn a_lost_grab_leaves_the_notifications_a_minute_after_it_was_first_shown() {
    let dir = tempfile::tempdir().unwrap();
    let mut dave = open(dir.path(), "dave");
    let mut bob = open(dir.path(), "bob");
    let id = ConversationId::from("c1");
    dave.create_conversation(
        &new_conversation("c1", demo::SUPPORT, Channel::WebWidget),
        Some(customer_message("m1", T0, "Hello?")),
    )
    .unwrap();
    push(&mut dave, &mut bob);
    bob.grab(&id, T0).unwrap();
    dave.grab(&id, T0).unwrap();
    push(&mut bob, &mut dave);
    // The relay's decision, as it writes it: dave won.
    let mut relay = open(dir.path(), "ada");
    push(&mut dave, &mut relay);
    let bytes = {
        let d = relay.document_bytes(&id).unwrap();
        let mut d = automerge::Automerge::load(&d).unwrap();
        let before = d.get_heads();
        d.transact::<_, _, DocError>(|tx| doc::record_owner(tx, &AgentId::from("dave"))).unwrap();
        d.save_after(&before)
    };
    push(&mut dave, &mut bob);
    bob.apply_changes(&id, &bytes).unwrap();
    let now = T0.plus(MIN);
    let lost =
        |r: &Replica, at: Timestamp| r.notifications(at).iter().any(|(s, g)| s.id == id && *g == GrabState::Lost);
    assert!(lost(&bob, now), "the lost grab is told");
    assert!(lost(&bob, now.plus(10 * MIN)), "until it has been shown");
    bob.lost_grabs_shown_now(std::slice::from_ref(&id), now).unwrap();
    assert!(lost(&bob, now.plus(30_000)), "still there half a minute after it was shown");
    assert!(!lost(&bob, now.plus(61_000)), "gone a minute after it was shown");
}
