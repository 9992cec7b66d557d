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

    /// Applies a batch of what other instances report. Commits are grouped by document, and the
    /// chunks every loaded document misses are read in one query. A resync (the notification
    /// channel was reopened) counts as a commit of every loaded document, then announces the
    /// conversations created meanwhile.
    pub(super) async fn on_instance_events(&self, batch: Vec<crate::store::StoreEvent>) {
        use crate::store::StoreEvent;
        // Per document: the last position announced and, for a new conversation, its team.
        let mut committed: std::collections::BTreeMap<String, (i64, Option<TeamId>)> = Default::default();
        let mut resync_since: Option<i64> = None;
        let (started, events) = (Instant::now(), batch.len());
        for event in batch {
            match event {
                StoreEvent::Committed { doc_id, team, seq, created } => {
                    let c = committed.entry(doc_id).or_insert((seq, None));
                    c.0 = c.0.max(seq);
                    if created {
                        c.1 = Some(team);
                    }
                }
                StoreEvent::Resync { since } => {
                    let loaded: Vec<String> =
                        self.docs.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                    for doc_id in loaded {
                        committed.entry(doc_id).or_insert((i64::MAX, None)).0 = i64::MAX;
                    }
                    resync_since = Some(resync_since.map_or(since, |s| s.min(since)));
                }
                StoreEvent::Presence { doc_id, presence } => self.show_presence(&doc_id, presence).await,
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
        // Where each loaded document is. Documents busy with their own commits are waited for
        // together, not one after the other.
        let positions = futures_util::future::join_all(committed.iter().map(|(doc_id, (seq, _))| async move {
            let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(doc_id).cloned();
            let Some(entry) = entry else { return (doc_id, *seq, None) };
            let at = {
                let e = entry.lock().await;
                e.core.is_stored().then_some(e.seq)
            };
            (doc_id, *seq, at.map(|at| (at, entry)))
        }))
        .await;
        let waited = started.elapsed();
        let mut behind = Vec::new();
        let mut announce = Vec::new();
        for (doc_id, seq, loaded) in positions {
            match (loaded, &committed[doc_id].1) {
                (Some((at, entry)), _) if at < seq => behind.push((doc_id.clone(), at, entry)),
                (Some(_), _) => {}
                (None, Some(team)) => announce.push((doc_id.clone(), team.clone())),
                (None, None) => {}
            }
        }
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
        for doc_id in committed.into_keys() {
            self.widgets.changed(&doc_id);
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
            lock_wait_ms = waited.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "other instances' events applied"
        );
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
