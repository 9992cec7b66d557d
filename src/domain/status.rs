//! The status rules of the red block: waiting, Soon to be, Overdue, Rep Needed, Pending, Online,
//! Closed (by hand or after 24 h without a customer message; a new customer message reopens).

use super::{AgentId, AuthorKind, Channel, ConversationId, Customer, Presence, Team, TeamId, Timestamp};
use serde::{Deserialize, Serialize};

/// The last message of a conversation as the list shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePreview {
    pub at: Timestamp,
    pub author: AuthorKind,
    pub text: String,
}

/// One row of the conversation index: everything the list, the filters and the counts need, so
/// that they never load an automerge document. Derived only from the conversation document (and,
/// for `presence`, from the relay's ephemeral reports), so every replica derives the same row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub id: ConversationId,
    pub team: TeamId,
    pub channel: Channel,
    pub customer: Customer,
    pub created_at: Timestamp,
    pub last_message: Option<MessagePreview>,
    pub last_customer_message_at: Option<Timestamp>,
    pub last_crew_message_at: Option<Timestamp>,
    /// Time of the oldest customer message after the last crew reply; `None` when nobody waits.
    pub waiting_since: Option<Timestamp>,
    /// Agents currently in the room, sorted.
    pub crew_in_room: Vec<AgentId>,
    /// When someone pressed CLOSE last; closes the conversation until a later customer message.
    pub closed_at: Option<Timestamp>,
    /// The representative who won the grab (grab-mode teams), as recorded by the relay.
    pub owner: Option<AgentId>,
    /// Representatives who asked to grab, sorted; the relay picks the winner.
    pub grab_requests: Vec<AgentId>,
    pub message_count: u32,
    #[serde(default)]
    pub presence: Presence,
    /// The latest hand-over (↪): who handed the conversation to whom, and when.
    #[serde(default)]
    pub handover: Option<Handover>,
}

/// A conversation handed from one agent to another (see [`super::MessageBody::Transfer`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub from: AgentId,
    pub to: AgentId,
    pub at: Timestamp,
}

impl ConversationSummary {
    /// The time of the newest activity: last message, or creation.
    pub fn last_activity(&self) -> Timestamp {
        self.last_message.as_ref().map_or(self.created_at, |m| m.at)
    }
    pub fn is_in_room(&self, agent: &AgentId) -> bool {
        self.crew_in_room.binary_search(agent).is_ok()
    }
}

/// Why a conversation is closed, if it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Closure {
    /// Someone pressed CLOSE and the customer has not written since.
    Manual,
    /// No customer message for longer than the team's auto-close threshold.
    Automatic,
}

/// Closed by hand (and no customer message since), or silent longer than auto-close.
pub fn closure(s: &ConversationSummary, team: &Team, now: Timestamp) -> Option<Closure> {
    if let Some(closed_at) = s.closed_at
        && s.last_customer_message_at.is_none_or(|m| m <= closed_at)
    {
        return Some(Closure::Manual);
    }
    let last_customer = s.last_customer_message_at.unwrap_or(s.created_at);
    (now.since(last_customer) > team.thresholds.auto_close).then_some(Closure::Automatic)
}

pub fn is_closed(s: &ConversationSummary, team: &Team, now: Timestamp) -> bool {
    closure(s, team, now).is_some()
}

/// How long the customer has been waiting for a reply, in milliseconds, if they are waiting and
/// the conversation is open.
pub fn waiting_for(s: &ConversationSummary, team: &Team, now: Timestamp) -> Option<i64> {
    if is_closed(s, team, now) {
        return None;
    }
    s.waiting_since.map(|w| now.since(w).max(0))
}

/// Crew of this team in the room (agents who left the team no longer count).
pub fn crew_present(s: &ConversationSummary, team: &Team) -> usize {
    s.crew_in_room.iter().filter(|a| team.member(a).is_some()).count()
}

/// The status filters of the red block. They are predicates, not exclusive states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Overdue,
    SoonToBe,
    RepNeeded,
    Pending,
    Closed,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Online, Status::Overdue, Status::SoonToBe, Status::RepNeeded, Status::Pending, Status::Closed];

    pub fn label(self) -> &'static str {
        match self {
            Status::Online => "Online",
            Status::Overdue => "Overdue",
            Status::SoonToBe => "Soon to be",
            Status::RepNeeded => "Rep Needed",
            Status::Pending => "Pending",
            Status::Closed => "Closed",
        }
    }

    /// Does the conversation have this status at `now`?
    pub fn holds(self, s: &ConversationSummary, team: &Team, now: Timestamp) -> bool {
        Statuses::of(s, team, now).contains(self)
    }

    /// Every status that holds, in display order (the list's badges).
    pub fn badges(s: &ConversationSummary, team: &Team, now: Timestamp) -> Vec<Status> {
        let set = Statuses::of(s, team, now);
        Status::ALL.into_iter().filter(|st| set.contains(*st)).collect()
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Every status a conversation has at `now`: the status rules, evaluated in one place, reading the
/// closure, the waiting time and the crew present once each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statuses(u8);

impl Statuses {
    pub fn of(s: &ConversationSummary, team: &Team, now: Timestamp) -> Statuses {
        if is_closed(s, team, now) {
            return Statuses(Status::Closed.bit());
        }
        let t = &team.thresholds;
        let mut set = 0;
        if s.channel == Channel::WebWidget && s.presence.online {
            set |= Status::Online.bit();
        }
        if let Some(waiting) = s.waiting_since.map(|w| now.since(w).max(0)) {
            if waiting > t.overdue {
                set |= Status::Overdue.bit();
            } else if waiting > t.soon_to_be {
                set |= Status::SoonToBe.bit();
            }
            // Whether any crew of the team is present (not how many: the first one decides).
            let present = s.crew_in_room.iter().any(|a| team.member(a).is_some());
            set |= if present { Status::Pending.bit() } else { Status::RepNeeded.bit() };
        }
        Statuses(set)
    }

    pub fn contains(self, status: Status) -> bool {
        self.0 & status.bit() != 0
    }
}

/// WhatsApp's customer-service window: free-form replies only within 24 h of the customer's last
/// message on WhatsApp. `None` for other channels (no window applies).
pub fn whatsapp_window_open(s: &ConversationSummary, now: Timestamp) -> Option<bool> {
    (s.channel == Channel::WhatsApp).then(|| whatsapp_window_open_since(s.last_customer_message_at, now))
}

/// The window itself, from the time of the customer's last WhatsApp message (none: closed).
pub fn whatsapp_window_open_since(last_customer_message_at: Option<Timestamp>, now: Timestamp) -> bool {
    last_customer_message_at.is_some_and(|m| now.since(m) < WHATSAPP_WINDOW)
}

pub const WHATSAPP_WINDOW: i64 = 24 * Timestamp::HOUR;

/// "Customer is offline. Email fallback activated": a web-widget customer who is offline and has
/// an email address receives crew messages by email.
pub fn email_fallback_active(s: &ConversationSummary) -> bool {
    email_fallback_applies(s.channel, s.presence.online, s.customer.email.as_deref())
}

/// The same rule from its parts (the relay has the customer's presence, not a summary).
pub fn email_fallback_applies(channel: Channel, customer_online: bool, email: Option<&str>) -> bool {
    channel == Channel::WebWidget && !customer_online && email.is_some_and(|e| !e.trim().is_empty())
}
