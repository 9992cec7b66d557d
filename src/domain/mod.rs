//! The product's vocabulary and rules: teams, members, customers, conversations, messages, and the
//! pure functions that decide statuses, access and filters. No IO here; this module builds for wasm.

pub mod access;
pub mod attachment;
pub mod filter;
pub mod status;
mod templates;

pub use templates::*;

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

id_type!(
    /// A team (open or grab mode) that owns conversations.
    TeamId
);
id_type!(
    /// A crew member (representative or admin) signed in to a replica.
    AgentId
);
id_type!(
    /// A customer, across channels.
    CustomerId
);
id_type!(
    /// One conversation with one customer; also the id of its automerge document.
    ConversationId
);
id_type!(
    /// One message; unique within a conversation, chosen by whoever writes it.
    MessageId
);

/// Milliseconds since the Unix epoch. Every rule takes `now` explicitly so tests can pin the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const SECOND: i64 = 1_000;
    pub const MINUTE: i64 = 60 * Self::SECOND;
    pub const HOUR: i64 = 60 * Self::MINUTE;

    pub fn millis(self) -> i64 {
        self.0
    }
    /// Milliseconds from `earlier` to `self` (negative when `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> i64 {
        self.0 - earlier.0
    }
    pub fn plus(self, millis: i64) -> Timestamp {
        Timestamp(self.0 + millis)
    }
    /// The wall clock. Only the edges (app, relay, demo) call this; rules take `now` as input.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Where a customer reaches the team.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    WebWidget,
    WhatsApp,
    Email,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::WebWidget, Channel::WhatsApp, Channel::Email];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::WebWidget => "web_widget",
            Channel::WhatsApp => "whats_app",
            Channel::Email => "email",
        }
    }
    pub fn parse(value: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == value)
    }
    pub fn label(self) -> &'static str {
        match self {
            Channel::WebWidget => "Web Widget",
            Channel::WhatsApp => "WhatsApp",
            Channel::Email => "Email",
        }
    }
}

/// How representatives of a team take conversations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeamMode {
    /// Any member joins with JOIN.
    Open,
    /// The first representative to grab a conversation handles it; the relay decides who was first.
    Grab,
}

/// A member's role in one team. A person can hold different roles in different teams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Representative,
    Admin,
}

/// Per-team time limits, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Waiting longer than this is "Soon to be" (default 3 min).
    pub soon_to_be: i64,
    /// Waiting longer than this is "Overdue" (default 5 min).
    pub overdue: i64,
    /// No customer message for longer than this closes the conversation (default 24 h).
    pub auto_close: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            soon_to_be: 3 * Timestamp::MINUTE,
            overdue: 5 * Timestamp::MINUTE,
            auto_close: 24 * Timestamp::HOUR,
        }
    }
}

impl Thresholds {
    /// Thresholds must grow: soon-to-be before overdue before auto-close, all positive.
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.soon_to_be > 0 && self.soon_to_be < self.overdue && self.overdue < self.auto_close {
            Ok(())
        } else {
            Err(DomainError::InvalidThresholds)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub agent: AgentId,
    pub name: String,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    pub mode: TeamMode,
    pub thresholds: Thresholds,
    pub members: Vec<Member>,
    #[serde(default)]
    pub templates: Vec<MessageTemplate>,
    #[serde(default)]
    pub whatsapp_templates: Vec<WhatsAppTemplate>,
    /// Where 📹 meeting links point (a Jitsi Meet style server); `None` uses `DEFAULT_CONFERENCE_BASE`.
    #[serde(default)]
    pub conference_base: Option<String>,
}

/// The public Jitsi Meet server: a meeting exists as soon as someone opens its URL.
pub const DEFAULT_CONFERENCE_BASE: &str = "https://meet.jit.si/";

/// Checks a conference provider base: an http(s) URL without query or fragment.
pub fn validate_conference_base(base: &str) -> Result<(), DomainError> {
    let rest = base.strip_prefix("https://").or_else(|| base.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') && !base.contains(['?', '#', ' ']) => Ok(()),
        _ => Err(DomainError::InvalidConferenceUrl),
    }
}

/// 📹 an unguessable meeting URL on the team's provider; `room` is random (128 bits).
pub fn conference_url(team: &Team, room: &str) -> String {
    let base = team
        .conference_base
        .as_deref()
        .filter(|b| validate_conference_base(b).is_ok())
        .unwrap_or(DEFAULT_CONFERENCE_BASE);
    format!("{}/crewdesk-{room}", base.trim_end_matches('/'))
}

impl Team {
    pub fn member(&self, agent: &AgentId) -> Option<&Member> {
        self.members.iter().find(|m| &m.agent == agent)
    }
    pub fn role_of(&self, agent: &AgentId) -> Option<Role> {
        self.member(agent).map(|m| m.role)
    }
}

/// A customer's details as the crew edits them (📄).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    pub name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub notes: Option<String>,
}

/// A change to customer details; `None` leaves a field as it is, `Some("")` clears it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEdit {
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub notes: Option<String>,
}

impl CustomerEdit {
    /// Checks the edit before it is written: names are not blank, emails look like emails.
    pub fn validate(&self) -> Result<(), DomainError> {
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(DomainError::InvalidCustomer("the name cannot be empty".to_owned()));
        }
        if let Some(email) = &self.email {
            let e = email.trim();
            if !e.is_empty() && !looks_like_email(e) {
                return Err(DomainError::InvalidCustomer("the email address is not valid".to_owned()));
            }
        }
        if let Some(phone) = &self.phone {
            let p = phone.trim();
            if !p.is_empty() && !p.chars().all(|c| c.is_ascii_digit() || " +-()".contains(c)) {
                return Err(DomainError::InvalidCustomer(
                    "the phone number may hold digits, spaces, + - ( ) only".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

fn looks_like_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !e.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// Web-widget presence: ephemeral, reported by the relay, never part of conversation history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub online: bool,
    pub last_active: Option<Timestamp>,
    pub location: Option<String>,
}

/// Who wrote a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Author {
    Customer,
    Crew { agent: AgentId },
    System,
}

impl Author {
    pub fn kind(&self) -> AuthorKind {
        match self {
            Author::Customer => AuthorKind::Customer,
            Author::Crew { .. } => AuthorKind::Crew,
            Author::System => AuthorKind::System,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorKind {
    Customer,
    Crew,
    System,
}

impl AuthorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorKind::Customer => "customer",
            AuthorKind::Crew => "crew",
            AuthorKind::System => "system",
        }
    }
    pub fn parse(value: &str) -> Option<AuthorKind> {
        [AuthorKind::Customer, AuthorKind::Crew, AuthorKind::System].into_iter().find(|k| k.as_str() == value)
    }
}

/// What a message carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MessageBody {
    Text {
        text: String,
    },
    /// A message template (📃) with its placeholders already filled in.
    Template {
        template: String,
        text: String,
    },
    /// An approved WhatsApp template (💬) with its parameters.
    WhatsAppTemplate {
        template: String,
        language: String,
        params: Vec<String>,
        text: String,
    },
    /// A file (📎) in the relay's blob store, referenced by content hash.
    Attachment {
        blob: String,
        file_name: String,
        mime: String,
        size: u64,
    },
    /// A conference invitation (📹).
    ConferenceInvitation {
        url: String,
    },
    /// An internal note (📝): for the crew only. No channel ever sends it to the customer
    /// ([`Message::reaches_customer`]), and it does not count as an answer to a waiting customer.
    Note {
        text: String,
    },
    /// A hand-over (↪): the author handed the conversation to a colleague of the team, who is put
    /// in the room by the same change (and, in a grab-mode team, becomes its representative).
    /// For the crew only, like a note.
    Transfer {
        to: AgentId,
    },
}

impl MessageBody {
    /// The one-line text shown in the conversation list.
    pub fn preview(&self) -> String {
        let text = match self {
            MessageBody::Text { text }
            | MessageBody::Template { text, .. }
            | MessageBody::WhatsAppTemplate { text, .. } => text.clone(),
            MessageBody::Attachment { file_name, .. } => format!("📎 {file_name}"),
            MessageBody::ConferenceInvitation { .. } => "📹 Conference invitation".to_owned(),
            MessageBody::Note { text } => format!("📝 {text}"),
            MessageBody::Transfer { to } => format!("↪ Handed over to {to}"),
        };
        let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut out: String = line.chars().take(PREVIEW_CHARS).collect();
        if line.chars().count() > PREVIEW_CHARS {
            out.push('…');
        }
        out
    }

    /// The whole text a person reads in this message (search, email).
    pub fn text_content(&self) -> String {
        match self {
            MessageBody::Text { text }
            | MessageBody::Template { text, .. }
            | MessageBody::WhatsAppTemplate { text, .. } => text.clone(),
            MessageBody::Attachment { file_name, .. } => format!("📎 {file_name}"),
            MessageBody::ConferenceInvitation { url } => format!("📹 Join the video call: {url}"),
            MessageBody::Note { text } => text.clone(),
            MessageBody::Transfer { to } => format!("↪ handed over to {to}"),
        }
    }

    /// Message bodies are checked before they are written, by whoever writes them (replica,
    /// relay, gateways): nothing empty, nothing absurdly large, files named only by a well-formed
    /// content address, links only to http(s) addresses.
    pub fn validate(&self) -> Result<(), DomainError> {
        let too_long = || DomainError::MessageTooLong { max: MAX_MESSAGE_BYTES };
        let text_len = match self {
            MessageBody::Text { text } | MessageBody::Note { text } => {
                if text.trim().is_empty() {
                    return Err(DomainError::EmptyMessage);
                }
                text.len()
            }
            MessageBody::Template { template, text } => {
                if text.trim().is_empty() {
                    return Err(DomainError::EmptyMessage);
                }
                if template.len() > MAX_NAME_BYTES {
                    return Err(too_long());
                }
                text.len()
            }
            MessageBody::WhatsAppTemplate { template, language, params, text } => {
                if template.trim().is_empty() {
                    return Err(DomainError::EmptyMessage);
                }
                if template.len() > MAX_NAME_BYTES
                    || language.len() > MAX_NAME_BYTES
                    || params.len() > MAX_TEMPLATE_PARAMS
                {
                    return Err(too_long());
                }
                text.len() + params.iter().map(String::len).sum::<usize>()
            }
            MessageBody::Attachment { blob, file_name, mime, size: _ } => {
                attachment::BlobHash::from_reference(blob)?;
                if file_name.trim().is_empty() {
                    return Err(DomainError::EmptyMessage);
                }
                if file_name.len() > MAX_NAME_BYTES
                    || file_name.chars().any(|c| c.is_control() || c == '/' || c == '\\')
                {
                    return Err(DomainError::InvalidAttachment("the file name".into()));
                }
                let mime_ok = mime.len() <= MAX_NAME_BYTES
                    && mime.split_once('/').is_some_and(|(a, b)| {
                        let token = |t: &str| {
                            !t.is_empty() && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&c))
                        };
                        token(a) && token(b)
                    });
                if !mime_ok {
                    return Err(DomainError::InvalidAttachment("the file type".into()));
                }
                file_name.len()
            }
            MessageBody::ConferenceInvitation { url } => {
                if !is_web_url(url) {
                    return Err(DomainError::InvalidConferenceUrl);
                }
                url.len()
            }
            MessageBody::Transfer { to } => {
                if to.as_str().trim().is_empty() || to.as_str().len() > MAX_NAME_BYTES {
                    return Err(DomainError::InvalidTransfer("name a colleague".into()));
                }
                to.as_str().len()
            }
        };
        if text_len > MAX_MESSAGE_BYTES {
            return Err(too_long());
        }
        Ok(())
    }

    /// The file an attachment names (`None` for other messages, and for a malformed reference,
    /// which [`MessageBody::validate`] refuses).
    pub fn blob(&self) -> Option<attachment::BlobHash> {
        match self {
            MessageBody::Attachment { blob, .. } => attachment::BlobHash::from_reference(blob).ok(),
            _ => None,
        }
    }

    /// True for what WhatsApp calls a free-form message (anything but an approved template).
    pub fn is_free_form(&self) -> bool {
        !matches!(self, MessageBody::WhatsAppTemplate { .. })
    }

    /// For the crew only (an internal note, a hand-over): never sent to the customer.
    pub fn is_internal(&self) -> bool {
        matches!(self, MessageBody::Note { .. } | MessageBody::Transfer { .. })
    }

    /// The colleague a hand-over names.
    pub fn handed_to(&self) -> Option<&AgentId> {
        match self {
            MessageBody::Transfer { to } => Some(to),
            _ => None,
        }
    }
}

pub const PREVIEW_CHARS: usize = 120;
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Names in a message (template, language, file name, file type).
pub const MAX_NAME_BYTES: usize = 255;
pub const MAX_TEMPLATE_PARAMS: usize = 20;

/// An absolute http(s) address with a host and nothing a browser would read differently (no
/// spaces, control characters, quotes or angle brackets), at most 2,048 bytes.
pub fn is_web_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    url.len() <= 2048
        && !host.is_empty()
        && !host.starts_with('@')
        && !url.chars().any(|c| c.is_control() || c.is_whitespace() || "\"'<>\\`".contains(c))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub at: Timestamp,
    pub author: Author,
    pub body: MessageBody,
}

impl Message {
    /// Messages order by (sent time, id) on every replica.
    pub fn order_key(&self) -> (Timestamp, &MessageId) {
        (self.at, &self.id)
    }

    /// A crew message meant for the customer: what the channels (web widget, email, WhatsApp)
    /// deliver and what answers a waiting customer. Internal notes never are.
    pub fn reaches_customer(&self) -> bool {
        matches!(self.author, Author::Crew { .. }) && !self.body.is_internal()
    }
}

/// Why a rule refused an action. Every message says what happened and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DomainError {
    #[error("you are not a member of this conversation's team")]
    NotAMember,
    #[error("join the conversation first")]
    NotInRoom,
    #[error("you are already in this conversation")]
    AlreadyInRoom,
    #[error("another representative handles this conversation")]
    HandledByAnother,
    #[error("admins join from the list; grabbing is for representatives")]
    AdminsDoNotGrab,
    #[error("this team is in open mode: use JOIN")]
    NotGrabMode,
    #[error("this is a grab-mode conversation: grab it from Notifications")]
    GrabRequired,
    #[error("you have already asked to grab this conversation; waiting for confirmation")]
    GrabAlreadyRequested,
    #[error("the conversation is closed; it reopens when the customer writes again")]
    Closed,
    #[error(
        "the last WhatsApp message from the customer is more than 24 hours old: only an approved WhatsApp template can be sent"
    )]
    WhatsAppWindowClosed,
    #[error("WhatsApp templates can only be sent in WhatsApp conversations")]
    WhatsAppTemplateOutsideWhatsApp,
    #[error("the message is empty")]
    EmptyMessage,
    #[error("the message is too long (at most {max} bytes)")]
    MessageTooLong { max: usize },
    #[error("a conference link must be an http(s) URL")]
    InvalidConferenceUrl,
    #[error("a file must be named by its content address (sha256: and 64 lowercase hex digits)")]
    InvalidFileReference,
    #[error("the attachment is malformed: {0}")]
    InvalidAttachment(String),
    #[error("the template needs {expected} parameters, {given} were given")]
    TemplateParams { expected: usize, given: usize },
    #[error("conversations on {0} start when the customer writes")]
    OpenedByTheCustomer(String),
    #[error("invalid customer details: {0}")]
    InvalidCustomer(String),
    #[error("invalid template: {0}")]
    InvalidTemplate(String),
    #[error("thresholds must satisfy 0 < soon-to-be < overdue < auto-close")]
    InvalidThresholds,
    #[error("this conversation cannot be handed over: {0}")]
    InvalidTransfer(String),
}

#[cfg(test)]
mod tests;
