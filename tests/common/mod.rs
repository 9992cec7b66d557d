//! Helpers shared by the replica tests: replicas on demo teams in temp directories.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use crewdesk::demo;
use crewdesk::domain::{
    AgentId, Author, Channel, ConversationId, Customer, CustomerId, Message, MessageBody, MessageId, TeamId, Timestamp,
};
use crewdesk::replica::Replica;
use crewdesk::replica::doc::NewConversation;
use std::path::{Path, PathBuf};

pub const T0: Timestamp = Timestamp(1_800_000_000_000);

pub fn open(dir: &Path, agent: &str) -> Replica {
    let mut r = Replica::open(db_path(dir, agent), AgentId::from(agent)).expect("open replica");
    for team in demo::teams() {
        r.put_team(team).expect("put team");
    }
    r
}

pub fn db_path(dir: &Path, agent: &str) -> PathBuf {
    dir.join(format!("{agent}.sqlite3"))
}

pub fn new_conversation(id: &str, team: &str, channel: Channel) -> NewConversation {
    NewConversation {
        id: ConversationId::from(id),
        team: TeamId::from(team),
        channel,
        customer: Customer {
            id: CustomerId(format!("cust-{id}")),
            name: format!("Customer {id}"),
            email: Some(format!("{id}@example.com")),
            phone: None,
            notes: None,
        },
        created_at: T0,
    }
}

pub fn customer_message(id: &str, at: Timestamp, text: &str) -> Message {
    Message { id: MessageId::from(id), at, author: Author::Customer, body: MessageBody::Text { text: text.into() } }
}

pub fn text(t: &str) -> MessageBody {
    MessageBody::Text { text: t.into() }
}

/// Copies every change `from` has into `to` (both directions make them equal).
pub fn push(from: &mut Replica, to: &mut Replica) {
    for id in from.document_ids().expect("ids") {
        let bytes = from.changes_since(&id, &[]).expect("changes");
        to.apply_changes(&id, &bytes).expect("apply");
    }
}
