//! The group commit: every chunk waiting when the previous commit finished goes into one
//! transaction and one fsync; each caller hears only once its chunk is durable.

#[allow(unused_imports)]
use super::*;
use crate::store::NewChunk;
use crewdesk::sync::relay_doc::{ChangeSeq, MessageTime};

/// A chunk waiting for the group commit, and who to tell when it is on disk.
pub(super) struct Commit {
    pub(super) doc: String,
    pub(super) team: TeamId,
    pub(super) chunk: Vec<u8>,
    /// The client changes in the chunk (their places are checked by the store).
    pub(super) changes: Vec<ChangeSeq>,
    /// The messages those changes add (their relay time is stored beside their `at`).
    pub(super) messages: Vec<MessageTime>,
    /// A mail this chunk takes in: its UID and thread are recorded in the same transaction.
    pub(super) mail: Option<crate::store::TakenMail>,
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
            let rows: Vec<NewChunk<'_>> = batch
                .iter()
                .map(|c| NewChunk {
                    doc: &c.doc,
                    team: &c.team,
                    bytes: &c.chunk,
                    changes: &c.changes,
                    messages: &c.messages,
                    mail: c.mail.as_ref(),
                })
                .collect();
            let result = store.append_chunks(&rows).map_err(|e| e.to_string());
            (batch, result)
        })
        .await
        .unwrap_or_else(|e| (Vec::new(), Err(e.to_string())));
        debug!(chunks = batch.len(), ms = started.elapsed().as_secs_f64() * 1e3, "group commit");
        for (i, c) in batch.into_iter().enumerate() {
            let answer = match &result {
                Ok(stored) if stored.get(i).copied().unwrap_or(true) => Ok(()),
                Ok(_) => {
                    warn!(doc_id = %c.doc, "a change takes the place of another change of its actor; refused");
                    Err("a change with the same actor and sequence number is stored already".to_owned())
                }
                Err(e) => Err(e.clone()),
            };
            let _ = c.done.send(answer);
        }
    }
}

impl Relay {
    /// Stores a chunk durably (group commit); returns once it is fsynced.
    pub(super) async fn commit(&self, doc: &str, team: &TeamId, chunk: Vec<u8>) -> Result<(), String> {
        self.commit_reading(doc, team, chunk, None).await
    }

    /// [`Relay::commit`], recording the mail the chunk takes in (its UID, Message-ID and thread) in
    /// the same transaction.
    pub(super) async fn commit_reading(
        &self,
        doc: &str,
        team: &TeamId,
        chunk: Vec<u8>,
        mail: Option<crate::store::TakenMail>,
    ) -> Result<(), String> {
        let wait = self.enqueue_commit(doc, team, chunk, Vec::new(), Vec::new(), mail).await?;
        wait.await.map_err(|_| "the relay is shutting down".to_owned())?
    }

    /// Hands a chunk to the group commit; the receiver answers once it is durable.
    pub(super) async fn enqueue_commit(
        &self,
        doc: &str,
        team: &TeamId,
        chunk: Vec<u8>,
        changes: Vec<ChangeSeq>,
        messages: Vec<MessageTime>,
        mail: Option<crate::store::TakenMail>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let c = Commit { doc: doc.to_owned(), team: team.clone(), chunk, changes, messages, mail, done };
        self.commits.send(c).await.map_err(|_| "the relay is shutting down".to_owned())?;
        Ok(wait)
    }
}
