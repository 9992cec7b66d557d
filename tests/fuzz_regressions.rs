//! The fuzz targets' corpus and regression inputs, run as ordinary tests: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same body as under
//! libFuzzer (`fuzz/targets.rs`), so what fuzzing once covered or found stays fixed without
//! cargo-fuzz. The generated seeds run too, and must reach what they were made for.
#![cfg(feature = "replica")]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

/// Runs every file of the target's corpus and regression folders; returns how many ran.
fn run_committed(target: &str) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(folder).join(target)) else { continue };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| targets::run(target, &data));
            assert!(outcome.is_ok(), "{} fails (rerun: cargo fuzz run {target} {})", path.display(), path.display());
            ran += 1;
        }
    }
    ran
}

#[test]
fn wire_frame_corpus() {
    assert!(run_committed("wire_frame") > 0, "the corpus of wire_frame is empty");
}

#[test]
fn sync_message_corpus() {
    assert!(run_committed("sync_message") > 0, "the corpus of sync_message is empty");
}

#[test]
fn judge_sequence_corpus() {
    assert!(run_committed("judge_sequence") > 0, "the corpus of judge_sequence is empty");
}

#[test]
fn message_body_corpus() {
    assert!(run_committed("message_body") > 0, "the corpus of message_body is empty");
}

#[test]
fn seeds_pass_and_sync_seeds_reach_the_judge() {
    let seeds = targets::seeds();
    for target in targets::TARGETS {
        assert!(seeds.iter().any(|(t, _, _)| *t == target), "no seed for {target}");
    }
    for (target, name, data) in &seeds {
        let outcome = std::panic::catch_unwind(|| targets::run(target, data));
        assert!(outcome.is_ok(), "seed {target}/{name} fails");
    }
    // The sync seeds are real messages: each gets past the bounded check and automerge's parser to
    // the judge, and the judge both accepts and refuses some of them.
    let (mut accepted, mut refused) = (0, 0);
    for (_, name, data) in seeds.iter().filter(|(t, _, _)| *t == "sync_message") {
        let verdict =
            targets::sync_message_verdict(data).unwrap_or_else(|| panic!("seed {name} stops before the judge"));
        accepted += verdict.accepted.len();
        refused += usize::from(verdict.refused.is_some());
    }
    assert!(accepted > 0 && refused > 0, "{accepted} changes accepted, {refused} refused");
}
