//! The IO around each document's sync core (`crewdesk::sync::relay_doc::RelayDoc`): reading it
//! from storage, finding the facts the judge needs (role, team mode, whose actors), carrying out the
//! core's actions (frames, commits, fan-outs, grab decisions), eviction.

#[allow(unused_imports)]
use super::*;

/// Bound actors kept in memory; beyond this the map starts over (it is a cache of the store).
pub(super) const MAX_CACHED_ACTORS: usize = 100_000;

/// One document on this relay: its sync logic (sans IO, in the core) and what the IO around it
/// needs to know.
pub(super) struct DocEntry {
    /// Whether storage was read (the document may be absent there: a conversation in creation).
    pub(super) loaded: bool,
    /// The position of the last stored chunk in memory (other instances' chunks after it are
    /// read when they announce them).
    pub(super) seq: i64,
    pub(super) core: RelayDoc,
    /// Places taken by connections creating this document (see `MAX_PENDING_PER_CONNECTION`).
    pub(super) slots: HashMap<ConnId, PendingSlot>,
}

/// Documents one connection may be creating at once; more are answered as unavailable, so a client
/// cannot make the relay hold any number of unfinished documents in memory.
pub(super) const MAX_PENDING_PER_CONNECTION: usize = 64;

/// One of a connection's documents in creation; dropping it frees the place.
pub(super) struct PendingSlot(Arc<AtomicUsize>);

impl PendingSlot {
    pub(super) fn take(count: &Arc<AtomicUsize>) -> Option<PendingSlot> {
        let before = count.fetch_add(1, Ordering::SeqCst);
        let slot = PendingSlot(count.clone());
        (before < MAX_PENDING_PER_CONNECTION).then_some(slot)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Loaded documents by when they were last used: touching one and finding the least recently used
/// are O(log n), so a client asking for many documents costs no sorting per message.
#[derive(Default)]
pub(super) struct Recent {
    pub(super) tick_of: HashMap<String, u64>,
    pub(super) by_tick: std::collections::BTreeMap<u64, String>,
}

impl Recent {
    /// Marks `id` as used at `tick`; returns the least recently used documents beyond `max`.
    pub(super) fn touch(&mut self, id: &str, tick: u64, max: usize) -> Vec<String> {
        if let Some(old) = self.tick_of.insert(id.to_owned(), tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(tick, id.to_owned());
        let mut out = Vec::new();
        while self.tick_of.len() > max {
            let Some((_, oldest)) = self.by_tick.pop_first() else { break };
            self.tick_of.remove(&oldest);
            out.push(oldest);
        }
        out
    }

    pub(super) fn remove(&mut self, id: &str) {
        if let Some(tick) = self.tick_of.remove(id) {
            self.by_tick.remove(&tick);
        }
    }
}

/// A conversation read from more chunks than this is merged into one when it is loaded.
pub(super) const COMPACT_AFTER_CHUNKS: usize = 100;

/// Changes arriving within this window are fanned out together: one message per peer carries
/// them all. Everything sent is still committed first.
pub(super) const FANOUT_COALESCE: std::time::Duration = std::time::Duration::from_millis(3);

/// A client's sync message, checked against [`SyncLimits::CLIENT`] before automerge parses it,
/// and the changes it carries (decompressed within the limits and verified).
pub(super) fn parse_client_sync(data: &[u8]) -> Result<(sync::Message, Vec<automerge::Change>), String> {
    let checked = bounded::check_sync_message(data, &SyncLimits::CLIENT)
        .map_err(|e| format!("the sync message is malformed or over a limit ({e})"))?;
    let message = sync::Message::decode(data).map_err(|e| format!("the sync message is malformed ({e})"))?;
    let changes = checked
        .changes
        .iter()
        .map(|c| automerge::Change::try_from(c.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a change is malformed ({e})"))?;
    Ok((message, changes))
}

impl Relay {
    pub(super) async fn ensure_loaded(&self, id: &str, e: &mut DocEntry) -> Result<(), StoreError> {
        if e.loaded || e.core.is_stored() {
            e.loaded = true;
            return Ok(());
        }
        let owned = id.to_owned();
        if let Some(loaded) = self.blocking(move |s| s.load_document_at(&owned)).await? {
            let doc = Automerge::load(&loaded.bytes)
                .map_err(|err| StoreError::Invalid(format!("stored document {id} is unreadable: {err}")))?;
            e.core.load(doc, loaded.team);
            e.seq = loaded.seq;
            if loaded.chunks > COMPACT_AFTER_CHUNKS {
                // Every commit adds a chunk; merge them in the background so the next load is one
                // read of one save. The store merges exactly what it holds, in one transaction.
                let (store, id) = (self.store.clone(), id.to_owned());
                tokio::task::spawn_blocking(move || match store.compact_stored(&id) {
                    Ok(n) if n > 0 => debug!(doc_id = %id, chunks = n, "conversation compacted"),
                    Ok(_) => {}
                    Err(err) => warn!(doc_id = %id, %err, "conversation not compacted"),
                });
            }
            e.loaded = true;
            // A grab asked for just before the relay stopped is decided when the conversation is
            // read again (the simulator found grab requests left without an owner after a crash).
            if let Err(reason) = self.decide_grab(id, e).await {
                warn!(doc_id = %id, %reason, "grab not decided");
            }
        }
        e.loaded = true;
        Ok(())
    }

    /// A `request` or `sync` from a connection. Every sync message is checked against the limits
    /// of [`SyncLimits::CLIENT`] before automerge parses it; what it means for the document is
    /// decided by the core's [`RelayDoc`] (which judges every change on its own with the core's
    /// judge); this function finds the facts it needs (who the agent is in the team, the team's
    /// mode, whose actors the changes use) and carries out what it decides.
    pub(super) async fn handle_sync(
        self: &Arc<Self>,
        session: &Session,
        doc_id: String,
        data: Vec<u8>,
        is_request: bool,
    ) {
        let unavailable = || WireMessage::DocUnavailable {
            sender_id: self.peer_id.clone(),
            target_id: session.peer_id.clone(),
            document_id: doc_id.clone(),
        };
        if !document_id::is_valid(&doc_id) {
            session.send(unavailable());
            return;
        }
        let (message, changes) = match parse_client_sync(&data) {
            Ok(parsed) => parsed,
            Err(e) => {
                info!(%doc_id, agent = %session.agent.id, %e, "sync message refused");
                session.error(&self.peer_id, format!("document {doc_id}: {e}; the sync message was ignored"));
                return;
            }
        };
        if !changes.is_empty() && self.refusals.is_full(&session.agent.id) {
            // Judged nothing more: each refusal costs taking the change back out.
            too_many_refusals(session);
            return;
        }
        let entry = self.entry(&doc_id);
        let mut guard = entry.lock().await;
        if let Err(err) = self.ensure_loaded(&doc_id, &mut guard).await {
            warn!(%doc_id, %err, "cannot load document");
            session.error(
                &self.peer_id,
                format!("document {doc_id}: the relay could not read this conversation; try again later"),
            );
            return;
        }
        let e = &mut *guard;
        let (conn, peer_id) = (session.conn, session.peer_id.as_str());
        let claim = match e.core.team() {
            Some(team) => {
                if session.agent.role_in(team).is_none() {
                    // Exactly like a missing document: no existence leak.
                    session.send(unavailable());
                    return;
                }
                if !e.core.follows(conn)
                    && let Some(p) = self.presence_of(&doc_id)
                {
                    // A new follower of this conversation hears the customer's presence at once.
                    session.send(self.presence_message(&doc_id, peer_id, &p));
                }
                Claim::Team(team.clone())
            }
            None => {
                if let std::collections::hash_map::Entry::Vacant(v) = e.slots.entry(conn) {
                    let Some(slot) = PendingSlot::take(&session.pending) else {
                        session.send(unavailable());
                        return;
                    };
                    v.insert(slot);
                }
                match changes.is_empty() {
                    true => Claim::Empty,
                    false => e.core.claim(conn, &changes),
                }
            }
        };
        let waiting = &session.waiting;
        let refused_read = || format!("document {doc_id}: the relay could not read this conversation; try again later");
        let actions = match claim {
            _ if changes.is_empty() => e.core.receive(
                Incoming { conn, peer_id, message, changes, is_request, author: None, waiting },
                Timestamp::now(),
            ),
            Claim::Team(team) => match session.agent.role_in(&team) {
                None => e.core.unavailable(conn, peer_id),
                Some(role) => {
                    let Some(author) = self.author(&session.agent.id, team, role, &changes).await else {
                        session.error(&self.peer_id, refused_read());
                        return;
                    };
                    e.core.receive(
                        Incoming { conn, peer_id, message, changes, is_request, author: Some(&author), waiting },
                        Timestamp::now(),
                    )
                }
            },
            Claim::Empty => {
                // No conversation in it yet: automerge-repo clients start a document with an
                // empty change, kept until the layout arrives.
                let Some(author) =
                    self.author(&session.agent.id, TeamId::default(), Role::Representative, &changes).await
                else {
                    session.error(&self.peer_id, refused_read());
                    return;
                };
                e.core.receive(
                    Incoming { conn, peer_id, message, changes, is_request, author: Some(&author), waiting },
                    Timestamp::now(),
                )
            }
            Claim::NotConversation => e.core.unavailable(conn, peer_id),
            Claim::Unreadable(why) => {
                info!(%doc_id, agent = %session.agent.id, %why, "new conversation refused");
                e.core.refuse_creation(conn, peer_id, &why)
            }
        };
        self.perform(&entry, guard, actions).await;
    }

    /// Who sent `changes`, as the judge needs to know them. `None` when storage cannot be reached.
    pub(super) async fn author(
        &self,
        agent: &AgentId,
        team: TeamId,
        role: Role,
        changes: &[automerge::Change],
    ) -> Option<ChangeAuthor> {
        let (mode, members) = match team == TeamId::default() {
            true => (TeamMode::Open, Arc::default()),
            false => self.team_rules(&team).await?,
        };
        let foreign_actors = self.foreign_actors(agent, changes).await?;
        Some(ChangeAuthor { agent: agent.clone(), team, role, mode, foreign_actors, members })
    }

    /// The actors of `changes` that are bound to someone other than `agent` (binding the ones
    /// nobody used yet to `agent`). `None` when the store cannot be reached.
    pub(super) async fn foreign_actors(&self, agent: &AgentId, changes: &[automerge::Change]) -> Option<Vec<ActorId>> {
        let mut unknown: Vec<String> = Vec::new();
        let mut foreign = Vec::new();
        {
            let known = self.actors.lock().unwrap_or_else(|p| p.into_inner());
            for actor in changes.iter().map(automerge::Change::actor_id) {
                let hex = actor.to_hex_string();
                match known.get(&hex) {
                    Some(owner) if owner != agent => foreign.push(actor.clone()),
                    Some(_) => {}
                    None if !unknown.contains(&hex) => unknown.push(hex),
                    None => {}
                }
            }
        }
        if unknown.is_empty() {
            return Some(foreign);
        }
        let (who, asked) = (agent.clone(), unknown.clone());
        let owners = self.blocking(move |s| s.bind_actors(&who, &asked)).await.ok()?;
        let mut known = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() + owners.len() > MAX_CACHED_ACTORS {
            known.clear();
        }
        for (hex, owner) in unknown.into_iter().zip(owners) {
            if owner != *agent
                && let Some(c) = changes.iter().find(|c| c.actor_id().to_hex_string() == hex)
            {
                foreign.push(c.actor_id().clone());
            }
            known.insert(hex, owner);
        }
        Some(foreign)
    }

    /// How a team works (open or grab mode), read from storage at most every few seconds.
    pub(super) async fn team_rules(&self, team: &TeamId) -> Option<(TeamMode, Arc<Vec<crewdesk::domain::Member>>)> {
        const FRESH: std::time::Duration = std::time::Duration::from_secs(5);
        {
            let rules = self.team_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((mode, members, at)) = rules.get(team)
                && at.elapsed() < FRESH
            {
                return Some((*mode, members.clone()));
            }
        }
        let teams = self.blocking(|s| s.teams()).await.ok()?;
        let now = Instant::now();
        let mut rules = self.team_cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for t in teams {
            let entry = (t.mode, Arc::new(t.members), now);
            if t.id == *team {
                found = Some((entry.0, entry.1.clone()));
            }
            rules.insert(t.id, entry);
        }
        found
    }

    /// Carries out what a document's core decided, in order, until nothing is left: frames go to
    /// their connections, chunks are committed (the document's lock is released while the commit
    /// waits for its fsync, so other agents' changes join the same group commit), fan-outs are
    /// scheduled, the channels hear of stored messages and grabs are decided.
    pub(super) async fn perform(
        self: &Arc<Self>,
        entry: &Arc<AsyncMutex<DocEntry>>,
        mut guard: tokio::sync::MutexGuard<'_, DocEntry>,
        actions: Vec<Action>,
    ) {
        let doc_id = guard.core.id().to_owned();
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(conn, message) => {
                    let session = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&conn).cloned();
                    match session {
                        Some(s) if !s.tx.is_closed() => s.send(message),
                        _ => guard.core.disconnect(conn),
                    }
                }
                Action::Commit { ticket, team, chunk, changes, messages } => {
                    let wait = self.enqueue_commit(&doc_id, &team, chunk, changes, messages, None).await;
                    let result = match wait {
                        Ok(wait) => {
                            drop(guard);
                            let result = wait.await.unwrap_or_else(|_| Err("the relay is shutting down".to_owned()));
                            guard = entry.lock().await;
                            result
                        }
                        Err(e) => Err(e),
                    };
                    queue.extend(guard.core.committed(ticket, result));
                }
                Action::ScheduleFanout => self.schedule_fanout(entry),
                Action::Reload => guard.loaded = false,
                Action::Created { team } => {
                    for s in self.team_sessions(&team) {
                        guard.core.follow(s.conn, &s.peer_id);
                    }
                    // A conversation an agent started by email: its first messages go out too.
                    if let (Some(Ok(header)), Some(d)) = (guard.core.header(), guard.core.doc())
                        && header.channel == crewdesk::domain::Channel::Email
                    {
                        let all = doc::all_messages(d).unwrap_or_default();
                        self.queue_email_reply(&doc_id, &team, &all, &header).await;
                    }
                    self.widgets.changed(&doc_id);
                    if let Err(reason) = self.decide_grab(&doc_id, &mut guard).await {
                        warn!(%doc_id, %reason, "grab not decided");
                    }
                    queue.extend(guard.core.advertise());
                }
                Action::Stored { added } => {
                    self.widgets.changed(&doc_id);
                    let e = &mut *guard;
                    match e.core.header() {
                        Some(Ok(header)) => {
                            let team = header.team.clone();
                            self.queue_email_fallback(&doc_id, &team, &added, &header).await;
                            self.queue_email_reply(&doc_id, &team, &added, &header).await;
                            if let Some(d) = e.core.doc() {
                                self.queue_whatsapp(&doc_id, d, &added, &header).await;
                            }
                            if let Err(reason) = self.decide_grab(&doc_id, e).await {
                                warn!(%doc_id, %reason, "grab not decided");
                            }
                        }
                        Some(Err(err)) => warn!(%doc_id, %err, "a stored conversation cannot be read"),
                        None => {}
                    }
                }
                Action::Missing if self.shared => {
                    // The changes may build on what another instance committed and this one has
                    // not read yet (an agent who moved between instances): read it now.
                    let wanted = vec![(doc_id.clone(), guard.seq)];
                    if let Ok(found) = self.blocking(move |s| s.chunks_since_many(&wanted)).await
                        && let Some((bytes, last)) = found.get(&doc_id)
                    {
                        guard.seq = guard.seq.max(*last);
                        match guard.core.apply_stored(bytes) {
                            Ok(more) => {
                                queue.extend(more);
                                queue.extend(guard.core.retry_deferred(Timestamp::now()));
                            }
                            Err(err) => {
                                warn!(%doc_id, %err, "cannot apply another instance's change");
                                guard.loaded = false;
                            }
                        }
                    }
                }
                Action::Missing => {}
                Action::Refused(conn) => {
                    let session = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&conn).cloned();
                    if let Some(session) = session
                        && !self.refusals.allow(session.agent.id.clone())
                    {
                        too_many_refusals(&session);
                    }
                }
            }
        }
        let e = &mut *guard;
        e.slots.retain(|conn, _| e.core.is_pending(*conn));
    }

    /// Calls the core's fan-out shortly (changes arriving meanwhile go out with it).
    pub(super) fn schedule_fanout(self: &Arc<Self>, entry: &Arc<AsyncMutex<DocEntry>>) {
        let (relay, entry) = (self.clone(), entry.clone());
        tokio::spawn(async move {
            tokio::time::sleep(FANOUT_COALESCE).await;
            let mut e = entry.lock().await;
            let doc_id = e.core.id().to_owned();
            if let Err(err) = relay.ensure_loaded(&doc_id, &mut e).await {
                warn!(%doc_id, %err, "cannot reload document for fan-out");
            }
            let actions = e.core.fanout();
            relay.perform(&entry, e, actions).await;
        });
    }

    /// Sends every follower what it needs now (nothing while a commit is in progress: its fan-out
    /// follows). Only frames come out of an advertisement.
    pub(super) fn advertise_now(&self, e: &mut DocEntry) {
        self.send_frames(e.core.advertise());
    }

    /// Sends the frames among `actions` to their connections at once (for actions that are only
    /// frames: advertisements, other instances' changes).
    pub(super) fn send_frames(&self, actions: Vec<Action>) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for action in actions {
            if let Action::Send(conn, message) = action
                && let Some(s) = sessions.get(&conn)
            {
                s.send(message);
            }
        }
    }

    /// Grab-mode teams: the first grab request the relay received wins; the winner is written
    /// into the conversation by the relay (and stored) before anyone hears of it.
    pub(super) async fn decide_grab(&self, doc_id: &str, e: &mut DocEntry) -> Result<(), String> {
        let Some(Ok(header)) = e.core.header() else { return Ok(()) };
        if header.owner.is_some() || header.grab_requests.is_empty() {
            return Ok(());
        }
        let teams = self.blocking(|s| s.teams()).await.map_err(|e| e.to_string())?;
        let Some(team) = teams.into_iter().find(|t| t.id == header.team) else { return Ok(()) };
        if team.mode != TeamMode::Grab {
            return Ok(());
        }
        // Requests that arrived together are ordered by the time they were made.
        let mut requests = header.grab_requests;
        requests.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let agents: Vec<AgentId> = requests.into_iter().map(|(a, _)| a).collect();
        let id = doc_id.to_owned();
        let order = self.blocking(move |s| s.log_grabs(&id, &agents)).await.map_err(|e| e.to_string())?;
        let Some(winner) = decide_grab(None, &team, &order).cloned() else { return Ok(()) };
        let chunk = e.core.relay_change(|tx| doc::record_owner(tx, &winner))?;
        if let Err(err) = self.commit(doc_id, &header.team, chunk).await {
            e.core.unload();
            e.loaded = false;
            return Err(err);
        }
        info!(%doc_id, %winner, "grab decided");
        Ok(())
    }

    /// Makes a conversation the relay stored itself live: every connected agent of its team follows
    /// it (the followers it already has keep their sync state) and hears of it now.
    pub(super) fn announce_loaded(&self, e: &mut DocEntry) {
        let Some(team) = e.core.team().cloned() else { return };
        for s in self.team_sessions(&team) {
            e.core.follow(s.conn, &s.peer_id);
        }
        self.advertise_now(e);
    }

    pub(super) fn team_sessions(&self, team: &TeamId) -> Vec<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.values().filter(|s| s.agent.role_in(team).is_some()).cloned().collect()
    }

    /// Marks a document as just used and drops the least recently used loaded documents beyond
    /// `max_loaded_documents`. Their sync states stay; the document is read again when needed.
    pub(super) async fn touch(&self, id: &str) {
        let tick = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let evict =
            self.recent.lock().unwrap_or_else(|p| p.into_inner()).touch(id, tick, self.config.max_loaded_documents);
        for doc_id in evict {
            let entry = self.entry(&doc_id);
            // A document being worked on right now stays; it is evicted on a later pass.
            let Ok(mut e) = entry.try_lock() else { continue };
            if e.slots.is_empty() && e.core.unload() {
                e.loaded = false;
            }
            drop(e);
            drop(entry);
            self.forget_if_unused(&doc_id);
        }
    }

    /// Removes a document's entry when nobody syncs it and no task holds it, so memory follows the
    /// active documents. Checked under the map's lock, so no second entry can appear meanwhile.
    pub(super) fn forget_if_unused(&self, id: &str) {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        let idle = docs
            .get(id)
            .is_some_and(|entry| Arc::strong_count(entry) == 1 && entry.try_lock().is_ok_and(|e| e.core.is_idle()));
        if idle {
            docs.remove(id);
            self.recent.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }
}

/// Ends a connection whose agent's changes were refused too often.
fn too_many_refusals(session: &Session) {
    info!(agent = %session.agent.id, "closing a connection whose changes keep being refused");
    session.hangup.hang_up(Hangup {
        code: close::TOO_MANY_REFUSALS,
        reason: "too many refused changes".into(),
        error: Some(format!(
            "too many refused changes ({MAX_REFUSALS} a minute): the relay reads no more changes from this agent for a while"
        )),
    });
}
