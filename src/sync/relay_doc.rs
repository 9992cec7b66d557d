//! The relay's sync logic for one document, sans IO. The relay (`sync-server`) feeds it what a
//! connection sent and what storage answered, and carries out the [`Action`]s it returns: frames
//! to send, chunks to commit, a fan-out to schedule. The simulator (`tests/sim`) drives the same
//! code step by step with a seeded scheduler.
//!
//! The rules it keeps:
//! - every client change is judged on its own, in causal order (`replica::conversation`), before
//!   it is in the document;
//! - a change whose dependencies have not arrived waits in its sender's queue (bounded) and is
//!   judged when they arrive: the sender's automerge counts it as sent and never sends it again;
//! - nothing is advertised before it is durable: while a commit of this document is in progress no
//!   sync message is generated, and the fan-out after the last commit tells every follower;
//! - a conversation being created is visible to nobody until its first changes are judged as the
//!   creation of a conversation and stored.

use super::wire::WireMessage;
use crate::domain::{Message, TeamId, Timestamp};
use crate::replica::conversation::{self, ChangeAuthor, Verdict};
use crate::replica::doc;
use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A connection, as the relay numbers them.
pub type ConnId = u64;

/// Changes one connection may have waiting for their dependencies in one document. An honest
/// client has a handful at most (a bloom filter's false positive, a move between relay instances).
pub const MAX_DEFERRED_CHANGES: usize = 256;
/// Bytes of such changes in one document.
pub const MAX_DEFERRED_BYTES: usize = 4 * 1024 * 1024;
/// What one connection may have waiting across all documents, counted as each change's bytes plus
/// [`WAITING_CHANGE_COST`]: without it, a modified client could make the relay hold the
/// per-document bound in every conversation of its team.
pub const MAX_WAITING_PER_CONNECTION: usize = 16 * 1024 * 1024;
/// What a waiting change costs beyond its bytes (the decoded change the relay keeps).
pub const WAITING_CHANGE_COST: usize = 512;

/// What one connection has waiting for dependencies, across every document: the relay makes one
/// per connection and passes it with each of its messages ([`Incoming::waiting`]).
#[derive(Clone, Debug, Default)]
pub struct WaitingBudget(Arc<AtomicUsize>);

impl WaitingBudget {
    pub fn new() -> WaitingBudget {
        WaitingBudget::default()
    }

    /// What is held now, in cost units (bytes plus [`WAITING_CHANGE_COST`] per change).
    pub fn in_use(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn take(&self, cost: usize) -> bool {
        let before = self.0.fetch_add(cost, Ordering::SeqCst);
        if before + cost > MAX_WAITING_PER_CONNECTION {
            self.0.fetch_sub(cost, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn give_back(&self, cost: usize) {
        self.0.fetch_sub(cost, Ordering::SeqCst);
    }
}

/// A sync message from a connection, as the relay read it.
pub struct Incoming<'a> {
    pub conn: ConnId,
    /// The connection's peer id (frames to it are addressed so).
    pub peer_id: &'a str,
    /// Checked against the client limits; its changes are decoded in `changes`.
    pub message: sync::Message,
    pub changes: Vec<Change>,
    /// A `request` frame (the client holds nothing of the document) rather than a `sync` frame.
    pub is_request: bool,
    /// Who sent the changes, with their role and the team's mode (required when `changes` is not
    /// empty; without it they are ignored).
    pub author: Option<&'a ChangeAuthor>,
    /// What the connection may keep waiting for dependencies, across all documents.
    pub waiting: &'a WaitingBudget,
}

/// What the relay should do.
#[derive(Debug)]
pub enum Action {
    /// Send a frame to a connection.
    Send(ConnId, WireMessage),
    /// Store a chunk durably, then call [`RelayDoc::committed`] with the ticket. `changes` are the
    /// client changes it holds: storage refuses the chunk if a different change with the same actor
    /// and sequence number is stored already (a modified client sending one to each of two relay
    /// instances would otherwise make the conversation unloadable). `messages` are the messages
    /// they add: storage keeps the relay's time beside each one's `at` (which its author chose).
    Commit { ticket: u64, team: TeamId, chunk: Vec<u8>, changes: Vec<ChangeSeq>, messages: Vec<MessageTime> },
    /// Call [`RelayDoc::fanout`] shortly (changes arriving meanwhile go out together).
    ScheduleFanout,
    /// The document in memory cannot be trusted (a commit failed, a refused change could not be
    /// taken back out): it was dropped; read it again from storage before the next use.
    Reload,
    /// A conversation was created and stored: the team's connections should follow it
    /// ([`RelayDoc::follow`]) and hear of it ([`RelayDoc::advertise`]).
    Created { team: TeamId },
    /// Client changes are durable: these messages are new (for the channels and grab decisions).
    Stored { added: Vec<Message> },
    /// Changes wait for dependencies this relay does not hold: another instance may have stored
    /// them ([`RelayDoc::apply_stored`] retries the waiting changes).
    Missing,
    /// A change from this connection was refused (the error frame saying why is in the actions):
    /// the relay counts refusals per agent, and stops reading from one that keeps sending them.
    Refused(ConnId),
}

/// One change's place in its actor's history, and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeSeq {
    /// The actor id in hex.
    pub actor: String,
    pub seq: u64,
    /// The change hash in hex.
    pub hash: String,
}

impl ChangeSeq {
    pub fn of(c: &Change) -> ChangeSeq {
        ChangeSeq { actor: c.actor_id().to_hex_string(), seq: c.seq(), hash: c.hash().to_string() }
    }
}

/// A message a client's change adds, with the time its author gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageTime {
    pub id: String,
    pub at: Timestamp,
}

impl MessageTime {
    fn of_all(messages: &[Message]) -> Vec<MessageTime> {
        messages.iter().map(|m| MessageTime { id: m.id.0.clone(), at: m.at }).collect()
    }
}

/// Each change's place, read before the changes go to the judge (which takes them by value), so
/// no change is copied to learn afterwards where the accepted ones stand.
fn places(changes: &[Change]) -> Vec<(ChangeHash, ChangeSeq)> {
    changes.iter().map(|c| (c.hash(), ChangeSeq::of(c))).collect()
}

/// The places of the `accepted` changes.
fn accepted_places(places: Vec<(ChangeHash, ChangeSeq)>, accepted: &[ChangeHash]) -> Vec<ChangeSeq> {
    places.into_iter().filter(|(h, _)| accepted.contains(h)).map(|(_, p)| p).collect()
}

/// Whose conversation a new document's first changes claim to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// A conversation of this team (the relay checks the agent is in it).
    Team(TeamId),
    /// No conversation yet: only empty changes (automerge-repo clients start a document so).
    Empty,
    /// Something that is not a conversation: answered as a missing document.
    NotConversation,
    /// A conversation's layout that does not read: refused with the reason.
    Unreadable(String),
}

struct Stored {
    doc: Automerge,
    team: TeamId,
    /// The conversation's headers as of heads they were read at (see `apply_judged_with`).
    headers: conversation::Headers,
}

struct Peer {
    peer_id: String,
    state: sync::State,
    /// Changes waiting for their dependencies, and who sent them.
    deferred: Vec<Change>,
    /// What they cost, drawn from `waiting`.
    deferred_cost: usize,
    waiting: WaitingBudget,
    author: Option<ChangeAuthor>,
}

impl Peer {
    fn new(peer_id: &str) -> Peer {
        Peer {
            peer_id: peer_id.to_owned(),
            state: sync::State::new(),
            deferred: Vec::new(),
            deferred_cost: 0,
            waiting: WaitingBudget::new(),
            author: None,
        }
    }

    /// Makes the queue draw from the connection's budget (the same one for every message of a
    /// connection; a follower made by [`RelayDoc::follow`] has none until its first message).
    fn draw_from(&mut self, waiting: &WaitingBudget) {
        if !Arc::ptr_eq(&self.waiting.0, &waiting.0) {
            let waiting_changes = self.take_deferred();
            self.waiting = waiting.clone();
            self.defer(waiting_changes);
        }
    }

    /// The changes waiting for dependencies, taken out of the queue (their cost given back).
    fn take_deferred(&mut self) -> Vec<Change> {
        self.waiting.give_back(std::mem::take(&mut self.deferred_cost));
        std::mem::take(&mut self.deferred)
    }

    /// Keeps changes that wait for dependencies; false when the queue would be over its bounds
    /// (then it is emptied: the sender's sync starts over).
    fn defer(&mut self, changes: Vec<Change>) -> bool {
        for c in changes {
            let cost = c.raw_bytes().len() + WAITING_CHANGE_COST;
            if self.deferred.len() >= MAX_DEFERRED_CHANGES
                || self.deferred_cost + cost > MAX_DEFERRED_BYTES
                || !self.waiting.take(cost)
            {
                self.take_deferred();
                return false;
            }
            self.deferred_cost += cost;
            self.deferred.push(c);
        }
        true
    }
}

/// What judging a connection's changes gave.
struct Judged {
    /// The document's heads before.
    before: Vec<ChangeHash>,
    verdict: Verdict,
    /// The accepted changes' places.
    seqs: Vec<ChangeSeq>,
    /// The hashes of the changes that had waited in the queue.
    offered: Vec<ChangeHash>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.waiting.give_back(self.deferred_cost);
    }
}

/// A document a connection is creating.
struct Pending {
    doc: Automerge,
    peer: Peer,
    /// The messages its accepted changes added.
    added: Vec<Message>,
}

/// A new conversation whose first commit is in progress.
struct Creating {
    ticket: u64,
    conn: ConnId,
    doc: Automerge,
    team: TeamId,
    peer: Peer,
}

/// One document's sync state on the relay.
pub struct RelayDoc {
    id: String,
    relay_peer: String,
    actor: automerge::ActorId,
    stored: Option<Stored>,
    pending: HashMap<ConnId, Pending>,
    creating: Option<Creating>,
    peers: HashMap<ConnId, Peer>,
    /// Commits of client changes in progress, and the messages each added.
    commits: HashMap<u64, (ConnId, Vec<Message>)>,
    next_ticket: u64,
    fanout_scheduled: bool,
    /// Only the simulator sets this: the acknowledgement bug the simulator found (see
    /// [`RelayDoc::with_stall_bug`]).
    stall_bug: bool,
}

impl RelayDoc {
    /// A document not read from storage yet (or absent there). The relay writes with `actor`.
    pub fn new(id: &str, relay_peer: &str, actor: automerge::ActorId) -> RelayDoc {
        RelayDoc {
            id: id.to_owned(),
            relay_peer: relay_peer.to_owned(),
            actor,
            stored: None,
            pending: HashMap::new(),
            creating: None,
            peers: HashMap::new(),
            commits: HashMap::new(),
            next_ticket: 1,
            fanout_scheduled: false,
            stall_bug: false,
        }
    }

    /// Puts back the bug behind the sync stall, for the simulator's test that finds it: automerge
    /// is let take a replica's heads for heads the relay told it (see `receive_rest`).
    #[doc(hidden)]
    pub fn with_stall_bug(mut self) -> RelayDoc {
        self.stall_bug = true;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored conversation, as read from storage.
    pub fn load(&mut self, doc: Automerge, team: TeamId) {
        self.stored = Some(Stored { doc: doc.with_actor(self.actor.clone()), team, headers: Default::default() });
    }

    /// Drops the document from memory (it is read again when needed). Followers and their sync
    /// states stay. Refused while a commit or a creation is in progress.
    pub fn unload(&mut self) -> bool {
        if !self.commits.is_empty() || self.creating.is_some() || !self.pending.is_empty() {
            return false;
        }
        self.stored = None;
        true
    }

    pub fn is_stored(&self) -> bool {
        self.stored.is_some()
    }

    pub fn team(&self) -> Option<&TeamId> {
        self.stored.as_ref().map(|s| &s.team)
    }

    /// The stored document (for the channels and tests).
    pub fn doc(&self) -> Option<&Automerge> {
        self.stored.as_ref().map(|s| &s.doc)
    }

    pub fn heads(&self) -> Vec<ChangeHash> {
        self.stored.as_ref().map(|s| s.doc.get_heads()).unwrap_or_default()
    }

    /// The conversation's header at the current heads (read again only when they moved).
    pub fn header(&mut self) -> Option<Result<doc::DocHeader, doc::DocError>> {
        let stored = self.stored.as_mut()?;
        let heads = stored.doc.get_heads();
        if let Some(header) = stored.headers.get(&heads) {
            return Some(Ok(header.clone()));
        }
        Some(doc::read_header(&stored.doc).inspect(|h| stored.headers.put(&heads, h)))
    }

    /// Whether a commit of this document is in progress (nothing is advertised until it returns).
    pub fn committing(&self) -> bool {
        !self.commits.is_empty() || self.creating.is_some()
    }

    pub fn follows(&self, conn: ConnId) -> bool {
        self.peers.contains_key(&conn)
    }

    pub fn followers(&self) -> impl Iterator<Item = (ConnId, &str)> {
        self.peers.iter().map(|(c, p)| (*c, p.peer_id.as_str()))
    }

    /// Makes `conn` a follower (with a fresh sync state) unless it is one already.
    pub fn follow(&mut self, conn: ConnId, peer_id: &str) {
        self.peers.entry(conn).or_insert_with(|| Peer::new(peer_id));
    }

    /// Forgets a connection (it closed).
    pub fn disconnect(&mut self, conn: ConnId) {
        self.peers.remove(&conn);
        self.pending.remove(&conn);
    }

    /// Nobody follows or creates it: the relay may forget it.
    pub fn is_idle(&self) -> bool {
        self.peers.is_empty() && self.pending.is_empty() && self.creating.is_none() && self.commits.is_empty()
    }

    /// Documents `conn` is creating here (0 or 1).
    pub fn is_pending(&self, conn: ConnId) -> bool {
        self.pending.contains_key(&conn)
    }

    /// Whose conversation `changes` claim to be: the stored conversation's team, or for a new
    /// document what its first changes hold (read from a throwaway copy).
    pub fn claim(&self, conn: ConnId, changes: &[Change]) -> Claim {
        if let Some(stored) = &self.stored {
            return Claim::Team(stored.team.clone());
        }
        if let Some(refusal) = changes.iter().find_map(|c| conversation::check_before_applying(c).err()) {
            return Claim::Unreadable(refusal.to_string());
        }
        let mut probe = self.pending.get(&conn).map_or_else(Automerge::new, |p| p.doc.clone());
        let header = probe
            .apply_changes(changes.iter().cloned())
            .map_err(|e| e.to_string())
            .and_then(|()| doc::read_header(&probe).map_err(|e| e.to_string()));
        match header {
            Ok(h) => Claim::Team(h.team),
            Err(why) if matches!(doc::schema_of(&probe), Ok(Some(_))) => Claim::Unreadable(why),
            Err(_) if changes.iter().all(Change::is_empty) => Claim::Empty,
            Err(_) => Claim::NotConversation,
        }
    }

    /// Answers `conn` as for a document that does not exist (and forgets what it was creating).
    pub fn unavailable(&mut self, conn: ConnId, peer_id: &str) -> Vec<Action> {
        self.pending.remove(&conn);
        vec![Action::Send(conn, self.frame_unavailable(peer_id))]
    }

    /// Refuses a new conversation whose layout does not read.
    pub fn refuse_creation(&mut self, conn: ConnId, peer_id: &str, why: &str) -> Vec<Action> {
        self.pending.remove(&conn);
        vec![
            Action::Send(conn, self.frame_error(peer_id, format!("not a readable conversation ({why}); refused"))),
            Action::Send(conn, self.frame_unavailable(peer_id)),
            Action::Refused(conn),
        ]
    }

    /// A sync message from a connection.
    pub fn receive(&mut self, m: Incoming<'_>, now: Timestamp) -> Vec<Action> {
        if self.stored.is_none() {
            return self.receive_new(m, now);
        }
        let Incoming { conn, peer_id, message, changes, is_request: _, author, waiting } = m;
        let mut out = Vec::new();
        let peer = self.peers.entry(conn).or_insert_with(|| Peer::new(peer_id));
        peer.draw_from(waiting);
        let mut offered: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
        let judged = match author {
            Some(author) if !changes.is_empty() || !peer.deferred.is_empty() => {
                peer.author = Some(author.clone());
                match self.judge(conn, changes, author, now, &mut out) {
                    Some(judged) => judged,
                    None => return out,
                }
            }
            _ => Judged { before: self.heads(), verdict: Verdict::default(), seqs: Vec::new(), offered: Vec::new() },
        };
        offered.extend(judged.offered.iter().copied());
        let stored = self.stored.as_mut().expect("checked above");
        let peer = self.peers.get_mut(&conn).expect("inserted above");
        // The changes were applied above; automerge only takes the rest of the message.
        let accepted_none = judged.verdict.accepted.is_empty();
        if let Err(err) = receive_rest(&mut stored.doc, &mut peer.state, message, self.stall_bug && accepted_none) {
            peer.state = sync::State::new();
            let why = format!("the sync message could not be applied ({err})");
            out.push(Action::Send(conn, frame_error(&self.relay_peer, &self.id, peer_id, &why)));
            return out;
        }
        if let Some(their) = peer.state.their_heads.as_mut() {
            // Refused changes are not asked for again; missing dependencies are.
            let dropped: HashSet<ChangeHash> =
                offered.iter().copied().filter(|h| !conversation::has_change(&stored.doc, h)).collect();
            their.retain(|h| !dropped.contains(h));
            their.extend(judged.verdict.missing.iter().copied());
            // Never a hash twice: automerge 0.12 panics on a list that names a change twice.
            their.sort();
            their.dedup();
        }
        if self.settle(conn, peer_id, judged, author, &mut out) {
            return out;
        }
        if !self.commits.is_empty() || self.creating.is_some() {
            // The answer waits for the commits in progress (the fan-out includes it).
            out.extend(self.schedule_fanout());
        } else if let Some(peer) = self.peers.get_mut(&conn)
            && let Some(stored) = self.stored.as_mut()
        {
            // Nothing new: only the sender may need an answer, and usually not even that (an
            // acknowledgement of heads we both have).
            let heads = stored.doc.get_heads();
            let state = &peer.state;
            let settled = state.have_responded
                && state.last_sent_heads == heads
                && state.their_heads.as_ref() == Some(&heads)
                && state.their_need.as_ref().is_none_or(Vec::is_empty);
            if !settled && let Some(m) = stored.doc.generate_sync_message(&mut peer.state) {
                out.push(Action::Send(conn, frame_sync(&self.relay_peer, &self.id, &peer.peer_id, m)));
            }
        }
        out
    }

    /// Judges `changes` from `conn`, after the changes waiting in its queue, into the stored
    /// document (one by one, in causal order). `None` when the exchange with `conn` ends here (what
    /// to tell it is in `out`): a refused change could not be taken back out (the document was
    /// dropped and is read again), or too much waits for dependencies.
    fn judge(
        &mut self,
        conn: ConnId,
        changes: Vec<Change>,
        author: &ChangeAuthor,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<Judged> {
        let stored = self.stored.as_mut()?;
        let peer = self.peers.get_mut(&conn)?;
        let before = stored.doc.get_heads();
        let mut all = peer.take_deferred();
        let offered = all.iter().map(Change::hash).collect();
        all.extend(changes);
        let placed = places(&all);
        let mut verdict =
            conversation::apply_judged_with(&mut stored.doc, &self.id, all, author, now, &mut stored.headers);
        let seqs = accepted_places(placed, &verdict.accepted);
        if verdict.damaged {
            self.stored = None;
            // The sender stays a follower with a fresh state: once the document is read again, the
            // fan-out tells it what the relay holds and it sends its changes again.
            peer.state = sync::State::new();
            let why = "the relay could not apply your changes; they will be sent again";
            out.push(Action::Send(conn, frame_error(&self.relay_peer, &self.id, &peer.peer_id, why)));
            out.push(Action::Reload);
            return None;
        }
        if !verdict.deferred.is_empty() {
            out.push(Action::Missing);
        }
        if !peer.defer(std::mem::take(&mut verdict.deferred)) {
            peer.state = sync::State::new();
            let why = "too many changes wait for changes the relay does not have; the sync starts over";
            out.push(Action::Send(conn, frame_error(&self.relay_peer, &self.id, &peer.peer_id, why)));
            return None;
        }
        Some(Judged { before, verdict, seqs, offered })
    }

    /// After judging: a refusal is told to the sender (whose exchange starts over from what the
    /// relay holds), and what was accepted is committed. True when a commit was asked for.
    fn settle(
        &mut self,
        conn: ConnId,
        peer_id: &str,
        judged: Judged,
        author: Option<&ChangeAuthor>,
        out: &mut Vec<Action>,
    ) -> bool {
        let Judged { before, verdict, seqs, .. } = judged;
        if let Some((hash, refusal)) = &verdict.refused {
            tracing::info!(doc_id = %self.id, agent = ?author.map(|a| &a.agent), change = %hash, %refusal, "change refused");
            let why = format!("{refusal}; refused (change {hash})");
            out.push(Action::Send(conn, frame_error(&self.relay_peer, &self.id, peer_id, &why)));
            out.push(Action::Refused(conn));
            self.peers.remove(&conn);
        }
        let Some(stored) = self.stored.as_mut() else { return false };
        if stored.doc.get_heads() == before {
            return false;
        }
        let chunk = stored.doc.save_after(&before);
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let messages = MessageTime::of_all(&verdict.added);
        self.commits.insert(ticket, (conn, verdict.added));
        out.push(Action::Commit { ticket, team: stored.team.clone(), chunk, changes: seqs, messages });
        true
    }

    /// A sync message for a document the relay does not store: a conversation `conn` is creating.
    fn receive_new(&mut self, m: Incoming<'_>, now: Timestamp) -> Vec<Action> {
        let Incoming { conn, peer_id, message, changes, is_request, author, waiting } = m;
        if self.creating.as_ref().is_some_and(|c| c.conn == conn) {
            // Its creation is being stored: the fan-out after it answers.
            return Vec::new();
        }
        let pending = self.pending.entry(conn).or_insert_with(|| Pending {
            doc: Automerge::new(),
            peer: Peer::new(peer_id),
            added: Vec::new(),
        });
        pending.peer.draw_from(waiting);
        if !changes.is_empty() {
            let Some(author) = author else { return self.unavailable(conn, peer_id) };
            let verdict = conversation::apply_judged(&mut pending.doc, &self.id, changes, author, now);
            if let Some((hash, refusal)) = verdict.refused {
                tracing::info!(doc_id = %self.id, agent = %author.agent, change = %hash, %refusal, "new conversation refused");
                self.pending.remove(&conn);
                let why = format!("{refusal}; refused (change {hash})");
                return vec![
                    Action::Send(conn, frame_error(&self.relay_peer, &self.id, peer_id, &why)),
                    Action::Send(conn, self.frame_unavailable(peer_id)),
                    Action::Refused(conn),
                ];
            }
            pending.added.extend(verdict.added);
            if !pending.peer.defer(verdict.deferred) {
                return self.unavailable(conn, peer_id);
            }
        }
        if receive_rest(&mut pending.doc, &mut pending.peer.state, message, false).is_err() {
            return self.unavailable(conn, peer_id);
        }
        if !matches!(doc::check_schema(&pending.doc), Ok(true)) {
            let heads = pending.doc.get_heads();
            let state = &mut pending.peer.state;
            // Everything the client has arrived and it is not a conversation: the relay keeps
            // conversations only, so it answers as for a document that does not exist.
            let complete_but_other = !heads.is_empty() && state.their_heads.as_deref() == Some(&heads[..]);
            if is_request
                || complete_but_other
                || heads.is_empty() && state.their_heads.as_ref().is_none_or(Vec::is_empty)
            {
                return self.unavailable(conn, peer_id);
            }
            // Ask for the changes of the new document.
            return match pending.doc.generate_sync_message(state) {
                Some(m) => vec![Action::Send(conn, frame_sync(&self.relay_peer, &self.id, peer_id, m))],
                None => Vec::new(),
            };
        }
        let Some(pending) = self.pending.remove(&conn) else { return Vec::new() };
        let Ok(header) = doc::read_header(&pending.doc) else { return self.unavailable(conn, peer_id) };
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let chunk = pending.doc.save();
        let changes = pending.doc.get_changes(&[]).iter().map(ChangeSeq::of).collect();
        let team = header.team;
        self.creating = Some(Creating { ticket, conn, doc: pending.doc, team: team.clone(), peer: pending.peer });
        let messages = MessageTime::of_all(&pending.added);
        vec![Action::Commit { ticket, team, chunk, changes, messages }]
    }

    /// A commit asked for by [`Action::Commit`] returned.
    pub fn committed(&mut self, ticket: u64, result: Result<(), String>) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(c) = self.creating.take_if(|c| c.ticket == ticket) {
            let peer_id = c.peer.peer_id.clone();
            if let Err(err) = result {
                tracing::warn!(doc_id = %self.id, %err, "storing a new conversation failed");
                let why = "the relay could not store this conversation; it will be sent again";
                out.push(Action::Send(c.conn, frame_error(&self.relay_peer, &self.id, &peer_id, why)));
                return out;
            }
            tracing::info!(doc_id = %self.id, team = %c.team, "conversation created");
            self.stored = Some(Stored {
                doc: c.doc.with_actor(self.actor.clone()),
                team: c.team.clone(),
                headers: Default::default(),
            });
            self.peers.insert(c.conn, c.peer);
            out.push(Action::Created { team: c.team });
            return out;
        }
        let Some((conn, added)) = self.commits.remove(&ticket) else { return out };
        match result {
            Ok(()) => out.push(Action::Stored { added }),
            Err(err) => {
                tracing::warn!(doc_id = %self.id, %err, "storing a change failed");
                // What is in memory is not durable: read it again; the sender sends it again.
                self.stored = None;
                // The sender stays a follower with a fresh state: the fan-out after the document is
                // read again tells it what the relay holds, and it sends its change again.
                if let Some(peer) = self.peers.get_mut(&conn) {
                    peer.state = sync::State::new();
                    let why = "the relay could not store your change; it will be sent again";
                    out.push(Action::Send(conn, frame_error(&self.relay_peer, &self.id, &peer.peer_id, why)));
                }
                out.push(Action::Reload);
            }
        }
        out.extend(self.schedule_fanout());
        out
    }

    fn schedule_fanout(&mut self) -> Option<Action> {
        (!std::mem::replace(&mut self.fanout_scheduled, true)).then_some(Action::ScheduleFanout)
    }

    /// The scheduled fan-out: every follower hears what it needs, unless a commit is in progress
    /// (the fan-out after it does it).
    pub fn fanout(&mut self) -> Vec<Action> {
        self.fanout_scheduled = false;
        self.advertise()
    }

    /// Sends every follower whatever sync message it needs now (nothing while a commit of this
    /// document is in progress: the heads advertised are always durable).
    pub fn advertise(&mut self) -> Vec<Action> {
        if self.committing() {
            return Vec::new();
        }
        let Some(stored) = &mut self.stored else { return Vec::new() };
        let mut out = Vec::new();
        // Followers in the same sync state (most of them, after a change they all acknowledged)
        // get the same message and move to the same state: automerge makes it once per state,
        // not once per follower (it rebuilds each change it sends from the document).
        let mut made: Vec<(sync::State, sync::State, Option<Vec<u8>>)> = Vec::new();
        for (conn, peer) in &mut self.peers {
            let data = match made.iter().find(|(before, ..)| *before == peer.state) {
                Some((_, after, data)) => {
                    peer.state.clone_from(after);
                    data.clone()
                }
                None => {
                    let before = peer.state.clone();
                    let data = stored.doc.generate_sync_message(&mut peer.state).map(outgoing);
                    made.push((before, peer.state.clone(), data.clone()));
                    data
                }
            };
            if let Some(data) = data {
                out.push(Action::Send(*conn, frame_data(&self.relay_peer, &self.id, &peer.peer_id, data)));
            }
        }
        out
    }

    /// Changes another instance stored (read from storage): applied, and followers hear of what
    /// is new. Changes waiting for dependencies are judged again with their sender's next message
    /// (or at once with [`RelayDoc::retry_deferred`]).
    pub fn apply_stored(&mut self, bytes: &[u8]) -> Result<Vec<Action>, String> {
        let Some(stored) = &mut self.stored else { return Ok(Vec::new()) };
        let before = stored.doc.get_heads();
        if !bytes.is_empty()
            && let Err(err) = stored.doc.load_incremental(bytes)
        {
            self.stored = None;
            return Err(format!("stored changes of {} are unreadable: {err}", self.id));
        }
        if stored.doc.get_heads() == before {
            return Ok(Vec::new());
        }
        Ok(self.advertise())
    }

    /// Judges again what waits for dependencies (after other changes arrived).
    pub fn retry_deferred(&mut self, now: Timestamp) -> Vec<Action> {
        let waiting: Vec<ConnId> = self.peers.iter().filter(|(_, p)| !p.deferred.is_empty()).map(|(c, _)| *c).collect();
        let mut out = Vec::new();
        for conn in waiting {
            let Some(peer) = self.peers.get(&conn) else { continue };
            let (Some(author), peer_id) = (peer.author.clone(), peer.peer_id.clone()) else { continue };
            if self.stored.is_none() {
                break;
            }
            // Judged as if the peer had sent them again, without a sync message around them.
            let Some(judged) = self.judge(conn, Vec::new(), &author, now, &mut out) else { continue };
            self.settle(conn, &peer_id, judged, Some(&author), &mut out);
        }
        out
    }

    /// Forgets every change waiting for its dependencies. Only the simulator calls this, to put
    /// back the protocol bug the waiting queue fixed (a sender's automerge counts a change as sent
    /// and never sends it again, so a dropped change stalls that sender's sync for good).
    #[doc(hidden)]
    pub fn forget_waiting_changes(&mut self) {
        for p in self.peers.values_mut() {
            p.take_deferred();
        }
    }

    /// A change the relay itself makes (recording the grab winner): returns the chunk to commit
    /// before anyone hears of it.
    pub fn relay_change(
        &mut self,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), doc::DocError>,
    ) -> Result<Vec<u8>, String> {
        let stored = self.stored.as_mut().ok_or("the conversation is not loaded")?;
        let before = stored.doc.get_heads();
        stored.doc.transact::<_, _, doc::DocError>(|tx| f(tx)).map_err(|f| f.error.to_string())?;
        Ok(stored.doc.save_after(&before))
    }

    fn frame_unavailable(&self, peer_id: &str) -> WireMessage {
        WireMessage::DocUnavailable {
            sender_id: self.relay_peer.clone(),
            target_id: peer_id.to_owned(),
            document_id: self.id.clone(),
        }
    }

    fn frame_error(&self, peer_id: &str, why: impl AsRef<str>) -> WireMessage {
        frame_error(&self.relay_peer, &self.id, peer_id, why.as_ref())
    }
}

/// "document <id>: <why>": the replica shows it on that conversation.
fn frame_error(relay_peer: &str, doc_id: &str, peer_id: &str, why: &str) -> WireMessage {
    WireMessage::Error {
        sender_id: relay_peer.to_owned(),
        target_id: peer_id.to_owned(),
        message: format!("document {doc_id}: {why}"),
    }
}

fn frame_sync(relay_peer: &str, doc_id: &str, peer_id: &str, m: sync::Message) -> WireMessage {
    frame_data(relay_peer, doc_id, peer_id, outgoing(m))
}

/// A sync frame carrying an encoded sync message ([`outgoing`]).
fn frame_data(relay_peer: &str, doc_id: &str, peer_id: &str, data: Vec<u8>) -> WireMessage {
    WireMessage::Sync {
        sender_id: relay_peer.to_owned(),
        target_id: peer_id.to_owned(),
        document_id: doc_id.to_owned(),
        data,
    }
}

/// Lets automerge take a sync message whose changes were already applied (judged): heads, needs
/// and bloom filters. The heads the relay last sent stay what it sent: automerge takes a message
/// whose heads equal ours for heads we have told them, but a replica counts its changes as synced
/// only when the relay's own heads cover them (the relay says so only once they are durable).
/// Without this, a replica whose change was still being committed when it reported the same heads
/// never heard that the change was stored, and kept it unsynced for good (the stall the simulator
/// found; `tests/sim`).
fn receive_rest(
    doc: &mut Automerge,
    state: &mut sync::State,
    message: sync::Message,
    stall_bug: bool,
) -> Result<(), automerge::AutomergeError> {
    let last_sent = state.last_sent_heads.clone();
    take_rest(doc, state, message)?;
    if !stall_bug {
        state.last_sent_heads = last_sent;
    }
    Ok(())
}

/// What the relay does with the rest of a client's sync message once its changes are judged (heads,
/// needs, bloom filters): an acknowledgement is taken by [`take_acknowledgement`], anything else by
/// automerge. The `sync_message` fuzz target calls it as the relay does.
pub fn take_rest(
    doc: &mut Automerge,
    state: &mut sync::State,
    mut message: sync::Message,
) -> Result<(), automerge::AutomergeError> {
    message.changes = sync::ChunkList::empty();
    match take_acknowledgement(doc, state, message) {
        Some(message) => doc.receive_sync_message(state, message),
        None => Ok(()),
    }
}

/// Takes a sync message without changes whose heads the relay holds (what every follower sends
/// after each change it receives) into `state` exactly as automerge 0.12's
/// `receive_sync_message` does, or hands it back (`Some`) for automerge to take. Automerge walks
/// the whole history of the document for every message (to trim the hashes it has sent, even when
/// there are none), which made acknowledgements the relay's largest cost under a steady load and
/// grew with the length of a conversation. Here: heads equal to the relay's cover everything it has
/// sent; other heads leave nothing to trim when nothing was sent. `tests::acknowledgements_are_taken_as_automerge_takes_them`
/// holds the two to the same result.
fn take_acknowledgement(doc: &Automerge, state: &mut sync::State, message: sync::Message) -> Option<sync::Message> {
    let heads = doc.get_heads();
    let reset = message.flags.is_some_and(|f| f.contains(sync::MessageFlags::SYNC_RESET));
    let trimmed = match message.heads == heads {
        // Everything sent is in the document (a rebuilt document may have lost some).
        true => state.sent_hashes.iter().all(|h| conversation::has_change(doc, h)),
        false => state.sent_hashes.is_empty(),
    };
    if !message.changes.is_empty()
        || message.heads.is_empty()
        || reset
        || !trimmed
        || !message.heads.iter().all(|h| conversation::has_change(doc, h))
    {
        return Some(message);
    }
    let sync::Message { heads: their_heads, need, have, flags, .. } = message;
    state.in_flight = false;
    if let Some(flags) = flags {
        let mut capabilities = vec![sync::Capability::MessageV2];
        if flags.contains(sync::MessageFlags::SUPPORTS_SYNC_RESET) {
            capabilities.push(sync::Capability::SyncReset);
        }
        state.their_capabilities = Some(capabilities);
        state.peer_read_only = flags.contains(sync::MessageFlags::READ_ONLY);
    }
    if their_heads == heads {
        state.sent_hashes.clear();
        state.last_sent_heads.clone_from(&their_heads);
    }
    state.shared_heads.clone_from(&their_heads);
    state.their_have = Some(have);
    state.their_heads = Some(their_heads);
    state.their_need = Some(need);
    None
}

/// Encodes a sync message for a client without advertising the "V2" format: clients then send
/// changes, never whole documents (which the relay refuses: their compressed columns cannot be
/// bounded before automerge reads them).
pub fn outgoing(mut m: sync::Message) -> Vec<u8> {
    m.flags = None;
    m.encode()
}

#[cfg(test)]
mod tests;
