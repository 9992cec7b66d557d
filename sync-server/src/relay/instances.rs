//! Several relay instances on one PostgreSQL store: applying what the others committed, passing
//! presence and ephemeral messages on, limits counted for the whole deployment.

#[allow(unused_imports)]
use super::*;

/// Follows the other relay instances sharing the store until the relay stops.
pub(super) async fn follow_instances(
    relay: Arc<Relay>,
    mut events: mpsc::Receiver<crate::store::StoreEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    // Whatever else is waiting goes in the same batch.
                    let mut batch = vec![event];
                    while batch.len() < 4096 {
                        match events.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    relay.on_instance_events(batch).await;
                }
                None => return,
            },
            _ = stopped(&mut stop) => return,
        }
    }
}

impl Relay {
    /// Applies chunks other instances stored (up to position `last`) and passes them on.
    pub(super) fn apply_remote(&self, e: &mut DocEntry, bytes: &[u8], last: i64) -> Result<(), StoreError> {
        if !e.core.is_stored() {
            return Ok(());
        }
        // Chunks read since an older position may repeat what is in memory: automerge skips those.
        e.seq = e.seq.max(last);
        match e.core.apply_stored(bytes) {
            Ok(actions) => {
                // Frames only (changes that waited for these are judged with their sender's next
                // message, which this advertisement prompts).
                self.send_frames(actions);
                Ok(())
            }
            Err(err) => {
                e.loaded = false;
                Err(StoreError::Invalid(err))
            }
        }
    }

    /// Applies a batch of what other instances report. Commits are grouped by document and taken
    /// in the order they were committed: a commit whose note carries its chunks, and follows
    /// directly on what this instance holds, is applied from the note; this instance's own commits
    /// move its position on. Whatever is left, every loaded document's missing chunks are read in
    /// one query. A resync (the notification channel was reopened) counts as a commit of every
    /// loaded document, then announces the conversations created meanwhile.
    pub(super) async fn on_instance_events(&self, batch: Vec<crate::store::StoreEvent>) {
        use crate::store::StoreEvent;
        let mut committed: std::collections::BTreeMap<String, Notes> = Default::default();
        let mut resync_since: Option<i64> = None;
        let (started, events) = (Instant::now(), batch.len());
        for event in batch {
            match event {
                StoreEvent::Committed { doc_id, team, seq, created, prev, bytes, own } => {
                    let c = committed.entry(doc_id).or_default();
                    c.last = c.last.max(seq);
                    if created && !own {
                        c.created = Some(team);
                    }
                    c.others |= !own;
                    c.notes.push(Note { prev, seq, bytes, own });
                }
                StoreEvent::Resync { since } => {
                    let loaded: Vec<String> =
                        self.docs.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                    for doc_id in loaded {
                        let c = committed.entry(doc_id).or_default();
                        c.last = i64::MAX;
                        c.others = true;
                    }
                    resync_since = Some(resync_since.map_or(since, |s| s.min(since)));
                }
                StoreEvent::Presence { doc_id, presence } => self.show_presence(&doc_id, presence).await,
                StoreEvent::Typing { doc_id, crew } => self.show_typing(&doc_id, crew, None).await,
                StoreEvent::Ephemeral { doc_id, sender_id, count, session_id, data } => {
                    let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&doc_id).cloned();
                    if let Some(entry) = entry {
                        forward_ephemeral(
                            &self.sessions,
                            &*entry.lock().await,
                            None,
                            &sender_id,
                            &doc_id,
                            count,
                            &session_id,
                            &data,
                        );
                    }
                }
            }
        }
        // Each loaded document takes what its notes carry, then says where it is. Documents busy
        // with their own commits are waited for together, not one after the other.
        let work: Vec<(String, i64, Vec<Note>)> =
            committed.iter_mut().map(|(d, c)| (d.clone(), c.last, std::mem::take(&mut c.notes))).collect();
        let positions = futures_util::future::join_all(work.into_iter().map(|(doc_id, last, notes)| async move {
            let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&doc_id).cloned();
            let Some(entry) = entry else { return (doc_id, last, None) };
            let at = {
                let mut e = entry.lock().await;
                self.apply_notes(&doc_id, &mut e, notes);
                e.core.is_stored().then_some(e.seq)
            };
            (doc_id, last, at.map(|at| (at, entry)))
        }))
        .await;
        let waited = started.elapsed();
        let mut behind = Vec::new();
        let mut announce = Vec::new();
        for (doc_id, seq, loaded) in positions {
            match (loaded, &committed[&doc_id].created) {
                (Some((at, entry)), _) if at < seq => behind.push((doc_id, at, entry)),
                (Some(_), _) => {}
                (None, Some(team)) => announce.push((doc_id, team.clone())),
                (None, None) => {}
            }
        }
        let read = behind.len();
        if !behind.is_empty() {
            let wanted: Vec<(String, i64)> = behind.iter().map(|(d, at, _)| (d.clone(), *at)).collect();
            match self.blocking(move |s| s.chunks_since_many(&wanted)).await {
                Ok(found) => {
                    let found = &found;
                    futures_util::future::join_all(behind.into_iter().map(|(doc_id, _, entry)| async move {
                        let Some((bytes, last)) = found.get(&doc_id) else { return };
                        let mut e = entry.lock().await;
                        if let Err(err) = self.apply_remote(&mut e, bytes, *last) {
                            warn!(%doc_id, %err, "cannot apply another instance's change");
                        }
                    }))
                    .await;
                }
                Err(err) => warn!(%err, "cannot read other instances' changes"),
            }
        }
        for (doc_id, team) in announce {
            self.announce_remote(&doc_id, &team).await;
        }
        for (doc_id, c) in committed {
            if c.others {
                self.widgets.changed(&doc_id);
            }
        }
        if let Some(since) = resync_since {
            match self.blocking(move |s| s.documents_since(since)).await {
                Ok(created) => {
                    for (doc_id, team) in created {
                        self.announce_remote(&doc_id, &team).await;
                    }
                }
                Err(err) => warn!(%err, "cannot list new conversations"),
            }
        }
        debug!(
            events,
            read,
            lock_wait_ms = waited.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "other instances' events applied"
        );
    }

    /// Takes a loaded document's commit notes in order while each follows on its position: its
    /// own commits move the position on, others' apply the chunks they carry. It stops at the first
    /// note that does not follow (a position this instance has not reached, or chunks too large to
    /// carry): the rest is read from the database.
    fn apply_notes(&self, doc_id: &str, e: &mut DocEntry, notes: Vec<Note>) {
        if !e.core.is_stored() {
            return;
        }
        for note in notes {
            if note.prev != Some(e.seq) {
                return;
            }
            match (note.own, note.bytes) {
                (true, _) => e.seq = note.seq,
                (false, Some(bytes)) => {
                    if let Err(err) = self.apply_remote(e, &bytes, note.seq) {
                        warn!(%doc_id, %err, "cannot apply another instance's change");
                        return;
                    }
                }
                (false, None) => return,
            }
        }
    }

    /// A conversation another instance stored: followed here when agents of its team are here.
    pub(super) async fn announce_remote(&self, doc_id: &str, team: &TeamId) {
        if self.team_sessions(team).is_empty() {
            return;
        }
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        if let Err(err) = self.ensure_loaded(doc_id, &mut e).await {
            warn!(%doc_id, %err, "cannot load a conversation another instance created");
            return;
        }
        self.announce_loaded(&mut e);
    }

    /// Passes an event (presence, an ephemeral message) to the other relay instances, if any.
    pub(super) async fn tell_instances(&self, event: crate::store::StoreEvent) {
        if !self.shared {
            return;
        }
        if let Err(err) = self.blocking(move |s| s.publish(&event)).await {
            warn!(%err, "not passed to the other relay instances");
        }
    }

    /// A limit counted in the shared store when instances share one, else by this process.
    pub(super) async fn allow_shared(
        &self,
        key: String,
        max: usize,
        window_ms: i64,
        local: impl FnOnce() -> bool,
    ) -> bool {
        if !self.shared {
            return local();
        }
        match self.blocking(move |s| s.allow_event(&key, max, window_ms)).await {
            Ok(Some(allowed)) => allowed,
            Ok(None) => local(),
            Err(err) => {
                warn!(%err, "shared rate limit unavailable; counting on this instance");
                local()
            }
        }
    }
}

/// One commit of a document, as its note told it.
struct Note {
    prev: Option<i64>,
    seq: i64,
    bytes: Option<Vec<u8>>,
    own: bool,
}

/// A batch's notes about one document.
#[derive(Default)]
struct Notes {
    /// The last position announced (`i64::MAX` after a resync: read everything).
    last: i64,
    /// The team, when another instance created the conversation in this batch.
    created: Option<TeamId>,
    /// Whether any note came from another instance (or a resync).
    others: bool,
    notes: Vec<Note>,
}
