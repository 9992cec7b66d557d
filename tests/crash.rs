//! A process killed with SIGKILL right after acknowledged writes loses none of them.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::*;
use crewdesk::demo;
use crewdesk::domain::{AgentId, Channel, ConversationId, Timestamp};
use crewdesk::replica::Replica;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "CREWDESK_CRASH_CHILD_DIR";

/// The writer, run in a child process by `sigkill_after_acknowledged_writes_loses_nothing`:
/// sends messages as fast as it can and prints each id once `send` has returned.
#[test]
#[ignore = "runs only as the child process of the SIGKILL test"]
fn crash_child_writer() {
    let dir = std::env::var(CHILD_ENV).expect("child directory");
    let mut bob = open(std::path::Path::new(&dir), "bob");
    let id = ConversationId::from("crash");
    bob.create_conversation(
        &new_conversation("crash", demo::SALES, Channel::Email),
        Some(customer_message("m0", T0, "Hi")),
    )
    .unwrap();
    bob.join(&id, T0).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 1.. {
        let mid = bob.send(&id, text(&format!("message {i}")), T0.plus(i * Timestamp::SECOND)).unwrap();
        writeln!(out, "ack {mid}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_after_acknowledged_writes_loses_nothing() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child_writer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acked = Vec::new();
        let target = 40 + round * 60;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(mid) = line.strip_prefix("ack ") {
                acked.push(mid.to_owned());
                if acked.len() == target {
                    // std's Child::kill sends SIGKILL on Unix: no destructors, no flush.
                    child.kill().unwrap();
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(acked.len(), target, "the writer stopped early");
        let mut bob = Replica::open(db_path(dir.path(), "bob"), AgentId::from("bob")).unwrap();
        let id = ConversationId::from("crash");
        let stored: Vec<String> = bob.stored_messages(&id).unwrap().into_iter().map(|m| m.id.0).collect();
        let in_document: Vec<String> = bob.document_messages(&id).unwrap().into_iter().map(|m| m.id.0).collect();
        for mid in &acked {
            assert!(stored.contains(mid), "acknowledged message {mid} lost from the index");
            assert!(in_document.contains(mid), "acknowledged message {mid} lost from the document");
        }
        assert_eq!(stored, in_document, "index and document agree after the crash");
        let summary = bob.summary(&id).unwrap();
        assert_eq!(summary.message_count as usize, stored.len());
        // The replica keeps working after the crash.
        bob.send(&id, text("after the crash"), T0.plus(Timestamp::HOUR)).unwrap();
    }
}
