//! What the desktop app shows, computed by the core's rules: one row of the list, the open
//! conversation, a Notifications entry, the session. Pure data shared by the Tauri shell (which
//! builds it) and the yew UI (which renders it), so the UI never re-implements a rule.

use crate::domain::access::{self, GrabState, JoinKind};
use crate::domain::filter::Counts;
use crate::domain::status::{self, ConversationSummary, Status};
use crate::domain::{AgentId, Message, MessageTemplate, Role, Team, TeamId, TeamMode, Timestamp, WhatsAppTemplate};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamView {
    pub id: TeamId,
    pub name: String,
    pub mode: TeamMode,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrewMember {
    pub id: AgentId,
    pub name: String,
}

/// Who is signed in, and where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub signed_in: bool,
    pub agent: Option<CrewMember>,
    pub relay_url: Option<String>,
    pub teams: Vec<TeamView>,
    /// Where the desktop keeps the agent's token.
    #[serde(default)]
    pub token_kept: Option<TokenKept>,
    /// Not signed in yet: the desk of an earlier sign-in is being opened (the window says so
    /// instead of showing the sign-in form).
    #[serde(default)]
    pub opening: bool,
}

/// Where the desktop keeps the agent's token between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenKept {
    /// In the system keyring; otherwise in the settings file.
    pub in_keyring: bool,
    /// What the desk says of it (the file and why no keyring took it).
    pub note: String,
}

/// One row of the yellow block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowView {
    pub summary: ConversationSummary,
    pub team_name: String,
    pub badges: Vec<Status>,
    pub waiting_ms: Option<i64>,
    /// What JOIN does here, if it is offered.
    pub join: Option<JoinKind>,
    pub in_room: bool,
    pub unread: bool,
    /// Local changes the relay has not yet made durable.
    pub unsynced: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListView {
    /// The rows of the window asked for (from `offset` in the whole sorted list).
    pub rows: Vec<RowView>,
    pub total: usize,
    #[serde(default)]
    pub offset: usize,
    pub counts: Counts,
}

/// The green block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailView {
    pub row: RowView,
    pub messages: Vec<Message>,
    pub team_mode: TeamMode,
    pub crew: Vec<CrewMember>,
    pub grab: GrabState,
    pub may_leave: bool,
    pub may_close: bool,
    pub may_edit_customer: bool,
    /// Why the composer is disabled, or `None` when the agent may write.
    pub composer_blocked: Option<String>,
    pub whatsapp_window_open: Option<bool>,
    pub email_fallback: bool,
    pub templates: Vec<MessageTemplate>,
    pub whatsapp_templates: Vec<WhatsAppTemplate>,
    /// Names of agents by id, for message authors.
    pub names: Vec<CrewMember>,
    /// Why the relay refused a change this agent made here (shown until everything is synced).
    #[serde(default)]
    pub refused: Option<String>,
    /// Messages of this agent the relay refused: shown as not delivered, with why, to copy.
    #[serde(default)]
    pub undelivered: Vec<Undelivered>,
    /// The colleagues ↪ TRANSFER may hand this conversation to (empty: not offered).
    #[serde(default)]
    pub transfer_to: Vec<CrewMember>,
    /// Older messages not in `messages` (the desk asked for the newest only).
    #[serde(default)]
    pub earlier: usize,
}

/// A message the relay refused (the rules changed while the agent was offline).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undelivered {
    pub message: Message,
    pub reason: String,
    /// It is sent again once the desk is in sync with the relay.
    pub retrying: bool,
}

/// One entry of the Notifications panel (representatives of grab-mode teams).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationView {
    pub row: RowView,
    pub grab: GrabState,
    pub may_grab: bool,
}

pub fn row_view(
    s: &ConversationSummary,
    team: &Team,
    agent: &AgentId,
    now: Timestamp,
    seen: u32,
    unsynced: bool,
) -> RowView {
    RowView {
        team_name: team.name.clone(),
        badges: Status::badges(s, team, now),
        waiting_ms: status::waiting_for(s, team, now),
        join: access::join_kind(team, agent, s, now).ok(),
        in_room: s.is_in_room(agent),
        unread: s.message_count > seen
            && s.last_message.as_ref().is_some_and(|m| m.author == crate::domain::AuthorKind::Customer),
        unsynced,
        summary: with_names(s, team),
    }
}

/// The row as the list shows it: a hand-over that is the last message names both colleagues (the
/// index's preview, written without the team, can only name the receiver's id).
fn with_names(s: &ConversationSummary, team: &Team) -> ConversationSummary {
    let mut row = s.clone();
    if let (Some(h), Some(last)) = (&s.handover, row.last_message.as_mut())
        && last.at == h.at
        && last.text.starts_with('↪')
    {
        let name = |a: &AgentId| team.member(a).map_or_else(|| a.to_string(), |m| m.name.clone());
        last.text = format!("↪ {} handed it to {}", name(&h.from), name(&h.to));
    }
    row
}

/// Builds the green block from the index row, the materialized messages and the team.
pub fn detail_view(row: RowView, messages: Vec<Message>, team: &Team, agent: &AgentId, now: Timestamp) -> DetailView {
    let s = &row.summary;
    let probe = crate::domain::MessageBody::Text { text: "probe".into() };
    let composer_blocked = match access::may_send(team, agent, s, &probe, now) {
        Ok(()) => None,
        // Outside the WhatsApp window the composer stays usable for approved templates.
        Err(crate::domain::DomainError::WhatsAppWindowClosed) => None,
        Err(e) => Some(e.to_string()),
    };
    let name_of = |id: &AgentId| team.member(id).map_or_else(|| id.to_string(), |m| m.name.clone());
    DetailView {
        crew: s.crew_in_room.iter().map(|a| CrewMember { id: a.clone(), name: name_of(a) }).collect(),
        grab: access::grab_state(agent, s),
        may_leave: access::may_leave(team, agent, s).is_ok(),
        may_close: access::may_close(team, agent, s, now).is_ok(),
        may_edit_customer: access::may_edit_customer(team, agent, s).is_ok(),
        composer_blocked,
        whatsapp_window_open: status::whatsapp_window_open(s, now),
        email_fallback: status::email_fallback_active(s),
        templates: team.templates.clone(),
        whatsapp_templates: team.whatsapp_templates.clone(),
        names: team.members.iter().map(|m| CrewMember { id: m.agent.clone(), name: m.name.clone() }).collect(),
        refused: None,
        undelivered: Vec::new(),
        transfer_to: access::transfer_candidates(team, agent, s)
            .into_iter()
            .map(|a| CrewMember { id: a.clone(), name: name_of(a) })
            .collect(),
        earlier: 0,
        team_mode: team.mode,
        messages,
        row,
    }
}

pub fn team_views(teams: &[&Team], agent: &AgentId) -> Vec<TeamView> {
    teams
        .iter()
        .filter_map(|t| {
            t.role_of(agent).map(|role| TeamView { id: t.id.clone(), name: t.name.clone(), mode: t.mode, role })
        })
        .collect()
}

/// "3:07" style waiting time.
pub fn format_waiting(ms: i64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h {:02}m", secs / 3600, (secs / 60) % 60)
    } else {
        format!("{}:{:02}", secs / 60, secs % 60)
    }
}

/// An OS notification the agent should get, with a key that makes it happen once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueNotification {
    pub key: String,
    pub title: String,
    pub body: String,
}

/// The OS notifications a conversation deserves for this agent now: a customer message in a
/// conversation the agent is in, a new conversation a representative of a grab-mode team can grab,
/// a conversation turning overdue (in the room, or grab-able). Never for crew messages — the
/// agent's own included. Keys identify the event, so a notification is shown once.
pub fn notifications_due(
    s: &ConversationSummary,
    team: &Team,
    agent: &AgentId,
    now: Timestamp,
) -> Vec<DueNotification> {
    let mut out = Vec::new();
    let customer = &s.customer.name;
    if let (Some(last), Some(at)) = (&s.last_message, s.last_customer_message_at)
        && last.author == crate::domain::AuthorKind::Customer
        && s.is_in_room(agent)
    {
        out.push(DueNotification {
            key: format!("message:{}:{}", s.id, at.0),
            title: format!("{customer} wrote"),
            body: last.text.clone(),
        });
    }
    if let Some(h) = &s.handover
        && h.to == *agent
        && h.from != *agent
        && s.is_in_room(agent)
    {
        let from = team.member(&h.from).map_or_else(|| h.from.to_string(), |m| m.name.clone());
        out.push(DueNotification {
            key: format!("handover:{}:{}", s.id, h.at.0),
            title: format!("{from} handed you a conversation"),
            body: format!("{customer} is yours now"),
        });
    }
    let grabbable = access::in_notifications(team, agent, s, now) && access::grab_state(agent, s) == GrabState::None;
    if grabbable {
        out.push(DueNotification {
            key: format!("grab:{}", s.id),
            title: format!("New conversation in {}", team.name),
            body: format!("{customer} is waiting: grab it from Notifications"),
        });
    }
    if Status::Overdue.holds(s, team, now) && (s.is_in_room(agent) || grabbable) {
        out.push(DueNotification {
            key: format!("overdue:{}:{}", s.id, s.waiting_since.map_or(0, |w| w.0)),
            title: format!("{customer} is overdue"),
            body: "Waiting for a reply for too long".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::status::MessagePreview;
    use crate::domain::{AuthorKind, Channel, Customer, Member, Presence, Thresholds};

    fn team(mode: TeamMode) -> Team {
        Team {
            id: "t".into(),
            name: "Support".into(),
            mode,
            thresholds: Thresholds::default(),
            members: vec![
                Member { agent: "rep".into(), name: "Rep".into(), role: Role::Representative },
                Member { agent: "admin".into(), name: "Admin".into(), role: Role::Admin },
            ],
            templates: vec![],
            whatsapp_templates: vec![],
            conference_base: None,
        }
    }

    fn summary(author: AuthorKind, in_room: bool) -> ConversationSummary {
        let t0 = Timestamp(1_800_000_000_000);
        ConversationSummary {
            id: "c".into(),
            team: "t".into(),
            channel: Channel::Email,
            customer: Customer { name: "Maya".into(), ..Default::default() },
            created_at: t0,
            last_message: Some(MessagePreview { at: t0, author, text: "hi".into() }),
            last_customer_message_at: Some(t0),
            last_crew_message_at: None,
            waiting_since: (author == AuthorKind::Customer).then_some(t0),
            crew_in_room: if in_room { vec!["rep".into()] } else { vec![] },
            closed_at: None,
            owner: if in_room { Some("rep".into()) } else { None },
            grab_requests: vec![],
            message_count: 1,
            presence: Presence::default(),
            handover: None,
        }
    }

    fn keys(s: &ConversationSummary, t: &Team, agent: &str, after_ms: i64) -> Vec<String> {
        notifications_due(s, t, &agent.into(), s.created_at.plus(after_ms))
            .into_iter()
            .map(|n| n.key.split(':').next().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn customer_messages_notify_the_crew_in_the_room_only() {
        let t = team(TeamMode::Open);
        assert_eq!(keys(&summary(AuthorKind::Customer, true), &t, "rep", 1000), vec!["message"]);
        assert!(keys(&summary(AuthorKind::Customer, false), &t, "rep", 1000).is_empty());
        // A crew message (the agent's own, say) never notifies.
        assert!(keys(&summary(AuthorKind::Crew, true), &t, "rep", 1000).is_empty());
    }

    #[test]
    fn the_colleague_handed_a_conversation_hears_of_it_once_and_the_giver_does_not() {
        let t = team(TeamMode::Grab);
        // The admin handed rep the conversation: rep is in the room and its representative.
        let mut s = summary(AuthorKind::Crew, true);
        s.handover = Some(crate::domain::status::Handover { from: "admin".into(), to: "rep".into(), at: s.created_at });
        assert_eq!(keys(&s, &t, "rep", 1000), vec!["handover"]);
        let n = &notifications_due(&s, &t, &"rep".into(), s.created_at.plus(1000))[0];
        assert_eq!((n.title.as_str(), n.body.as_str()), ("Admin handed you a conversation", "Maya is yours now"));
        assert!(keys(&s, &t, "admin", 1000).is_empty());
        // The list names both colleagues when the hand-over is the last message.
        s.last_message =
            Some(MessagePreview { at: s.created_at, author: AuthorKind::Crew, text: "↪ Handed over to rep".into() });
        let row = row_view(&s, &t, &"rep".into(), s.created_at, 0, false);
        assert_eq!(row.summary.last_message.unwrap().text, "↪ Admin handed it to Rep");
        // What TRANSFER offers: in a grab-mode team, representatives other than the agent.
        let names = |s: &ConversationSummary, t: &Team, agent: &str| {
            let v = detail_view(
                row_view(s, t, &agent.into(), s.created_at, 0, false),
                vec![],
                t,
                &agent.into(),
                s.created_at,
            );
            v.transfer_to.into_iter().map(|c| c.name).collect::<Vec<_>>()
        };
        assert!(names(&s, &t, "rep").is_empty(), "rep is the only representative");
        assert!(names(&s, &t, "admin").is_empty(), "rep has it already");
        // Open mode: an admin hands a conversation nobody is in to rep.
        let open = team(TeamMode::Open);
        let nobody = summary(AuthorKind::Customer, false);
        assert_eq!(names(&nobody, &open, "admin"), vec!["Rep"]);
        assert!(names(&nobody, &open, "rep").is_empty(), "rep is not in the room");
    }

    #[test]
    fn grab_mode_representatives_hear_of_new_conversations_admins_do_not() {
        let t = team(TeamMode::Grab);
        let s = summary(AuthorKind::Customer, false);
        assert_eq!(keys(&s, &t, "rep", 1000), vec!["grab"]);
        assert!(keys(&s, &t, "admin", 1000).is_empty());
        assert_eq!(keys(&s, &t, "rep", 6 * 60_000), vec!["grab", "overdue"]);
    }

    #[test]
    fn overdue_notifies_once_per_wait() {
        let t = team(TeamMode::Open);
        let s = summary(AuthorKind::Customer, true);
        let due = notifications_due(&s, &t, &"rep".into(), s.created_at.plus(5 * 60_000 + 1));
        assert_eq!(due.len(), 2);
        assert!(due[1].key.starts_with("overdue:c:"), "{:?}", due[1]);
        // The same wait keeps the same key, so it is shown once.
        let later = notifications_due(&s, &t, &"rep".into(), s.created_at.plus(9 * 60_000));
        assert_eq!(due[1].key, later[1].key);
    }
}
