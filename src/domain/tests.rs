//! Table tests for the status and role rules, including the exact threshold boundaries.

use super::access::*;
use super::filter::*;
use super::status::*;
use super::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);
const MIN: i64 = Timestamp::MINUTE;

fn team(mode: TeamMode) -> Team {
    Team {
        id: TeamId::from("t"),
        name: "T".into(),
        mode,
        thresholds: Thresholds::default(),
        members: vec![
            Member { agent: "admin".into(), name: "Admin".into(), role: Role::Admin },
            Member { agent: "rep1".into(), name: "Rep One".into(), role: Role::Representative },
            Member { agent: "rep2".into(), name: "Rep Two".into(), role: Role::Representative },
        ],
        templates: vec![],
        whatsapp_templates: vec![],
        conference_base: None,
    }
}

fn conv() -> ConversationSummary {
    ConversationSummary {
        id: "c".into(),
        team: "t".into(),
        channel: Channel::WebWidget,
        customer: Customer { id: "cu".into(), name: "Maya".into(), ..Default::default() },
        created_at: T0,
        last_message: None,
        last_customer_message_at: Some(T0),
        last_crew_message_at: None,
        waiting_since: Some(T0),
        crew_in_room: vec![],
        closed_at: None,
        owner: None,
        grab_requests: vec![],
        message_count: 1,
        presence: Presence::default(),
        handover: None,
    }
}

fn holds(s: &ConversationSummary, t: &Team, after: i64) -> Vec<Status> {
    Status::badges(s, t, T0.plus(after))
}

#[test]
fn waiting_thresholds_have_exact_boundaries() {
    let t = team(TeamMode::Open);
    let s = conv();
    use Status::*;
    let table: &[(i64, &[Status])] = &[
        (0, &[RepNeeded]),
        (3 * MIN, &[RepNeeded]),
        (3 * MIN + 1, &[SoonToBe, RepNeeded]),
        (5 * MIN, &[SoonToBe, RepNeeded]),
        (5 * MIN + 1, &[Overdue, RepNeeded]),
        (24 * 60 * MIN, &[Overdue, RepNeeded]),
        (24 * 60 * MIN + 1, &[Closed]),
    ];
    for (after, expected) in table {
        assert_eq!(holds(&s, &t, *after), expected.to_vec(), "after {after} ms");
    }
}

#[test]
fn thresholds_are_per_team() {
    let mut t = team(TeamMode::Open);
    t.thresholds = Thresholds { soon_to_be: MIN, overdue: 2 * MIN, auto_close: 60 * MIN };
    let s = conv();
    assert_eq!(holds(&s, &t, MIN + 1), vec![Status::SoonToBe, Status::RepNeeded]);
    assert_eq!(holds(&s, &t, 2 * MIN + 1), vec![Status::Overdue, Status::RepNeeded]);
    assert_eq!(holds(&s, &t, 60 * MIN + 1), vec![Status::Closed]);
    assert!(Thresholds { soon_to_be: 5, overdue: 5, auto_close: 10 }.validate().is_err());
}

#[test]
fn pending_versus_rep_needed_depends_on_crew_of_the_team() {
    let t = team(TeamMode::Open);
    let mut s = conv();
    s.crew_in_room = vec!["rep1".into()];
    assert_eq!(holds(&s, &t, MIN), vec![Status::Pending]);
    // Someone who is no longer in the team does not count as crew.
    s.crew_in_room = vec!["former".into()];
    assert_eq!(holds(&s, &t, MIN), vec![Status::RepNeeded]);
    // Nobody waiting: neither.
    s.waiting_since = None;
    assert_eq!(holds(&s, &t, MIN), Vec::<Status>::new());
}

#[test]
fn online_is_web_widget_presence_only() {
    let t = team(TeamMode::Open);
    let mut s = conv();
    s.waiting_since = None;
    s.presence.online = true;
    assert_eq!(holds(&s, &t, 0), vec![Status::Online]);
    s.channel = Channel::WhatsApp;
    assert_eq!(holds(&s, &t, 0), Vec::<Status>::new());
}

#[test]
fn manual_close_and_reopen_on_new_customer_message() {
    let t = team(TeamMode::Open);
    let mut s = conv();
    s.closed_at = Some(T0.plus(MIN));
    assert_eq!(closure(&s, &t, T0.plus(2 * MIN)), Some(Closure::Manual));
    assert_eq!(holds(&s, &t, 2 * MIN), vec![Status::Closed]);
    // A customer message at the same millisecond as CLOSE does not reopen; a later one does.
    s.last_customer_message_at = Some(T0.plus(MIN));
    assert!(is_closed(&s, &t, T0.plus(2 * MIN)));
    s.last_customer_message_at = Some(T0.plus(MIN + 1));
    s.waiting_since = Some(T0.plus(MIN + 1));
    assert_eq!(closure(&s, &t, T0.plus(2 * MIN)), None);
    assert_eq!(holds(&s, &t, 2 * MIN), vec![Status::RepNeeded]);
}

#[test]
fn auto_closed_conversation_reopens_when_the_customer_writes() {
    let t = team(TeamMode::Open);
    let mut s = conv();
    let later = T0.plus(25 * 60 * MIN);
    assert_eq!(closure(&s, &t, later), Some(Closure::Automatic));
    s.last_customer_message_at = Some(later);
    s.waiting_since = Some(later);
    assert_eq!(closure(&s, &t, later), None);
}

#[test]
fn whatsapp_window_is_24_hours_from_the_customer_last_message() {
    let mut s = conv();
    s.channel = Channel::WhatsApp;
    assert_eq!(whatsapp_window_open(&s, T0.plus(24 * 60 * MIN - 1)), Some(true));
    assert_eq!(whatsapp_window_open(&s, T0.plus(24 * 60 * MIN)), Some(false));
    s.channel = Channel::Email;
    assert_eq!(whatsapp_window_open(&s, T0), None);
}

#[test]
fn email_fallback_needs_web_widget_offline_and_an_email() {
    let mut s = conv();
    assert!(!email_fallback_active(&s));
    s.customer.email = Some("maya@example.com".into());
    assert!(email_fallback_active(&s));
    s.presence.online = true;
    assert!(!email_fallback_active(&s));
    s.presence.online = false;
    s.channel = Channel::Email;
    assert!(!email_fallback_active(&s));
}

#[test]
fn role_rules_in_open_mode() {
    let t = team(TeamMode::Open);
    let s = conv();
    let now = T0.plus(MIN);
    // (agent, may_see, join_kind, may_grab)
    type Row = (&'static str, bool, Result<JoinKind, DomainError>, Result<(), DomainError>);
    let table: &[Row] = &[
        ("admin", true, Ok(JoinKind::Join), Err(DomainError::NotGrabMode)),
        ("rep1", true, Ok(JoinKind::Join), Err(DomainError::NotGrabMode)),
        ("stranger", false, Err(DomainError::NotAMember), Err(DomainError::NotAMember)),
    ];
    for (agent, see, join, grab) in table {
        let a = AgentId::from(*agent);
        assert_eq!(may_see(&t, &a, &s), *see, "{agent} see");
        assert_eq!(&join_kind(&t, &a, &s, now), join, "{agent} join");
        assert_eq!(&may_grab(&t, &a, &s, now), grab, "{agent} grab");
    }
}

#[test]
fn role_rules_in_grab_mode() {
    let t = team(TeamMode::Grab);
    let now = T0.plus(MIN);
    let unowned = conv();
    let mut owned = conv();
    owned.owner = Some("rep1".into());
    owned.crew_in_room = vec!["rep1".into()];
    let mut requested = conv();
    requested.grab_requests = vec!["rep2".into()];

    // Unowned: representatives grab (JOIN means grab), admins join, admins never grab.
    assert_eq!(join_kind(&t, &"rep1".into(), &unowned, now), Ok(JoinKind::Grab));
    assert_eq!(may_join(&t, &"rep1".into(), &unowned, now), Err(DomainError::GrabRequired));
    assert_eq!(may_grab(&t, &"rep1".into(), &unowned, now), Ok(()));
    assert_eq!(join_kind(&t, &"admin".into(), &unowned, now), Ok(JoinKind::Join));
    assert_eq!(may_grab(&t, &"admin".into(), &unowned, now), Err(DomainError::AdminsDoNotGrab));
    assert!(in_notifications(&t, &"rep1".into(), &unowned, now));
    assert!(!in_notifications(&t, &"admin".into(), &unowned, now));

    // Owned by rep1: hidden from and not joinable by rep2; admins still see and join.
    assert!(!may_see(&t, &"rep2".into(), &owned));
    assert_eq!(join_kind(&t, &"rep2".into(), &owned, now), Err(DomainError::HandledByAnother));
    assert_eq!(may_grab(&t, &"rep2".into(), &owned, now), Err(DomainError::HandledByAnother));
    assert!(may_see(&t, &"admin".into(), &owned));
    assert_eq!(join_kind(&t, &"admin".into(), &owned, now), Ok(JoinKind::Join));
    assert_eq!(join_kind(&t, &"rep1".into(), &owned, now), Err(DomainError::AlreadyInRoom));

    // A grab waiting for the relay: no second request.
    assert_eq!(grab_state(&"rep2".into(), &requested), GrabState::AwaitingConfirmation);
    assert_eq!(may_grab(&t, &"rep2".into(), &requested, now), Err(DomainError::GrabAlreadyRequested));
    let mut lost = requested.clone();
    lost.owner = Some("rep1".into());
    assert_eq!(grab_state(&"rep2".into(), &lost), GrabState::Lost);
    assert_eq!(grab_state(&"rep1".into(), &lost), GrabState::Won);
}

#[test]
fn relay_decides_the_first_representative_and_never_changes() {
    let t = team(TeamMode::Grab);
    let order: Vec<AgentId> = vec!["admin".into(), "rep2".into(), "rep1".into()];
    assert_eq!(decide_grab(None, &t, &order), Some(&AgentId::from("rep2")));
    let owner = AgentId::from("rep1");
    assert_eq!(decide_grab(Some(&owner), &t, &order), Some(&owner));
    assert_eq!(decide_grab(None, &t, &[]), None);
}

#[test]
fn send_close_edit_rules() {
    let t = team(TeamMode::Open);
    let now = T0.plus(MIN);
    let text = MessageBody::Text { text: "hello".into() };
    let mut s = conv();
    assert_eq!(may_send(&t, &"rep1".into(), &s, &text, now), Err(DomainError::NotInRoom));
    assert_eq!(may_close(&t, &"rep1".into(), &s, now), Err(DomainError::NotInRoom));
    assert_eq!(may_close(&t, &"admin".into(), &s, now), Ok(()));
    assert_eq!(may_edit_customer(&t, &"rep1".into(), &s), Err(DomainError::NotInRoom));
    assert_eq!(may_edit_customer(&t, &"admin".into(), &s), Ok(()));
    s.crew_in_room = vec!["rep1".into()];
    assert_eq!(may_send(&t, &"rep1".into(), &s, &text, now), Ok(()));
    assert_eq!(may_leave(&t, &"rep1".into(), &s), Ok(()));
    let empty = MessageBody::Text { text: "  ".into() };
    assert_eq!(may_send(&t, &"rep1".into(), &s, &empty, now), Err(DomainError::EmptyMessage));
    let wa =
        MessageBody::WhatsAppTemplate { template: "x".into(), language: "en".into(), params: vec![], text: "x".into() };
    assert_eq!(may_send(&t, &"rep1".into(), &s, &wa, now), Err(DomainError::WhatsAppTemplateOutsideWhatsApp));
    // WhatsApp: free text inside the window, templates only outside it.
    s.channel = Channel::WhatsApp;
    let late = T0.plus(23 * 60 * MIN);
    assert_eq!(may_send(&t, &"rep1".into(), &s, &text, late), Ok(()));
    s.last_customer_message_at = Some(T0.plus(-2 * 60 * MIN));
    assert_eq!(may_send(&t, &"rep1".into(), &s, &text, late), Err(DomainError::WhatsAppWindowClosed));
    assert_eq!(may_send(&t, &"rep1".into(), &s, &wa, late), Ok(()));
    // Closed (here by 24 h of silence): a template follow-up is allowed, a second CLOSE is not,
    // and grabbing a closed conversation is refused.
    assert!(is_closed(&s, &t, late));
    assert_eq!(may_close(&t, &"admin".into(), &s, late), Err(DomainError::Closed));
    let g = team(TeamMode::Grab);
    s.crew_in_room.clear();
    assert_eq!(may_grab(&g, &"rep2".into(), &s, late), Err(DomainError::Closed));
    assert_eq!(join_kind(&g, &"rep2".into(), &s, late), Err(DomainError::Closed));
    assert_eq!(join_kind(&g, &"admin".into(), &s, late), Ok(JoinKind::Join));
}

#[test]
fn filters_and_counts() {
    let t = team(TeamMode::Grab);
    let mut other = team(TeamMode::Open);
    other.id = "o".into();
    other.members.retain(|m| m.agent.as_str() != "rep1");
    let now = T0.plus(4 * MIN);
    let mk = |id: &str, f: &dyn Fn(&mut ConversationSummary)| {
        let mut s = conv();
        s.id = id.into();
        f(&mut s);
        s
    };
    let rows = [
        mk("soon-rep-needed", &|_| {}),
        mk("pending-mine", &|s| {
            s.owner = Some("rep1".into());
            s.crew_in_room = vec!["rep1".into()];
            s.waiting_since = Some(T0.plus(3 * MIN));
        }),
        mk("theirs", &|s| {
            s.owner = Some("rep2".into());
            s.crew_in_room = vec!["rep2".into()];
        }),
        mk("closed", &|s| s.closed_at = Some(T0.plus(MIN))),
        mk("whatsapp", &|s| {
            s.channel = Channel::WhatsApp;
            s.waiting_since = None;
        }),
        mk("other-team", &|s| s.team = "o".into()),
    ];
    let team_of = |id: &TeamId| [&t, &other].into_iter().find(|x| &x.id == id);
    let rep1 = AgentId::from("rep1");
    let run = |sel: Selection, channels: Vec<Channel>, team: Option<TeamId>| {
        let f = Filter { selection: sel, channels, team, ..Filter::default() };
        let l = evaluate(rows.iter(), team_of, &rep1, now, &f);
        (l.rows.iter().map(|s| s.id.0.clone()).collect::<Vec<_>>(), l.counts)
    };
    // rep1 is not in team "o": its conversation is never shown or counted.
    let (ids, counts) = run(Selection::View(View::AllChatroom), vec![], None);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["pending-mine", "soon-rep-needed", "whatsapp"]);
    assert_eq!(counts.all_chatroom, 3);
    assert_eq!(counts.joined, 1);
    assert_eq!(counts.soon_to_be, 1);
    assert_eq!(counts.rep_needed, 1);
    assert_eq!(counts.pending, 1);
    assert_eq!(counts.closed, 1);
    assert_eq!(counts.teams.get(&TeamId::from("t")), Some(&3));
    assert_eq!(counts.teams.get(&TeamId::from("o")), None);
    assert_eq!(run(Selection::View(View::Joined), vec![], None).0, vec!["pending-mine"]);
    assert_eq!(run(Selection::Status(Status::Closed), vec![], None).0, vec!["closed"]);
    assert_eq!(run(Selection::Status(Status::RepNeeded), vec![], None).0, vec!["soon-rep-needed"]);
    let (ids, counts) = run(Selection::View(View::AllChatroom), vec![Channel::WhatsApp], None);
    assert_eq!((ids, counts.all_chatroom, counts.closed), (vec!["whatsapp".to_owned()], 1, 0));
    let (ids, counts) = run(Selection::View(View::AllChatroom), vec![], Some("o".into()));
    assert_eq!((ids.len(), counts.all_chatroom), (0, 0));
}

#[test]
fn longest_waiting_sort_puts_nobody_waiting_last() {
    let t = team(TeamMode::Open);
    let mut a = conv();
    a.id = "a".into();
    a.waiting_since = Some(T0.plus(2 * MIN));
    let mut b = conv();
    b.id = "b".into();
    let mut c = conv();
    c.id = "c".into();
    c.waiting_since = None;
    let rows = [a, b, c];
    let f = Filter { sort: Sort::LongestWaiting, ..Filter::default() };
    let l = evaluate(rows.iter(), |_| Some(&t), &"rep1".into(), T0.plus(3 * MIN), &f);
    assert_eq!(l.rows.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["b", "a", "c"]);
}

#[test]
fn templates_fill_placeholders() {
    let c = Customer { id: "x".into(), name: "Maya".into(), email: Some("m@e.com".into()), ..Default::default() };
    assert_eq!(fill_template("Hi {name} ({email}), {agent} here", &c, "Bob"), "Hi Maya (m@e.com), Bob here");
    let wa = WhatsAppTemplate { name: "n".into(), language: "en".into(), body: "Hello {{1}}, order {{2}}".into() };
    assert_eq!(fill_whatsapp_template(&wa, &["Maya".into(), "42".into()]), Ok("Hello Maya, order 42".into()));
    assert_eq!(
        fill_whatsapp_template(&wa, &["Maya".into()]),
        Err(DomainError::TemplateParams { expected: 2, given: 1 })
    );
}

#[test]
fn customer_edit_validation() {
    assert!(CustomerEdit { email: Some("not-an-email".into()), ..Default::default() }.validate().is_err());
    assert!(CustomerEdit { name: Some("  ".into()), ..Default::default() }.validate().is_err());
    assert!(CustomerEdit { phone: Some("<script>".into()), ..Default::default() }.validate().is_err());
    assert!(
        CustomerEdit { email: Some("".into()), phone: Some("+47 (0) 123-45".into()), ..Default::default() }
            .validate()
            .is_ok()
    );
}

#[test]
fn whatsapp_delivery_follows_the_24_hour_window() {
    let text = MessageBody::Text { text: "hello".into() };
    let wa =
        MessageBody::WhatsAppTemplate { template: "x".into(), language: "en".into(), params: vec![], text: "x".into() };
    let last = Some(T0);
    assert_eq!(may_deliver_on_whatsapp(last, &text, T0.plus(24 * 60 * MIN - 1)), Ok(()));
    assert_eq!(may_deliver_on_whatsapp(last, &text, T0.plus(24 * 60 * MIN)), Err(DomainError::WhatsAppWindowClosed));
    assert_eq!(may_deliver_on_whatsapp(None, &text, T0), Err(DomainError::WhatsAppWindowClosed));
    assert_eq!(may_deliver_on_whatsapp(last, &wa, T0.plus(48 * 60 * MIN)), Ok(()));
    assert_eq!(may_deliver_on_whatsapp(None, &wa, T0), Ok(()));
}

#[test]
fn conference_links_use_the_team_provider_and_are_checked() {
    let mut t = team(TeamMode::Open);
    assert_eq!(conference_url(&t, "abc"), "https://meet.jit.si/crewdesk-abc");
    t.conference_base = Some("https://meet.example.com/rooms/".into());
    assert_eq!(conference_url(&t, "abc"), "https://meet.example.com/rooms/crewdesk-abc");
    t.conference_base = Some("javascript:alert(1)".into());
    assert_eq!(conference_url(&t, "abc"), "https://meet.jit.si/crewdesk-abc", "a bad base falls back");
    assert!(validate_conference_base("https://meet.example.com").is_ok());
    for bad in ["ftp://x", "https://", "https:///x", "https://x/?a=1", "meet.example.com"] {
        assert_eq!(validate_conference_base(bad), Err(DomainError::InvalidConferenceUrl), "{bad}");
    }
}

#[test]
fn a_template_has_a_name_a_text_and_only_known_placeholders() {
    let t = |name: &str, text: &str| MessageTemplate { name: name.into(), text: text.into() };
    assert_eq!(t("Greeting", "Hi {name}, {agent} here. {not a placeholder} {}").validate(), Ok(()));
    assert_eq!(t("Refund", "Your email {email} and phone {phone}").validate(), Ok(()));
    assert!(matches!(t("", "Hi").validate(), Err(DomainError::InvalidTemplate(_))));
    assert!(matches!(t("Two\nlines", "Hi").validate(), Err(DomainError::InvalidTemplate(_))));
    assert!(matches!(t(&"n".repeat(MAX_NAME_BYTES + 1), "Hi").validate(), Err(DomainError::InvalidTemplate(_))));
    assert_eq!(t("Empty", "  \n").validate(), Err(DomainError::EmptyMessage));
    assert_eq!(
        t("Long", &"x".repeat(MAX_MESSAGE_BYTES + 1)).validate(),
        Err(DomainError::MessageTooLong { max: MAX_MESSAGE_BYTES })
    );
    let Err(DomainError::InvalidTemplate(why)) = t("Typo", "Hi {nmae}").validate() else { panic!("accepted") };
    assert!(why.contains("{nmae}") && why.contains("{name}"), "{why}");
    // A team's list: no two with one name, at most MAX_TEMPLATES.
    assert_eq!(validate_templates(&[t("A", "a"), t("B", "b")]), Ok(()));
    assert_eq!(checked_templates(vec![t(" A ", "a ")]), Ok(vec![t("A", "a ")]), "names are kept trimmed");
    assert!(matches!(validate_templates(&[t("A", "a"), t(" A ", "b")]), Err(DomainError::InvalidTemplate(_))));
    let many: Vec<MessageTemplate> = (0..=MAX_TEMPLATES).map(|i| t(&format!("t{i}"), "x")).collect();
    assert!(matches!(validate_templates(&many), Err(DomainError::InvalidTemplate(_))));
}

/// The list's window is the same slice of the same order however it is asked for: every offset and
/// limit, both sorts, against a full sort of every match.
#[test]
fn every_window_is_a_slice_of_the_whole_sorted_list() {
    let t = team(TeamMode::Open);
    let now = T0.plus(60 * MIN);
    // Equal times and no waiting at all among them, so ties are broken by id.
    let rows: Vec<ConversationSummary> = (0..40)
        .map(|i| ConversationSummary {
            id: ConversationId(format!("c{:02}", (i * 17) % 40)),
            created_at: T0.plus((i % 7) * MIN),
            waiting_since: (i % 3 != 0).then(|| T0.plus((i % 5) * MIN)),
            ..conv()
        })
        .collect();
    for sort in [Sort::NewestActivity, Sort::LongestWaiting] {
        let everything = Filter { sort, limit: usize::MAX, ..Filter::default() };
        let whole: Vec<&ConversationId> =
            evaluate(rows.iter(), |_| Some(&t), &"rep1".into(), now, &everything).rows.iter().map(|s| &s.id).collect();
        assert_eq!(whole.len(), 40);
        for offset in 0..42 {
            for limit in [0, 1, 7, 40, 100] {
                let f = Filter { sort, limit, offset, ..Filter::default() };
                let l = evaluate(rows.iter(), |_| Some(&t), &"rep1".into(), now, &f);
                let ids: Vec<&ConversationId> = l.rows.iter().map(|s| &s.id).collect();
                assert_eq!(l.total, 40);
                assert_eq!(
                    ids,
                    whole[l.offset..(l.offset + limit).min(40)].to_vec(),
                    "{sort:?} offset {offset} limit {limit}"
                );
            }
        }
    }
}
