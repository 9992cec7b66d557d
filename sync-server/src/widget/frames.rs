//! What the widget's socket carries, both ways. Out: every message of the conversation as the
//! customer should see it, whole (text with its line breaks, templates' filled text, files, video
//! call links) with the crew member's name. In: the customer's messages, bounded and validated.

use crewdesk::domain::{AgentId, Author, Message, MessageBody, MessageId, Timestamp};
use std::collections::HashMap;

#[derive(serde::Serialize, Debug)]
pub struct WidgetMessage {
    pub id: MessageId,
    pub at: Timestamp,
    pub from: &'static str,
    /// The crew member's name on crew messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The whole text, line breaks included (a file's name; "Join the video call" for a link).
    pub text: String,
    /// A conference invitation's link (shown as a Join button).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_url: Option<String>,
    /// A file: its sha256 (the widget downloads it with its session) and what it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<WidgetAttachment>,
}

#[derive(serde::Serialize, Debug)]
pub struct WidgetAttachment {
    pub blob: String,
    pub file_name: String,
    pub mime: String,
    pub size: u64,
}

/// The customer's view of a message; `None` for system messages and the crew's internal notes
/// (never shown to customers).
pub fn widget_message(m: &Message, crew_names: &HashMap<AgentId, String>, team_name: &str) -> Option<WidgetMessage> {
    let (from, name) = match &m.author {
        Author::Customer => ("customer", None),
        // Someone who has left the team since still wrote for it.
        Author::Crew { agent } => {
            ("crew", Some(crew_names.get(agent).cloned().unwrap_or_else(|| team_name.to_owned())))
        }
        Author::System => return None,
    };
    let (text, join_url, attachment) = match &m.body {
        MessageBody::Text { text }
        | MessageBody::Template { text, .. }
        | MessageBody::WhatsAppTemplate { text, .. } => (text.clone(), None, None),
        MessageBody::ConferenceInvitation { url } => ("Join the video call".to_owned(), Some(url.clone()), None),
        MessageBody::Attachment { file_name, mime, size, .. } => {
            let blob = m.body.blob()?.as_str().to_owned();
            let a = WidgetAttachment { blob, file_name: file_name.clone(), mime: mime.clone(), size: *size };
            (file_name.clone(), None, Some(a))
        }
        MessageBody::Note { .. } | MessageBody::Transfer { .. } => return None,
    };
    Some(WidgetMessage { id: m.id.clone(), at: m.at, from, name, text, join_url, attachment })
}

/// Messages per frame, so that a long history goes in several frames of bounded size.
pub const MESSAGES_PER_FRAME: usize = 50;

/// What a customer's browser may send.
#[derive(serde::Deserialize, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Incoming {
    /// A message; `ref` (the widget's own, at most 64 characters) comes back with its outcome.
    Message {
        text: String,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
    /// The customer is typing (the crew sees it for a few seconds).
    Typing,
}

/// Reads one frame from a browser, with an error the widget can show.
pub fn parse_incoming(text: &str) -> Result<Incoming, String> {
    let incoming: Incoming = serde_json::from_str(text)
        .map_err(|_| "expected {\"type\": \"message\", \"text\": \"...\"} or {\"type\": \"typing\"}".to_owned())?;
    match &incoming {
        Incoming::Message { reference: Some(r), .. } if r.chars().count() > 64 => {
            Err("a message's ref has at most 64 characters".to_owned())
        }
        _ => Ok(incoming),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crew_replies_arrive_whole_with_line_breaks_and_the_senders_name() {
        let long = format!("Hello Maya,\n\nhere is what happened:\n{}\n\n— Bob", "word ".repeat(200));
        let names = HashMap::from([(AgentId::from("bob"), "Bob Okafor".to_owned())]);
        let m = Message {
            id: MessageId("m1".into()),
            at: Timestamp(5),
            author: Author::Crew { agent: AgentId::from("bob") },
            body: MessageBody::Template { template: "t".into(), text: long.clone() },
        };
        let w = widget_message(&m, &names, "Sales").unwrap();
        assert_eq!(w.text, long, "not the list preview");
        assert_eq!(w.name.as_deref(), Some("Bob Okafor"));
        let gone = Message { author: Author::Crew { agent: AgentId::from("left") }, ..m };
        assert_eq!(widget_message(&gone, &names, "Sales").unwrap().name.as_deref(), Some("Sales"));
        let system = Message { author: Author::System, body: MessageBody::Text { text: "x".into() }, ..gone };
        assert!(widget_message(&system, &names, "Sales").is_none());
    }

    #[test]
    fn incoming_frames_are_checked() {
        assert_eq!(
            parse_incoming(r#"{"type":"message","text":"hi","ref":"c1"}"#),
            Ok(Incoming::Message { text: "hi".into(), reference: Some("c1".into()) })
        );
        assert!(parse_incoming(r#"{"text":"hi"}"#).is_err());
        assert!(parse_incoming(r#"{"type":"message","text":"hi","admin":true}"#).is_err());
        assert!(parse_incoming(&format!(r#"{{"type":"message","text":"hi","ref":"{}"}}"#, "x".repeat(65))).is_err());
        assert!(parse_incoming("not json").is_err());
    }
}
