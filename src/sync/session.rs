//! The replica side of a connection to the relay, sans IO: fed the wire messages the relay sends,
//! it applies them to the replica and returns the messages to send back. The relay only advertises
//! heads it has fsynced, so when its heads cover a local change the replica's outbox lets it go:
//! "synced" means "durable on the relay".

use super::wire::{PeerMetadata, WireMessage};
use crate::domain::ConversationId;
use crate::replica::{Applied, Replica, ReplicaError};
use automerge::sync;
use std::collections::{BTreeSet, HashMap};

/// Something the app should know about after a message from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The handshake completed.
    Connected { relay_peer: String },
    /// A conversation changed on this replica because of the relay.
    Changed(ConversationId),
    /// The relay does not have (or will not share) this conversation.
    Unavailable(ConversationId),
    /// The relay refused something; the message says what and why.
    RelayError(String),
    /// The relay could not serve this conversation just now (storage unreachable, a commit that
    /// failed): offer it again in a few seconds, not at once (no loop while the relay is unwell).
    RetryLater(ConversationId),
    /// Someone is typing in this conversation (the customer, or a teammate as the relay names them).
    Typing(ConversationId, super::presence::Typing),
}

pub struct ClientSession {
    peer_id: String,
    relay_peer: Option<String>,
    states: HashMap<ConversationId, sync::State>,
    /// Presence that arrived before its conversation did (the relay tells a new follower at once,
    /// the document takes a few sync rounds); applied when the conversation arrives.
    early_presence: HashMap<ConversationId, crate::domain::Presence>,
    /// Ephemeral messages sent on this connection (automerge-repo numbers them per session).
    ephemeral_count: u64,
}

impl ClientSession {
    /// A fresh session for one connection. Sync states start empty on every connection: reusing a
    /// stale state makes peers loop.
    pub fn new(peer_id: impl Into<String>) -> ClientSession {
        ClientSession {
            peer_id: peer_id.into(),
            relay_peer: None,
            states: HashMap::new(),
            early_presence: HashMap::new(),
            ephemeral_count: 0,
        }
    }

    pub fn join(&self) -> WireMessage {
        WireMessage::Join {
            sender_id: self.peer_id.clone(),
            peer_metadata: PeerMetadata { storage_id: None, is_ephemeral: true },
            supported_protocol_versions: vec!["1".into()],
        }
    }

    pub fn is_connected(&self) -> bool {
        self.relay_peer.is_some()
    }

    /// After the handshake: offer every conversation the replica holds and ask for those the relay
    /// listed that the replica lacks.
    pub fn start(
        &mut self,
        replica: &mut Replica,
        relay_documents: &[ConversationId],
    ) -> Result<Vec<WireMessage>, ReplicaError> {
        let mut out = Vec::new();
        for id in Self::to_offer(replica, relay_documents)? {
            out.extend(self.offer(replica, &id)?);
        }
        Ok(out)
    }

    /// What [`start`](Self::start) offers, in order: every conversation the replica holds and those
    /// the relay listed. A driver that must not hold the replica for the whole loop offers them
    /// one at a time with [`offer`](Self::offer).
    pub fn to_offer(
        replica: &Replica,
        relay_documents: &[ConversationId],
    ) -> Result<Vec<ConversationId>, ReplicaError> {
        let mut ids: BTreeSet<ConversationId> = replica.document_ids()?.into_iter().collect();
        ids.extend(relay_documents.iter().cloned());
        Ok(ids.into_iter().collect())
    }

    /// Tells the conversation's followers (teammates, the customer's widget) that this agent is
    /// typing in `id` (nothing while disconnected: typing is not worth keeping).
    pub fn typing(&mut self, agent: &crate::domain::AgentId, id: &ConversationId) -> Option<WireMessage> {
        let relay = self.relay_peer.clone()?;
        self.ephemeral_count += 1;
        Some(WireMessage::Ephemeral {
            sender_id: self.peer_id.clone(),
            target_id: relay,
            document_id: id.0.clone(),
            count: self.ephemeral_count,
            session_id: self.peer_id.clone(),
            data: super::presence::encode_typing(&super::presence::Typing::Crew(agent.clone())),
        })
    }

    /// What to send after a local change to `id` (nothing while disconnected).
    pub fn offer(&mut self, replica: &mut Replica, id: &ConversationId) -> Result<Option<WireMessage>, ReplicaError> {
        let Some(relay) = self.relay_peer.clone() else { return Ok(None) };
        let have = !replica.heads(id).unwrap_or_default().is_empty();
        let state = self.states.entry(id.clone()).or_default();
        let Some(m) = replica.generate_sync_message(id, state)? else { return Ok(None) };
        let (sender_id, target_id, document_id, data) = (self.peer_id.clone(), relay, id.0.clone(), m.encode());
        Ok(Some(if have {
            WireMessage::Sync { sender_id, target_id, document_id, data }
        } else {
            WireMessage::Request { sender_id, target_id, document_id, data }
        }))
    }

    /// Handles one message from the relay: returns what to send back and what happened.
    pub fn receive(
        &mut self,
        replica: &mut Replica,
        message: WireMessage,
    ) -> Result<(Vec<WireMessage>, Vec<SessionEvent>), ReplicaError> {
        let mut out = Vec::new();
        let mut events = Vec::new();
        match message {
            WireMessage::Peer { sender_id, .. } => {
                self.relay_peer = Some(sender_id.clone());
                events.push(SessionEvent::Connected { relay_peer: sender_id });
            }
            WireMessage::Sync { document_id, data, .. } | WireMessage::Request { document_id, data, .. } => {
                let id = ConversationId(document_id);
                let message = match sync::Message::decode(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        events.push(SessionEvent::RelayError(format!("malformed sync message for {id}: {e}")));
                        return Ok((out, events));
                    }
                };
                let state = self.states.entry(id.clone()).or_default();
                match replica.receive_sync_message(&id, state, message) {
                    Ok(Applied::Stored { .. }) => {
                        if replica.summary(&id).is_some()
                            && let Some(p) = self.early_presence.remove(&id)
                        {
                            replica.set_presence(&id, p)?;
                        }
                        events.push(SessionEvent::Changed(id.clone()))
                    }
                    Ok(Applied::NothingNew) => {}
                    Err(e) => {
                        // Start this conversation's sync over; the relay resends what we lack.
                        *state = sync::State::new();
                        events.push(SessionEvent::RelayError(format!("conversation {id}: {e}")));
                    }
                }
                if let Some(theirs) = self.states.get(&id).and_then(|s| s.their_heads.clone()) {
                    replica.confirm_synced(&id, &theirs)?;
                    // In sync with the relay: messages a refusal took back are sent again now,
                    // judged against the conversation as the relay has it.
                    if replica.has_undelivered_to_retry(&id) {
                        let mut ours = replica.heads(&id)?;
                        ours.sort();
                        let mut theirs = theirs;
                        theirs.sort();
                        if ours == theirs && replica.retry_undelivered(&id)? {
                            events.push(SessionEvent::Changed(id.clone()));
                        }
                    }
                }
                out.extend(self.offer(replica, &id)?);
            }
            WireMessage::DocUnavailable { document_id, .. } => {
                let id = ConversationId(document_id);
                self.states.remove(&id);
                // Whatever this replica wrote there cannot reach anyone: shown as not delivered
                // instead of waiting for ever.
                if replica.abandon_unsynced(&id, "the relay does not share this conversation with you")? > 0 {
                    events.push(SessionEvent::Changed(id.clone()));
                }
                events.push(SessionEvent::Unavailable(id));
            }
            WireMessage::Error { message, .. } => {
                // "document <id>: <why>": about one conversation. The relay dropped what it had of
                // this exchange, so the sync of that conversation starts over (what it did not
                // store is sent again). A refusal ("<rule>; refused (change <hash>)") first takes
                // the refused change, and what depends on it, back out of the replica; then the
                // rest goes at once (the refused change is gone: no loop). Other errors are
                // transient on the relay's side: offered again a little later.
                if let Some((id, reason)) = message.strip_prefix("document ").and_then(|m| m.split_once(": ")) {
                    let id = ConversationId(id.to_owned());
                    let known = self.states.remove(&id).is_some();
                    if let Some((rule, hash)) = refused_change(reason) {
                        replica.note_refusal(&id, rule);
                        if replica.take_back_refused(&id, hash, rule)? > 0 {
                            events.push(SessionEvent::Changed(id.clone()));
                        }
                        if known {
                            out.extend(self.offer(replica, &id)?);
                        }
                    } else if known {
                        events.push(SessionEvent::RetryLater(id.clone()));
                    }
                }
                events.push(SessionEvent::RelayError(message))
            }
            WireMessage::Ephemeral { document_id, data, .. } => {
                let id = ConversationId(document_id);
                if let Some(t) = super::presence::decode_typing(&data) {
                    if replica.summary(&id).is_some() && t != super::presence::Typing::Crew(replica.agent().clone()) {
                        events.push(SessionEvent::Typing(id, t));
                    }
                } else if let Some(p) = super::presence::decode(&data) {
                    if replica.summary(&id).is_some() {
                        replica.set_presence(&id, p)?;
                        events.push(SessionEvent::Changed(id));
                    } else if self.states.contains_key(&id) {
                        // Only for conversations this session is syncing: nothing else is kept.
                        self.early_presence.insert(id, p);
                    }
                }
            }
            WireMessage::Join { .. } | WireMessage::Other { .. } => {}
        }
        Ok((out, events))
    }
}

/// "<rule>; refused (change <hash>)": the rule and the refused change.
fn refused_change(reason: &str) -> Option<(&str, automerge::ChangeHash)> {
    let (rule, rest) = reason.rsplit_once("; refused (change ")?;
    let hash = rest.strip_suffix(')')?.parse().ok()?;
    Some((rule, hash))
}
