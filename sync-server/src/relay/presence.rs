//! Customers' presence and ephemeral messages (never stored), with their rate limits.

#[allow(unused_imports)]
use super::*;

/// Ephemeral messages (presence and the like) are small; larger ones are refused.
pub(super) const MAX_EPHEMERAL_BYTES: usize = 4 * 1024;

/// Each connection may send this many ephemeral messages a second (with a burst of
/// `EPHEMERAL_BURST`); the rest are dropped, so one client cannot flood everyone following a
/// conversation (whose queues would overflow and get them disconnected).
pub(super) const EPHEMERAL_PER_SECOND: f64 = 20.0;

pub(super) const EPHEMERAL_BURST: f64 = 50.0;

/// A token bucket for one connection's ephemeral messages.
pub(super) struct EphemeralBudget {
    pub(super) tokens: f64,
    pub(super) at: Instant,
    /// When the sender was last told that messages were dropped (at most once a second).
    pub(super) told: Option<Instant>,
}

pub(super) enum Budget {
    Granted,
    Refused { tell: bool },
}

impl EphemeralBudget {
    pub(super) fn new(now: Instant) -> EphemeralBudget {
        EphemeralBudget { tokens: EPHEMERAL_BURST, at: now, told: None }
    }

    pub(super) fn take(&mut self, now: Instant) -> Budget {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * EPHEMERAL_PER_SECOND).min(EPHEMERAL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Budget::Granted;
        }
        let tell = self.told.is_none_or(|t| now.saturating_duration_since(t) >= std::time::Duration::from_secs(1));
        if tell {
            self.told = Some(now);
        }
        Budget::Refused { tell }
    }
}

/// Passes an ephemeral message to a document's followers here (but not back to `except`).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_ephemeral(
    sessions: &Mutex<HashMap<ConnId, Session>>,
    e: &DocEntry,
    except: Option<ConnId>,
    sender_id: &str,
    doc_id: &str,
    count: u64,
    session_id: &str,
    data: &[u8],
) {
    let sessions = sessions.lock().unwrap_or_else(|p| p.into_inner());
    for (conn, peer_id) in e.core.followers() {
        if Some(conn) != except
            && let Some(s) = sessions.get(&conn)
        {
            s.send(WireMessage::Ephemeral {
                sender_id: sender_id.to_owned(),
                target_id: peer_id.to_owned(),
                document_id: doc_id.to_owned(),
                count,
                session_id: session_id.to_owned(),
                data: data.to_vec(),
            });
        }
    }
}

impl Relay {
    pub(super) async fn handle_ephemeral(
        &self,
        session: &Session,
        doc_id: String,
        count: u64,
        session_id: String,
        data: Vec<u8>,
    ) {
        // Only conversations someone follows here: an ephemeral message never creates an entry.
        let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&doc_id).cloned();
        let Some(entry) = entry else { return };
        let e = entry.lock().await;
        let Some(team) = e.core.team() else { return };
        if session.agent.role_in(team).is_none() {
            return;
        }
        // Who is typing is the relay's to say (the agent of this connection), never the client's.
        if crewdesk::sync::presence::decode_typing(&data).is_some() {
            let agent = (session.agent.id.clone(), session.agent.name.clone());
            drop(e);
            self.tell_instances(crate::store::StoreEvent::Typing { doc_id: doc_id.clone(), crew: Some(agent.clone()) })
                .await;
            self.show_typing(&doc_id, Some(agent), Some(session.conn)).await;
            return;
        }
        forward_ephemeral(&self.sessions, &e, Some(session.conn), &session.peer_id, &doc_id, count, &session_id, &data);
        drop(e);
        let sender_id = session.peer_id.clone();
        self.tell_instances(crate::store::StoreEvent::Ephemeral { doc_id, sender_id, count, session_id, data }).await;
    }

    /// A web-widget customer is typing: every follower of the conversation hears it, on every
    /// instance.
    pub(crate) async fn customer_typing(&self, doc_id: &str) {
        self.tell_instances(crate::store::StoreEvent::Typing { doc_id: doc_id.to_owned(), crew: None }).await;
        self.show_typing(doc_id, None, None).await;
    }

    /// Someone is typing in `doc_id` (the customer, or the agent `crew` names): the followers here
    /// (but `except`) hear it, and when it is an agent the customer's widget sockets here show the
    /// agent's name.
    pub(super) async fn show_typing(
        &self,
        doc_id: &str,
        crew: Option<(crewdesk::domain::AgentId, String)>,
        except: Option<ConnId>,
    ) {
        use crewdesk::sync::presence::{Typing, encode_typing};
        let typing = match crew {
            Some((agent, name)) => {
                self.widgets.crew_typing(doc_id, &name, Instant::now());
                Typing::Crew(agent)
            }
            None => Typing::Customer,
        };
        let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(doc_id).cloned();
        let Some(entry) = entry else { return };
        let e = entry.lock().await;
        let count = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let data = encode_typing(&typing);
        forward_ephemeral(&self.sessions, &e, except, &self.peer_id, doc_id, count, &self.storage_id, &data);
    }

    pub(crate) fn presence_of(&self, doc_id: &str) -> Option<crewdesk::domain::Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).get(doc_id).cloned()
    }

    pub(super) fn presence_message(&self, doc_id: &str, target: &str, p: &crewdesk::domain::Presence) -> WireMessage {
        let count = self.next_conn.fetch_add(1, Ordering::Relaxed);
        WireMessage::Ephemeral {
            sender_id: self.peer_id.clone(),
            target_id: target.to_owned(),
            document_id: doc_id.to_owned(),
            count,
            session_id: self.storage_id.clone(),
            data: crewdesk::sync::presence::encode(p),
        }
    }

    /// Records a web-widget customer's presence and tells every follower of the conversation.
    pub(crate) async fn set_presence(&self, doc_id: &str, p: crewdesk::domain::Presence) {
        self.tell_instances(crate::store::StoreEvent::Presence { doc_id: doc_id.to_owned(), presence: p.clone() })
            .await;
        self.show_presence(doc_id, p).await;
    }

    /// Records a customer's presence here and tells this instance's followers of the conversation.
    pub(super) async fn show_presence(&self, doc_id: &str, p: crewdesk::domain::Presence) {
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).insert(doc_id.to_owned(), p.clone());
        let entry = self.entry(doc_id);
        let e = entry.lock().await;
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for (conn, peer_id) in e.core.followers() {
            if let Some(s) = sessions.get(&conn) {
                s.send(self.presence_message(doc_id, peer_id, &p));
            }
        }
    }
}
