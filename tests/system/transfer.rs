//! ↪ Hand-overs between desks through the real relay: made offline, judged by the core on both
//! sides, and the same everywhere once the desks are back.

use crewdesk::demo;
use crewdesk::desk::notifications_due;
use crewdesk::domain::access::GrabState;
use crewdesk::domain::{AgentId, Channel, DomainError, MessageBody, Timestamp};
use crewdesk::replica::ReplicaError;
use system_tests::{Agent, TestRelay, eventually};

/// Support is a grab-mode team: bob wins the grab, then, offline, hands the conversation to dave.
/// When bob is back, dave is its representative on every desk, in the room and told so once;
/// bob is out of it (and has neither won nor lost a grab); erin, another representative, cannot see
/// it; ada (admin) sees the hand-over in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_made_offline_makes_the_colleague_the_representative_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start(dir.path().to_owned()).await;
    let [ada, bob, dave, erin] = ["ada", "bob", "dave", "erin"].map(|a| Agent::start(&relay, &tokens, a));
    for a in [&ada, &bob, &dave, &erin] {
        a.connected().await;
    }
    let id = relay.customer_conversation(&tokens["ada"], demo::SUPPORT, Channel::WebWidget).await;
    bob.has(&id).await;
    bob.act(&id, |r| r.grab(&id, Timestamp::now()).unwrap());
    let owner = |a: &Agent| a.with(|r| r.summary(&id).and_then(|s| s.owner.clone()));
    eventually(10, "bob won the grab", || owner(&bob) == Some("bob".into())).await;
    eventually(10, "dave knows", || owner(&dave) == Some("bob".into())).await;

    // Offline: bob hands it over. His desk shows it at once; nothing reached the relay yet.
    relay.stop().await;
    let dave_id = AgentId::from("dave");
    // Not to an admin in a grab-mode team, nor to someone outside it (carol is in Sales only).
    for to in ["ada", "carol"] {
        let err = bob.with(|r| r.transfer(&id, &to.into(), Timestamp::now())).unwrap_err();
        assert!(matches!(err, ReplicaError::Denied(DomainError::InvalidTransfer(_))), "{err}");
    }
    bob.act(&id, |r| r.transfer(&id, &dave_id, Timestamp::now()).unwrap());
    let s = bob.with(|r| r.summary(&id).cloned().unwrap());
    assert_eq!(s.owner, Some(dave_id.clone()));
    assert!(!s.is_in_room(&"bob".into()) && s.is_in_room(&dave_id), "{:?}", s.crew_in_room);
    assert_eq!(owner(&dave), Some("bob".into()), "the relay is down: dave has not heard");

    relay.restart().await;
    eventually(20, "dave handles it", || owner(&dave) == Some(dave_id.clone())).await;
    eventually(20, "ada knows", || owner(&ada) == Some(dave_id.clone())).await;
    let s = dave.with(|r| r.summary(&id).cloned().unwrap());
    assert!(s.is_in_room(&dave_id) && !s.is_in_room(&"bob".into()), "{:?}", s.crew_in_room);
    let h = s.handover.clone().expect("the hand-over is in the summary");
    assert_eq!((h.from.as_str(), h.to.as_str()), ("bob", "dave"));
    let support = demo::teams().into_iter().find(|t| t.id.as_str() == demo::SUPPORT).unwrap();
    let due = notifications_due(&s, &support, &dave_id, Timestamp::now());
    assert!(due.iter().any(|n| n.title == "Bob Okafor handed you a conversation"), "{due:?}");
    assert!(notifications_due(&s, &support, &"bob".into(), Timestamp::now()).is_empty());
    // dave writes; bob, who handed it over, no longer sees it, and erin never could.
    let detail = dave.with(|r| r.conversation(&id, Timestamp::now()).unwrap());
    assert_eq!(detail.grab, GrabState::Won);
    dave.act(&id, |r| {
        r.send(&id, MessageBody::Text { text: "Dave here, I'll take it from here".into() }, Timestamp::now()).unwrap()
    });
    eventually(10, "bob's desk knows", || owner(&bob) == Some(dave_id.clone())).await;
    for other in [&bob, &erin] {
        let err = other.with(|r| r.conversation(&id, Timestamp::now())).unwrap_err();
        assert!(matches!(err, ReplicaError::Denied(DomainError::HandledByAnother)), "{err}");
    }
    eventually(10, "ada sees the hand-over and dave's reply", || {
        let texts = ada.message_texts(&id);
        texts.iter().any(|t| t.contains("Transfer") && t.contains("dave"))
            && texts.iter().any(|t| t.contains("Dave here"))
    })
    .await;
    relay.stop().await;
}
