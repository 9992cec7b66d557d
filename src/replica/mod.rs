//! The local replica: one automerge document per conversation, persisted in SQLite, with an index
//! of conversation summaries and materialized messages kept in the same transaction as every local
//! or merged change. Listing and opening conversations never load automerge documents.

pub mod conversation;
pub mod doc;
pub mod sqlite;
mod store;

use crate::domain::access::{self, GrabState, JoinKind};
use crate::domain::attachment::BlobHash;
use crate::domain::filter::{self, Filter, Listing};
use crate::domain::status::{self, ConversationSummary, Status};
use crate::domain::{
    AgentId, Author, ConversationId, Customer, CustomerEdit, DomainError, Message, MessageBody, MessageId, Presence,
    Team, TeamId, TeamMode, Timestamp, fill_template, fill_whatsapp_template,
};
use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, Automerge, AutomergeError, ChangeHash};
use doc::{DocError, NewConversation};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub use store::schema_version as replica_schema_version;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Denied(#[from] DomainError),
    #[error(transparent)]
    Document(#[from] DocError),
    #[error("local storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("a stored row could not be read: {0}")]
    StoredRow(#[from] serde_json::Error),
    #[error(
        "this replica was written by a newer Crewdesk (storage schema {found}, this build knows {supported}); update Crewdesk"
    )]
    NewerSchema { found: i64, supported: i64 },
    #[error("this replica belongs to {owner}; open another data directory to sign in as {requested}")]
    WrongAgent { owner: AgentId, requested: AgentId },
    #[error("no conversation {0} on this replica")]
    UnknownConversation(ConversationId),
    #[error("conversation {conversation} belongs to team {team}, which this replica has not received yet")]
    UnknownTeam { conversation: ConversationId, team: TeamId },
    #[error("team {0} has no template named {1}")]
    UnknownTemplate(TeamId, String),
    #[error("the relay would refuse this change: {0}")]
    Refused(#[from] conversation::Refusal),
}

/// A search lists at most this many conversations (the list shows fewer; refine the words).
/// A search lists at most this many conversations (and counts what it lists): a word found in
/// every conversation ("example.com") would otherwise read the whole full-text index (25 ms at
/// 10,000 conversations; `BENCHMARKS.md`).
const SEARCH_LIMIT: usize = 1_000;

/// How long a lost grab stays in the Notifications panel after it was first shown.
const LOST_GRAB_SHOWN_MS: i64 = 60_000;

/// How many conversation documents stay loaded; the rest are read from SQLite on demand.
const DOC_CACHE: usize = 64;
/// A document with more chunks than this is rewritten as one full save when next loaded.
const COMPACT_AFTER_CHUNKS: usize = 256;

/// What a remote change did to the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The changes were already known (or are waiting for changes they depend on).
    NothingNew,
    /// New changes were stored; the conversation's index row is now `summary` (`None` while the
    /// document has not received its first change).
    Stored { summary: Option<Box<ConversationSummary>> },
}

/// Everything the green block shows for one conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConversationDetail {
    pub summary: ConversationSummary,
    pub messages: Vec<Message>,
    pub badges: Vec<Status>,
    pub grab: GrabState,
    pub whatsapp_window_open: Option<bool>,
    pub email_fallback: bool,
}

struct DocCache {
    tick: u64,
    docs: HashMap<ConversationId, (Automerge, u64)>,
}

impl DocCache {
    fn take(&mut self, id: &ConversationId) -> Option<Automerge> {
        self.docs.remove(id).map(|(d, _)| d)
    }
    fn put(&mut self, id: ConversationId, doc: Automerge) {
        self.tick += 1;
        self.docs.insert(id, (doc, self.tick));
        if self.docs.len() > DOC_CACHE
            && let Some(oldest) = self.docs.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone())
        {
            self.docs.remove(&oldest);
        }
    }
}

pub struct Replica {
    conn: Connection,
    agent: AgentId,
    actor: ActorId,
    teams: BTreeMap<TeamId, Team>,
    /// Shared rows: a listing hands out the rows of its window without copying them.
    index: BTreeMap<ConversationId, Arc<ConversationSummary>>,
    cache: DocCache,
    rng: StdRng,
    /// Why the relay last refused a change of this replica to a conversation (kept until the
    /// conversation's changes are all synced), so the desk can show it on the conversation.
    refusals: HashMap<ConversationId, String>,
    /// Conversations with messages a refusal took back that wait to be sent again (mirrors the
    /// `undelivered` rows in state 'retry'), so a sync message costs no query when there are none.
    to_retry: std::collections::HashSet<ConversationId>,
}

impl Replica {
    /// Opens (or creates) the replica at `path` for `agent`. A replica belongs to one agent.
    pub fn open(path: impl AsRef<Path>, agent: AgentId) -> Result<Replica, ReplicaError> {
        Replica::open_with(path, agent, StdRng::from_os_rng())
    }

    /// As [`Replica::open`], with its actor and message ids drawn from `seed`: a simulated run is
    /// then the same run every time.
    pub fn open_seeded(path: impl AsRef<Path>, agent: AgentId, seed: u64) -> Result<Replica, ReplicaError> {
        Replica::open_with(path, agent, StdRng::seed_from_u64(seed))
    }

    fn open_with(path: impl AsRef<Path>, agent: AgentId, mut rng: StdRng) -> Result<Replica, ReplicaError> {
        let conn = store::open(path.as_ref())?;
        match store::meta(&conn, "agent")? {
            Some(owner) if owner != agent.as_str() => {
                return Err(ReplicaError::WrongAgent { owner: AgentId(owner), requested: agent });
            }
            Some(_) => {}
            None => store::set_meta(&conn, "agent", agent.as_str())?,
        }
        // Each replica writes with its own actor, so two devices of one agent never collide.
        let actor_hex = match store::meta(&conn, "actor")? {
            Some(hex) => hex,
            None => {
                let hex = doc::random_id(&mut rng);
                store::set_meta(&conn, "actor", &hex)?;
                hex
            }
        };
        let actor = ActorId::from(hex_bytes(&actor_hex));
        let mut teams = BTreeMap::new();
        {
            let mut stmt = conn.prepare("SELECT body FROM teams")?;
            for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
                let team: Team = serde_json::from_str(&body?)?;
                teams.insert(team.id.clone(), team);
            }
        }
        let index = store::load_summaries(&conn)?.into_iter().map(|s| (s.id.clone(), Arc::new(s))).collect();
        let to_retry = store::undelivered_to_retry(&conn)?.into_iter().collect();
        let cache = DocCache { tick: 0, docs: HashMap::new() };
        Ok(Replica { conn, agent, actor, teams, index, cache, rng, refusals: HashMap::new(), to_retry })
    }

    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// Stores a team as the relay reports it (membership and roles are the relay's truth).
    pub fn put_team(&mut self, team: Team) -> Result<(), ReplicaError> {
        team.thresholds.validate()?;
        self.conn.execute(
            "INSERT INTO teams (id, body) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            rusqlite::params![team.id.as_str(), serde_json::to_string(&team)?],
        )?;
        self.teams.insert(team.id.clone(), team);
        Ok(())
    }

    /// Replaces every team by what the relay reports: teams the relay no longer lists are gone,
    /// so a replica can never keep (or grant itself) access the relay does not give.
    pub fn set_teams(&mut self, teams: Vec<Team>) -> Result<(), ReplicaError> {
        for team in &teams {
            team.thresholds.validate()?;
        }
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM teams", [])?;
        for team in &teams {
            tx.execute(
                "INSERT INTO teams (id, body) VALUES (?1, ?2)",
                rusqlite::params![team.id.as_str(), serde_json::to_string(team)?],
            )?;
        }
        tx.commit()?;
        self.teams = teams.into_iter().map(|t| (t.id.clone(), t)).collect();
        Ok(())
    }

    /// A team's 📃 templates as the relay saved them (an admin's desk takes them at once; every
    /// desk gets them again from the relay when it connects).
    pub fn set_team_templates(
        &mut self,
        team: &TeamId,
        templates: Vec<crate::domain::MessageTemplate>,
    ) -> Result<(), ReplicaError> {
        let mut teams: Vec<Team> = self.teams.values().cloned().collect();
        if let Some(t) = teams.iter_mut().find(|t| t.id == *team) {
            t.templates = templates;
        }
        self.set_teams(teams)
    }

    /// The teams this agent belongs to.
    pub fn teams(&self) -> Vec<&Team> {
        self.teams.values().filter(|t| t.member(&self.agent).is_some()).collect()
    }

    pub fn team(&self, id: &TeamId) -> Option<&Team> {
        self.teams.get(id)
    }

    /// The red and yellow blocks: matching rows (sorted, limited) and every count.
    pub fn list(&self, filter: &Filter, now: Timestamp) -> Listing<Arc<ConversationSummary>> {
        let listing = filter::evaluate(self.index.values(), |t| self.teams.get(t), &self.agent, now, filter);
        Listing {
            rows: listing.rows.into_iter().cloned().collect(),
            total: listing.total,
            offset: listing.offset,
            counts: listing.counts,
        }
    }

    /// The list with a search: only conversations whose messages or customer details (name,
    /// email, phone) match every word of `search`, from the full-text index.
    pub fn list_search(
        &self,
        filter: &Filter,
        now: Timestamp,
        search: &str,
    ) -> Result<Listing<Arc<ConversationSummary>>, ReplicaError> {
        if search.trim().is_empty() {
            return Ok(self.list(filter, now));
        }
        let ids: std::collections::HashSet<ConversationId> =
            store::search(&self.conn, search, SEARCH_LIMIT)?.into_iter().collect();
        let listing = filter::evaluate(
            self.index.values().filter(|s| ids.contains(&s.id)),
            |t| self.teams.get(t),
            &self.agent,
            now,
            filter,
        );
        Ok(Listing {
            rows: listing.rows.into_iter().cloned().collect(),
            total: listing.total,
            offset: listing.offset,
            counts: listing.counts,
        })
    }

    /// Merges the full-text index's segments, a bounded step at a time, off the send path: the
    /// index never merges inside a commit (its `automerge` is 0), so a durable send does not wait
    /// for a merge. The desk calls this every few seconds; true when there was work (call again).
    pub fn tidy_search(&mut self) -> Result<bool, ReplicaError> {
        store::merge_search(&self.conn)
    }

    /// How many messages of these conversations this agent has seen (for unread markers): the rows
    /// on screen, not every conversation of the replica.
    pub fn seen_counts<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ConversationId>,
    ) -> Result<HashMap<ConversationId, u32>, ReplicaError> {
        let mut seen = HashMap::new();
        for id in ids {
            if let Some(n) = store::seen_of(&self.conn, id)? {
                seen.insert(id.clone(), n);
            }
        }
        Ok(seen)
    }

    /// Marks a conversation as read up to its current messages.
    pub fn mark_read(&mut self, id: &ConversationId) -> Result<(), ReplicaError> {
        let count = self.visible(id)?.1.message_count;
        // Opening a conversation already read writes nothing (no commit, no fsync on the way).
        if store::seen_of(&self.conn, id)?.is_some_and(|seen| seen >= count) {
            return Ok(());
        }
        store::mark_seen(&self.conn, id, count)
    }

    /// Representatives' Notifications panel: grabbable conversations and grabs awaiting the relay.
    pub fn notifications(&self, now: Timestamp) -> Vec<(ConversationSummary, GrabState)> {
        let shown = self.lost_grabs_shown().unwrap_or_default();
        let mut out: Vec<_> = self
            .index
            .values()
            .filter(|s| self.teams.get(&s.team).is_some_and(|t| access::in_notifications(t, &self.agent, s, now)))
            .map(|s| ((**s).clone(), access::grab_state(&self.agent, s)))
            // A lost grab is told once: it leaves the panel a minute after it was first shown.
            .filter(|(s, g)| *g != GrabState::Lost || shown.get(&s.id).is_none_or(|at| now.0 - at < LOST_GRAB_SHOWN_MS))
            .collect();
        out.sort_by(|a, b| a.0.created_at.cmp(&b.0.created_at).then_with(|| a.0.id.cmp(&b.0.id)));
        out
    }

    /// The Notifications panel showed these lost grabs now (the first time counts).
    pub fn lost_grabs_shown_now(&self, ids: &[ConversationId], now: Timestamp) -> Result<(), ReplicaError> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO lost_grabs_shown (conversation_id, shown_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        for id in ids {
            stmt.execute(rusqlite::params![id.as_str(), now.0])?;
        }
        Ok(())
    }

    fn lost_grabs_shown(&self) -> Result<HashMap<ConversationId, i64>, ReplicaError> {
        let mut stmt = self.conn.prepare_cached("SELECT conversation_id, shown_at FROM lost_grabs_shown")?;
        let rows = stmt.query_map([], |r| Ok((ConversationId(r.get(0)?), r.get::<_, i64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn summary(&self, id: &ConversationId) -> Option<&ConversationSummary> {
        self.index.get(id).map(|s| &**s)
    }

    /// The green block for one conversation, from the index and materialized messages.
    pub fn conversation(&self, id: &ConversationId, now: Timestamp) -> Result<ConversationDetail, ReplicaError> {
        let (team, summary) = self.visible(id)?;
        Ok(ConversationDetail {
            messages: store::messages(&self.conn, id)?,
            badges: Status::badges(summary, team, now),
            grab: access::grab_state(&self.agent, summary),
            whatsapp_window_open: status::whatsapp_window_open(summary, now),
            email_fallback: status::email_fallback_active(summary),
            summary: summary.clone(),
        })
    }

    fn visible(&self, id: &ConversationId) -> Result<(&Team, &ConversationSummary), ReplicaError> {
        let summary = self.index.get(id).ok_or_else(|| ReplicaError::UnknownConversation(id.clone()))?;
        let team = self
            .teams
            .get(&summary.team)
            .ok_or_else(|| ReplicaError::UnknownTeam { conversation: id.clone(), team: summary.team.clone() })?;
        if !access::may_see(team, &self.agent, summary) {
            // A team member who cannot see it any more lost it to another representative; anyone
            // else is told nothing more than "not here".
            return Err(match team.member(&self.agent) {
                Some(_) => DomainError::HandledByAnother.into(),
                None => ReplicaError::UnknownConversation(id.clone()),
            });
        }
        Ok((team, summary))
    }

    // ---- agent actions -------------------------------------------------------------------------

    /// JOIN. In a grab-mode team a representative's JOIN asks the relay to grab; the return value
    /// says which happened.
    pub fn join(&mut self, id: &ConversationId, at: Timestamp) -> Result<JoinKind, ReplicaError> {
        let (team, summary) = self.visible(id)?;
        let kind = access::join_kind(team, &self.agent, summary, at)?;
        let agent = self.agent.clone();
        match kind {
            JoinKind::Join => self.local_change(id, &[], at, |tx| doc::set_in_room(tx, &agent, true))?,
            JoinKind::Grab => self.local_change(id, &[], at, |tx| doc::request_grab(tx, &agent, at))?,
        }
        Ok(kind)
    }

    /// Grab from Notifications (grab-mode teams, representatives). Stays "awaiting confirmation"
    /// until the relay records who was first.
    pub fn grab(&mut self, id: &ConversationId, at: Timestamp) -> Result<(), ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_grab(team, &self.agent, summary, at)?;
        let agent = self.agent.clone();
        self.local_change(id, &[], at, |tx| doc::request_grab(tx, &agent, at))
    }

    pub fn leave(&mut self, id: &ConversationId) -> Result<(), ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_leave(team, &self.agent, summary)?;
        let agent = self.agent.clone();
        self.local_change(id, &[], Timestamp::now(), |tx| doc::set_in_room(tx, &agent, false))
    }

    /// ↪ TRANSFER: hands the conversation to a colleague of its team, who the same change puts in
    /// the room (in a grab-mode team, as its representative); the agent leaves it. Works offline,
    /// judged like every change.
    pub fn transfer(&mut self, id: &ConversationId, to: &AgentId, at: Timestamp) -> Result<MessageId, ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_transfer(team, &self.agent, summary, to)?;
        let records_owner = team.mode == TeamMode::Grab;
        let leaves = summary.is_in_room(&self.agent);
        let agent = self.agent.clone();
        let message = Message {
            id: doc::new_message_id(&mut self.rng),
            at,
            author: Author::Crew { agent: agent.clone() },
            body: MessageBody::Transfer { to: to.clone() },
        };
        self.local_change(id, std::slice::from_ref(&message), at, |tx| {
            doc::add_message(tx, &message)?;
            doc::hand_over(tx, to, records_owner)?;
            if leaves {
                doc::set_in_room(tx, &agent, false)?;
            }
            Ok(())
        })?;
        Ok(message.id)
    }

    pub fn close(&mut self, id: &ConversationId, at: Timestamp) -> Result<(), ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_close(team, &self.agent, summary, at)?;
        self.local_change(id, &[], at, |tx| doc::close(tx, at))
    }

    pub fn edit_customer(&mut self, id: &ConversationId, edit: &CustomerEdit) -> Result<(), ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_edit_customer(team, &self.agent, summary)?;
        edit.validate()?;
        self.local_change(id, &[], Timestamp::now(), |tx| doc::edit_customer(tx, edit))
    }

    /// ▶ send. The message is durable (fsynced) when this returns.
    pub fn send(&mut self, id: &ConversationId, body: MessageBody, at: Timestamp) -> Result<MessageId, ReplicaError> {
        let (team, summary) = self.visible(id)?;
        access::may_send(team, &self.agent, summary, &body, at)?;
        let message = Message {
            id: doc::new_message_id(&mut self.rng),
            at,
            author: Author::Crew { agent: self.agent.clone() },
            body,
        };
        let id_out = message.id.clone();
        self.local_change(id, std::slice::from_ref(&message), at, |tx| doc::add_message(tx, &message))?;
        Ok(id_out)
    }

    /// 📃 a team template with its placeholders filled from the customer and this agent.
    pub fn send_template(
        &mut self,
        id: &ConversationId,
        template: &str,
        at: Timestamp,
    ) -> Result<MessageId, ReplicaError> {
        let t = self.template(id, template)?;
        let (team, summary) = self.visible(id)?;
        let agent_name = team.member(&self.agent).map_or("", |m| m.name.as_str());
        let text = fill_template(&t.text, &summary.customer, agent_name);
        self.send(id, MessageBody::Template { template: t.name, text }, at)
    }

    /// 📃 a team template as the agent edited it in the composer (filled, then changed or not).
    pub fn send_filled_template(
        &mut self,
        id: &ConversationId,
        template: &str,
        text: String,
        at: Timestamp,
    ) -> Result<MessageId, ReplicaError> {
        let t = self.template(id, template)?;
        self.send(id, MessageBody::Template { template: t.name, text }, at)
    }

    /// The conversation's team's 📃 template of that name.
    fn template(&self, id: &ConversationId, name: &str) -> Result<crate::domain::MessageTemplate, ReplicaError> {
        let (team, _) = self.visible(id)?;
        team.templates
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| ReplicaError::UnknownTemplate(team.id.clone(), name.to_owned()))
    }

    /// 💬 an approved WhatsApp template with its parameters (allowed outside the 24 h window).
    pub fn send_whatsapp_template(
        &mut self,
        id: &ConversationId,
        template: &str,
        params: Vec<String>,
        at: Timestamp,
    ) -> Result<MessageId, ReplicaError> {
        let (team, _) = self.visible(id)?;
        let t = team
            .whatsapp_templates
            .iter()
            .find(|t| t.name == template)
            .ok_or_else(|| ReplicaError::UnknownTemplate(team.id.clone(), template.to_owned()))?;
        let text = fill_whatsapp_template(t, &params)?;
        let body =
            MessageBody::WhatsAppTemplate { template: t.name.clone(), language: t.language.clone(), params, text };
        self.send(id, body, at)
    }

    /// Opens a conversation (what a channel gateway does when a customer first writes, and what an
    /// agent does to start an email thread). The agent must belong to the team.
    pub fn create_conversation(&mut self, new: &NewConversation, first: Option<Message>) -> Result<(), ReplicaError> {
        let team = self
            .teams
            .get(&new.team)
            .ok_or_else(|| ReplicaError::UnknownTeam { conversation: new.id.clone(), team: new.team.clone() })?;
        team.member(&self.agent).ok_or(DomainError::NotAMember)?;
        if self.index.contains_key(&new.id) || store::load_chunks(&self.conn, &new.id)?.is_some() {
            return Err(DocError::Malformed(format!("conversation {} already exists", new.id)).into());
        }
        if let Some(m) = &first {
            m.body.validate()?;
        }
        let mut created = doc::create(self.actor.clone(), new)?;
        if let Some(m) = &first {
            created.transact::<_, _, DocError>(|tx| doc::add_message(tx, m)).map_err(|f| f.error)?;
        }
        let chunk = created.save();
        let messages: Vec<Message> = first.into_iter().collect();
        self.persist(&new.id, &created, &chunk, &messages, true, None)?;
        self.cache.put(new.id.clone(), created);
        Ok(())
    }

    /// Records a customer's message in a conversation this replica holds. Channel gateways on the
    /// relay do this for real customers; replicas use it for demo data and tests.
    pub fn record_customer_message(
        &mut self,
        id: &ConversationId,
        body: MessageBody,
        at: Timestamp,
    ) -> Result<MessageId, ReplicaError> {
        body.validate()?;
        self.visible(id)?;
        let message = Message { id: doc::new_message_id(&mut self.rng), at, author: Author::Customer, body };
        let id_out = message.id.clone();
        self.write_change(id, std::slice::from_ref(&message), None, |tx| doc::add_message(tx, &message))?;
        Ok(id_out)
    }

    /// Web-widget presence as the relay reports it (ephemeral: not part of the document).
    pub fn set_presence(&mut self, id: &ConversationId, presence: Presence) -> Result<(), ReplicaError> {
        let summary = self.index.get_mut(id).ok_or_else(|| ReplicaError::UnknownConversation(id.clone()))?;
        store::set_presence(&self.conn, id, &presence)?;
        Arc::make_mut(summary).presence = presence;
        Ok(())
    }

    /// Applies one agent action to the document and stores change, messages and index row in
    /// one fsynced transaction. On any failure nothing is stored and the cached document is dropped.
    /// An agent's action, made at `at` (this computer's clock, which the judge takes as its own:
    /// only the relay can tell whether that clock is ahead).
    fn local_change<F>(
        &mut self,
        id: &ConversationId,
        messages: &[Message],
        at: Timestamp,
        edit: F,
    ) -> Result<(), ReplicaError>
    where
        F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), DocError>,
    {
        self.write_change(id, messages, Some(at.max(Timestamp::now())), edit)
    }

    /// Makes one change; `judged_at`: an agent's action, which the judge of changes must accept
    /// exactly as the relay will, with the judge's clock at that time (`None` only for what
    /// gateways do on the relay: customer messages in demo data and tests). A refused change is
    /// never stored.
    fn write_change<F>(
        &mut self,
        id: &ConversationId,
        messages: &[Message],
        judged_at: Option<Timestamp>,
        edit: F,
    ) -> Result<(), ReplicaError>
    where
        F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), DocError>,
    {
        let author = match judged_at {
            Some(now) => Some((self.change_author(id)?, now)),
            None => None,
        };
        let mut d = self.take_doc(id)?.ok_or_else(|| ReplicaError::UnknownConversation(id.clone()))?;
        let before = d.get_heads();
        let header_before = doc::read_header(&d).ok();
        d.transact(edit).map_err(|f| f.error)?;
        // The header after the change: read once, for the judge and for the index row.
        let mut header_after = None;
        let mut made = None;
        if let (Some((author, now)), Some(change)) = (author, d.get_last_local_change()) {
            let verdict = conversation::summarize(&d, &change).and_then(|summary| {
                // A change that writes no header field (a message) leaves the header as it was.
                let after = match &header_before {
                    Some(before) if summary.leaves_header() => Some(before.clone()),
                    _ => doc::read_header(&d).ok(),
                };
                conversation::judge(id.as_str(), header_before.as_ref(), after.as_ref(), &summary, &author, now)
                    .map(|()| after)
            });
            // The refused change is only in this copy of the document, which is dropped.
            header_after = verdict?;
            made = Some(change);
        }
        // The chunk is the change just made when it is the only new one (automerge would build it
        // from the document again).
        let chunk = match made {
            Some(c) if d.get_heads() == [c.hash()] && c.deps() == before.as_slice() => c.raw_bytes().to_vec(),
            _ => d.save_after(&before),
        };
        self.persist(id, &d, &chunk, messages, true, header_after)?;
        self.cache.put(id.clone(), d);
        Ok(())
    }

    /// This agent as the judge of changes sees them in a conversation's team.
    fn change_author(&self, id: &ConversationId) -> Result<conversation::ChangeAuthor, ReplicaError> {
        let summary = self.index.get(id).ok_or_else(|| ReplicaError::UnknownConversation(id.clone()))?;
        let team = self
            .teams
            .get(&summary.team)
            .ok_or_else(|| ReplicaError::UnknownTeam { conversation: id.clone(), team: summary.team.clone() })?;
        let role = team.role_of(&self.agent).ok_or(DomainError::NotAMember)?;
        Ok(conversation::ChangeAuthor {
            agent: self.agent.clone(),
            team: team.id.clone(),
            role,
            mode: team.mode,
            foreign_actors: Vec::new(),
            members: std::sync::Arc::new(team.members.clone()),
        })
    }

    // ---- sync ----------------------------------------------------------------------------------

    /// Every document id this replica stores (including documents still waiting for content).
    pub fn document_ids(&self) -> Result<Vec<ConversationId>, ReplicaError> {
        let mut stmt = self.conn.prepare("SELECT DISTINCT doc_id FROM doc_chunks ORDER BY doc_id")?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(ids.collect::<Result<Vec<_>, _>>()?.into_iter().map(ConversationId).collect())
    }

    pub fn heads(&mut self, id: &ConversationId) -> Result<Vec<ChangeHash>, ReplicaError> {
        self.with_doc(id, |d| d.get_heads())
    }

    /// The relay advertised `relay_heads` for a conversation (it only advertises what it has
    /// fsynced): local changes they cover leave the outbox. Returns whether the conversation is
    /// now fully synced.
    pub fn confirm_synced(&mut self, id: &ConversationId, relay_heads: &[ChangeHash]) -> Result<bool, ReplicaError> {
        let Some(pending) = store::outbox_heads(&self.conn, id)? else { return Ok(true) };
        let covered = self.with_doc(id, |d| {
            let known: Vec<ChangeHash> = relay_heads
                .iter()
                .copied()
                .filter(|h| automerge::ReadDoc::get_change_by_hash(d, h).is_some())
                .collect();
            let not_covered: std::collections::HashSet<ChangeHash> =
                d.get_changes(&known).iter().map(|c| c.hash()).collect();
            parse_heads(&pending).iter().all(|h| !not_covered.contains(h))
        })?;
        if covered {
            store::outbox_remove(&self.conn, id, &pending)?;
            store::undelivered_resent_done(&self.conn, id)?;
            self.refusals.remove(id);
        }
        Ok(covered)
    }

    // ---- changes the relay refused -------------------------------------------------------------

    /// The relay refused change `hash` of conversation `id` for `reason` (a rule that changed
    /// while this replica was offline: a grab lost, the conversation closed, the agent removed).
    /// Automerge history cannot drop a change, and every later change of this replica to the
    /// conversation would depend on it and be refused too; so the change and every change
    /// depending on it are taken back out (the document is rebuilt without them), and the messages
    /// they carried are kept aside: sent again once the replica is in sync with the relay
    /// ([`Replica::retry_undelivered`]), or shown as not delivered with the reason. Nothing typed
    /// is lost. Returns how many changes were taken back.
    pub fn take_back_refused(
        &mut self,
        id: &ConversationId,
        hash: ChangeHash,
        reason: &str,
    ) -> Result<usize, ReplicaError> {
        let Some(d) = self.take_doc(id)? else { return Ok(0) };
        if !conversation::has_change(&d, &hash) {
            self.cache.put(id.clone(), d);
            return Ok(0);
        }
        let mut gone: std::collections::HashSet<ChangeHash> = std::collections::HashSet::new();
        let (mut keep, mut taken) = (Vec::new(), Vec::new());
        for c in d.get_changes(&[]) {
            if c.hash() == hash || c.deps().iter().any(|h| gone.contains(h)) {
                gone.insert(c.hash());
                taken.push(c.clone());
            } else {
                keep.push(c.clone());
            }
        }
        let mut removed: Vec<Message> = Vec::new();
        for c in &taken {
            if let Ok(summary) = conversation::summarize(&d, c) {
                removed.extend(summary.added);
            }
        }
        let mut rebuilt = Automerge::new().with_actor(self.actor.clone());
        if let Err(e) = rebuilt.apply_changes(keep) {
            self.cache.put(id.clone(), d);
            return Err(DocError::from(e).into());
        }
        let Ok(header) = doc::read_header(&rebuilt) else {
            // The refused change created the conversation: nothing of it reaches the relay.
            self.cache.put(id.clone(), d);
            return self.abandon_unsynced(id, reason);
        };
        let me = Author::Crew { agent: self.agent.clone() };
        let before = store::undelivered(&self.conn, id)?;
        let previous = self.index.get(id);
        let presence = previous.map(|s| s.presence.clone()).unwrap_or_default();
        let count = previous.map_or(0, |s| s.message_count).saturating_sub(removed.len() as u32);
        let unsynced = store::outbox_changes(&self.conn, id)? - taken.len() as i64;
        let tx = self.conn.transaction()?;
        store::compact(&tx, id, &rebuilt.save())?;
        let ids: Vec<&str> = removed.iter().map(|m| m.id.as_str()).collect();
        store::delete_messages(&tx, id, &ids)?;
        let stats = store::message_stats(&tx, id)?;
        let summary = summarize(header, stats, count, presence);
        store::upsert_summary(&tx, &summary, false)?;
        store::outbox_set(&tx, id, &heads_text(&rebuilt.get_heads()), unsynced)?;
        for m in removed.iter().filter(|m| m.author == me) {
            // Sent once more at most: a message refused again is not delivered.
            let again = before.iter().any(|r| r.message.id == m.id && r.state == "resent");
            store::set_undelivered(&tx, id, m, reason, if again { "failed" } else { "retry" })?;
        }
        tx.commit()?;
        if removed.iter().any(|m| m.author == me) {
            self.to_retry.insert(id.clone());
        }
        self.index.insert(id.clone(), Arc::new(summary));
        self.cache.put(id.clone(), rebuilt);
        tracing::info!(conversation = %id, changes = taken.len(), messages = removed.len(), %reason, "refused changes taken back");
        Ok(taken.len())
    }

    /// The relay will not take this replica's unsynced changes to `id` at all (the conversation
    /// is not shared with this agent any more, or its creation was refused): the outbox lets them
    /// go, and the messages they carried are shown as not delivered with `reason`. The document
    /// stays as it is here. Returns how many changes were let go.
    pub fn abandon_unsynced(&mut self, id: &ConversationId, reason: &str) -> Result<usize, ReplicaError> {
        let n = usize::try_from(store::outbox_changes(&self.conn, id)?).unwrap_or(0);
        if n == 0 {
            return Ok(0);
        }
        let Some(d) = self.take_doc(id)? else { return Ok(0) };
        let me = Author::Crew { agent: self.agent.clone() };
        let mut messages: Vec<Message> = Vec::new();
        let mine: Vec<automerge::Change> =
            d.get_changes(&[]).into_iter().filter(|c| *c.actor_id() == self.actor).collect();
        for c in mine.iter().rev().take(n) {
            if let Ok(summary) = conversation::summarize(&d, c) {
                messages.extend(summary.added.into_iter().filter(|m| m.author == me));
            }
        }
        self.cache.put(id.clone(), d);
        let tx = self.conn.transaction()?;
        store::outbox_set(&tx, id, "", 0)?;
        for m in &messages {
            store::set_undelivered(&tx, id, m, reason, "failed")?;
        }
        tx.commit()?;
        tracing::info!(conversation = %id, changes = n, messages = messages.len(), %reason, "unsynced changes let go");
        Ok(n)
    }

    /// Sends again the messages of `id` that a refusal took back, now that the replica is in sync
    /// with the relay: each as it was typed (same id, time and body) if the rules allow it now,
    /// else it stays as not delivered with the reason. Returns whether anything changed.
    pub fn retry_undelivered(&mut self, id: &ConversationId) -> Result<bool, ReplicaError> {
        if !self.to_retry.remove(id) {
            return Ok(false);
        }
        let rows = store::undelivered(&self.conn, id)?;
        let mut changed = false;
        for row in rows.into_iter().filter(|r| r.state == "retry") {
            changed = true;
            // Refused here too: shown with the relay's reason (what changed while offline).
            let state = match self.send_again(id, &row.message) {
                Ok(()) => "resent",
                Err(_) => "failed",
            };
            let reason = row.reason;
            let tx = self.conn.transaction()?;
            store::set_undelivered(&tx, id, &row.message, &reason, state)?;
            tx.commit()?;
        }
        Ok(changed)
    }

    /// Whether messages of `id` wait to be sent again once the replica is in sync.
    pub fn has_undelivered_to_retry(&self, id: &ConversationId) -> bool {
        self.to_retry.contains(id)
    }

    fn send_again(&mut self, id: &ConversationId, m: &Message) -> Result<(), ReplicaError> {
        let now = Timestamp::now();
        let (team, summary) = self.visible(id)?;
        access::may_send(team, &self.agent, summary, &m.body, now)?;
        self.local_change(id, std::slice::from_ref(m), now, |tx| doc::add_message(tx, m))
    }

    /// Messages of `id` the relay refused that are not delivered (or wait to be sent again).
    pub fn undelivered(&self, id: &ConversationId) -> Result<Vec<store::UndeliveredRow>, ReplicaError> {
        Ok(store::undelivered(&self.conn, id)?.into_iter().filter(|r| r.state != "resent").collect())
    }

    /// The agent has read (or copied) a message that was not delivered: it goes.
    pub fn dismiss_undelivered(&mut self, id: &ConversationId, message: &MessageId) -> Result<(), ReplicaError> {
        store::forget_undelivered(&self.conn, id, message.as_str())
    }

    /// The relay refused a change of this replica to `id`, for `reason`.
    pub fn note_refusal(&mut self, id: &ConversationId, reason: &str) {
        if self.index.contains_key(id) {
            self.refusals.insert(id.clone(), reason.to_owned());
        }
    }

    /// Why the relay refused this replica's last refused change to `id`, while it is not synced.
    pub fn refusal(&self, id: &ConversationId) -> Option<&str> {
        self.refusals.get(id).map(String::as_str)
    }

    /// Remembers that an attachment picked here must reach the relay's blob store.
    pub fn queue_blob_upload(&mut self, id: &ConversationId, hash: &BlobHash, mime: &str) -> Result<(), ReplicaError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO blob_uploads (doc_id, hash, mime, queued_at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![id.as_str(), hash.as_str(), mime, Timestamp::now().0],
        )?;
        Ok(())
    }

    /// Attachments waiting for upload, oldest first: (conversation, file, type). A row that
    /// names no well-formed file (a damaged database) is skipped.
    pub fn pending_blob_uploads(&self) -> Result<Vec<(ConversationId, BlobHash, String)>, ReplicaError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT doc_id, hash, mime FROM blob_uploads ORDER BY queued_at, doc_id, hash")?;
        let rows = stmt.query_map([], |r| Ok((ConversationId(r.get(0)?), r.get::<_, String>(1)?, r.get(2)?)))?;
        let rows: Vec<(ConversationId, String, String)> = rows.collect::<Result<_, _>>()?;
        Ok(rows.into_iter().filter_map(|(id, hash, mime)| Some((id, BlobHash::parse(&hash).ok()?, mime))).collect())
    }

    /// The relay has the attachment (or refused it for good): stop trying.
    pub fn blob_upload_done(&mut self, id: &ConversationId, hash: &BlobHash) -> Result<(), ReplicaError> {
        self.conn.execute("DELETE FROM blob_uploads WHERE doc_id = ?1 AND hash = ?2", [id.as_str(), hash.as_str()])?;
        Ok(())
    }

    /// Local changes not yet durable on the relay: how many, and in which conversations.
    pub fn unsynced(&self) -> Result<(usize, Vec<ConversationId>), ReplicaError> {
        store::outbox_total(&self.conn)
    }

    /// How many of this document's changes `peer_heads` do not cover (unknown hashes ignored):
    /// with the relay's advertised heads, the changes not yet durable on the relay.
    pub fn changes_not_covered(
        &mut self,
        id: &ConversationId,
        peer_heads: &[ChangeHash],
    ) -> Result<usize, ReplicaError> {
        self.with_doc(id, |d| {
            let known: Vec<ChangeHash> =
                peer_heads.iter().copied().filter(|h| automerge::ReadDoc::get_change_by_hash(d, h).is_some()).collect();
            d.get_changes(&known).len()
        })
    }

    /// Changes after `heads` in automerge's binary format (all of them when `heads` is empty).
    pub fn changes_since(&mut self, id: &ConversationId, heads: &[ChangeHash]) -> Result<Vec<u8>, ReplicaError> {
        self.with_doc(id, |d| d.save_after(heads))
    }

    /// The whole document (an automerge save).
    pub fn document_bytes(&mut self, id: &ConversationId) -> Result<Vec<u8>, ReplicaError> {
        self.with_doc(id, |d| d.save())
    }

    /// Merges changes from another replica (or the relay). Corrupt bytes or a document from a newer
    /// schema are refused with an error and leave the stored replica untouched.
    pub fn apply_changes(&mut self, id: &ConversationId, bytes: &[u8]) -> Result<Applied, ReplicaError> {
        let changes = doc::parse_changes(bytes)?;
        self.merge_remote(id, |d| d.apply_changes(changes))
    }

    pub fn generate_sync_message(
        &mut self,
        id: &ConversationId,
        state: &mut sync::State,
    ) -> Result<Option<sync::Message>, ReplicaError> {
        let d = self.take_doc(id)?.unwrap_or_else(|| Automerge::new().with_actor(self.actor.clone()));
        let message = d.generate_sync_message(state);
        self.cache.put(id.clone(), d);
        Ok(message)
    }

    /// Merges an automerge sync message. On error the caller must reset `state` (the peer's view of
    /// us may now be wrong); the stored replica is untouched.
    pub fn receive_sync_message(
        &mut self,
        id: &ConversationId,
        state: &mut sync::State,
        message: sync::Message,
    ) -> Result<Applied, ReplicaError> {
        self.merge_remote(id, |d| d.receive_sync_message(state, message))
    }

    fn merge_remote<F>(&mut self, id: &ConversationId, merge: F) -> Result<Applied, ReplicaError>
    where
        F: FnOnce(&mut Automerge) -> Result<(), AutomergeError>,
    {
        let known = self.index.contains_key(id);
        let mut d = self.take_doc(id)?.unwrap_or_else(|| Automerge::new().with_actor(self.actor.clone()));
        let before = d.get_heads();
        merge(&mut d).map_err(DocError::from)?;
        let after = d.get_heads();
        if after == before {
            self.cache.put(id.clone(), d);
            return Ok(Applied::NothingNew);
        }
        let chunk = d.save_after(&before);
        let summary = if doc::check_schema(&d)? {
            let messages = if known { doc::messages_added(&d, &before, &after)? } else { doc::all_messages(&d)? };
            Some(Box::new(self.persist(id, &d, &chunk, &messages, false, None)?))
        } else {
            // Changes that do not yet create the conversation: keep them, index nothing.
            let tx = self.conn.transaction()?;
            store::append_chunk(&tx, id, &chunk)?;
            tx.commit()?;
            None
        };
        self.cache.put(id.clone(), d);
        Ok(Applied::Stored { summary })
    }

    /// Writes chunk, new messages and the recomputed index row in one transaction, then updates the
    /// in-memory index. Returns the new row.
    fn persist(
        &mut self,
        id: &ConversationId,
        d: &Automerge,
        chunk: &[u8],
        messages: &[Message],
        local: bool,
        header: Option<doc::DocHeader>,
    ) -> Result<ConversationSummary, ReplicaError> {
        let header = match header {
            Some(h) => h,
            None => doc::read_header(d)?,
        };
        if &header.id != id {
            return Err(DocError::Malformed(format!("document {id} claims to be conversation {}", header.id)).into());
        }
        let previous = self.index.get(id);
        let presence = previous.map(|s| s.presence.clone()).unwrap_or_default();
        let previous_count = previous.map_or(0, |s| s.message_count);
        let customer_changed = previous.is_none_or(|s| s.customer != header.customer);
        let tx = self.conn.transaction()?;
        store::append_chunk(&tx, id, chunk)?;
        let added = store::insert_messages(&tx, id, messages)?;
        let stats = store::message_stats(&tx, id)?;
        let summary = summarize(header, stats, previous_count + added, presence);
        store::upsert_summary(&tx, &summary, customer_changed)?;
        if local {
            store::outbox_add(&tx, id, &heads_text(&d.get_heads()))?;
        }
        tx.commit()?;
        self.index.insert(id.clone(), Arc::new(summary.clone()));
        Ok(summary)
    }

    fn with_doc<T>(&mut self, id: &ConversationId, f: impl FnOnce(&Automerge) -> T) -> Result<T, ReplicaError> {
        let d = self.take_doc(id)?.ok_or_else(|| ReplicaError::UnknownConversation(id.clone()))?;
        let out = f(&d);
        self.cache.put(id.clone(), d);
        Ok(out)
    }

    /// Takes a document out of the cache, loading it from SQLite if needed. Callers put it back
    /// only after its changes are stored, so a failure can never leave a cached document ahead of
    /// the stored one.
    fn take_doc(&mut self, id: &ConversationId) -> Result<Option<Automerge>, ReplicaError> {
        if let Some(d) = self.cache.take(id) {
            return Ok(Some(d));
        }
        let Some((bytes, chunks)) = store::load_chunks(&self.conn, id)? else {
            return Ok(None);
        };
        let d = Automerge::load(&bytes).map_err(DocError::from)?.with_actor(self.actor.clone());
        if chunks > COMPACT_AFTER_CHUNKS {
            let tx = self.conn.transaction()?;
            store::compact(&tx, id, &d.save())?;
            tx.commit()?;
        }
        Ok(Some(d))
    }

    // ---- inspection (tests, benchmarks, diagnostics) -------------------------------------------

    /// Index rows as stored in SQLite, in id order (what convergence tests compare).
    pub fn stored_summaries(&self) -> Result<Vec<ConversationSummary>, ReplicaError> {
        let mut rows = store::load_summaries(&self.conn)?;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    /// Materialized messages of a conversation, in (at, id) order, without access checks.
    pub fn stored_messages(&self, id: &ConversationId) -> Result<Vec<Message>, ReplicaError> {
        store::messages(&self.conn, id)
    }

    /// Messages read from the automerge document itself (slow path; for verification).
    pub fn document_messages(&mut self, id: &ConversationId) -> Result<Vec<Message>, ReplicaError> {
        self.with_doc(id, doc::all_messages)?.map_err(Into::into)
    }

    /// Imports whole documents (demo data, benchmarks) in one transaction: much faster than one
    /// commit per conversation. Each is validated exactly like a remote change.
    pub fn import_documents(
        &mut self,
        docs: impl IntoIterator<Item = (ConversationId, Vec<u8>)>,
    ) -> Result<usize, ReplicaError> {
        let tx = self.conn.transaction()?;
        let mut rows = Vec::new();
        for (id, bytes) in docs {
            let d = Automerge::load(&bytes).map_err(DocError::from)?;
            if !doc::check_schema(&d)? || store::load_chunks(&tx, &id)?.is_some() {
                return Err(DocError::Malformed(format!("conversation {id} is empty or already present")).into());
            }
            let header = doc::read_header(&d)?;
            if header.id != id {
                return Err(
                    DocError::Malformed(format!("document {id} claims to be conversation {}", header.id)).into()
                );
            }
            let messages = doc::all_messages(&d)?;
            store::append_chunk(&tx, &id, &bytes)?;
            let added = store::insert_messages(&tx, &id, &messages)?;
            let stats = store::message_stats(&tx, &id)?;
            let summary = summarize(header, stats, added, Presence::default());
            store::upsert_summary(&tx, &summary, true)?;
            rows.push(summary);
        }
        tx.commit()?;
        let n = rows.len();
        for s in rows {
            self.index.insert(s.id.clone(), Arc::new(s));
        }
        Ok(n)
    }

    /// The customer of a conversation (for templates and the 📄 form).
    pub fn customer(&self, id: &ConversationId) -> Result<Customer, ReplicaError> {
        Ok(self.visible(id)?.1.customer.clone())
    }
}

/// The index row of a conversation: its document's header plus the message-derived figures.
fn summarize(
    header: doc::DocHeader,
    stats: store::MessageStats,
    message_count: u32,
    presence: Presence,
) -> ConversationSummary {
    ConversationSummary {
        id: header.id,
        team: header.team,
        channel: header.channel,
        customer: header.customer,
        created_at: header.created_at,
        last_message: stats.last_message,
        last_customer_message_at: stats.last_customer_message_at,
        last_crew_message_at: stats.last_crew_message_at,
        waiting_since: stats.waiting_since,
        crew_in_room: header.crew_in_room,
        closed_at: header.closed_at,
        owner: header.owner,
        grab_requests: header.grab_requests.into_iter().map(|(a, _)| a).collect(),
        message_count,
        presence,
        handover: stats.handover,
    }
}

fn heads_text(heads: &[ChangeHash]) -> String {
    heads.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",")
}

fn parse_heads(text: &str) -> Vec<ChangeHash> {
    text.split(',').filter_map(|h| h.parse().ok()).collect()
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}
