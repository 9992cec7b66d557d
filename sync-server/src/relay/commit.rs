//! The group commit: every chunk waiting when the previous commit finished goes into one
//! transaction and one fsync; each caller hears only once its chunk is durable.

#[allow(unused_imports)]
use super::*;

/// A chunk waiting for the group commit, and who to tell when it is on disk.
pub(super) struct Commit {
    pub(super) doc: String,
    pub(super) team: TeamId,
    pub(super) chunk: Vec<u8>,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Group commit: every chunk waiting when the previous commit finished goes into one transaction
/// and one fsync. Each caller is answered only after its chunk is durable.
pub(super) async fn committer(store: Arc<Store>, mut rx: mpsc::Receiver<Commit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let store = store.clone();
        let started = Instant::now();
        let (batch, result) = tokio::task::spawn_blocking(move || {
            let rows: Vec<(&str, &TeamId, &[u8])> =
                batch.iter().map(|c| (c.doc.as_str(), &c.team, c.chunk.as_slice())).collect();
            let result = store.append_chunks(&rows).map_err(|e| e.to_string());
            (batch, result)
        })
        .await
        .unwrap_or_else(|e| (Vec::new(), Err(e.to_string())));
        debug!(chunks = batch.len(), ms = started.elapsed().as_secs_f64() * 1e3, "group commit");
        for c in batch {
            let _ = c.done.send(result.clone());
        }
    }
}

impl Relay {
    /// Stores a chunk durably (group commit); returns once it is fsynced.
    pub(super) async fn commit(&self, doc: &str, team: &TeamId, chunk: Vec<u8>) -> Result<(), String> {
        let wait = self.enqueue_commit(doc, team, chunk).await?;
        wait.await.map_err(|_| "the relay is shutting down".to_owned())?
    }

    /// Hands a chunk to the group commit; the receiver answers once it is durable.
    pub(super) async fn enqueue_commit(
        &self,
        doc: &str,
        team: &TeamId,
        chunk: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let c = Commit { doc: doc.to_owned(), team: team.clone(), chunk, done };
        self.commits.send(c).await.map_err(|_| "the relay is shutting down".to_owned())?;
        Ok(wait)
    }
}
