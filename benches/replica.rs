//! Replica benchmark at 10k conversations / 500k messages: list + filter + counts, opening a
//! 1k-message conversation, durable send, size on disk and RSS. Prints a table; run with
//! `cargo bench --bench replica` (CREWDESK_BENCH_CONVERSATIONS / _MESSAGES to change the scale).
//!
//! The machine's speed changes by 2x from hour to hour, so the run also measures the floor on the
//! same disk in the same run: raw SQLite with the same shape (a conversations table of the same size
//! listed and counted with indexes; one fsynced insert of a message row in WAL with
//! `synchronous=FULL`), and prints each figure as a ratio to it.

use crewdesk::demo::{self, DemoSpec};
use crewdesk::domain::filter::{Filter, Selection, View};
use crewdesk::domain::status::Status;
use crewdesk::domain::{AgentId, MessageBody, Timestamp};
use crewdesk::replica::Replica;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l[field.len()..].trim().to_owned()))
        .unwrap_or_else(|| "n/a".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

fn main() {
    let conversations = env_usize("CREWDESK_BENCH_CONVERSATIONS", 10_000);
    let per_conversation = env_usize("CREWDESK_BENCH_MESSAGES", 50);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.sqlite3");
    let mut ada = Replica::open(&path, AgentId::from("ada")).expect("open");
    let now = Timestamp::now();

    let started = Instant::now();
    demo::fill(&mut ada, &DemoSpec { conversations, messages_per_conversation: per_conversation, seed: 1 }, now)
        .expect("demo data");
    // One long conversation of 1,000 messages to open.
    let long = demo::long_conversation(conversations, 1_000, now).expect("long conversation");
    let long_id = long.id.clone();
    let bytes = long.document.save();
    ada.import_documents([(long_id.clone(), bytes)]).expect("import long");
    let generated = started.elapsed();
    let total_messages = conversations * per_conversation.max(2) + 1_000;

    // List + filter + all counts, for every entry of the red block.
    let mut selections: Vec<Selection> = vec![Selection::View(View::AllChatroom), Selection::View(View::Joined)];
    selections.extend(Status::ALL.into_iter().map(Selection::Status));
    // Warm up (first touches of the index pages), then measure.
    for sel in &selections {
        let _ = ada.list(&Filter { selection: *sel, ..Filter::default() }, now);
    }
    let mut list_samples = Vec::new();
    let mut listed = 0;
    for round in 0..50 {
        for sel in &selections {
            let filter =
                Filter { selection: *sel, team: (round % 2 == 1).then(|| demo::SUPPORT.into()), ..Filter::default() };
            let t = Instant::now();
            let l = ada.list(&filter, now);
            list_samples.push(t.elapsed());
            listed = listed.max(l.total);
        }
    }

    // Open the 1,000-message conversation (index row + materialized messages).
    let mut open_samples = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let detail = ada.conversation(&long_id, now).expect("open");
        open_samples.push(t.elapsed());
        assert_eq!(detail.messages.len(), 1_000);
    }

    // Durable send: automerge change + chunk + message row + index row, fsynced commit.
    ada.join(&long_id, now).ok();
    let target = demo::conversation_id(2);
    ada.join(&target, now).ok();
    let mut send_samples = Vec::new();
    for i in 0..1_000 {
        let id = if i % 2 == 0 { &long_id } else { &target };
        let t = Instant::now();
        ada.send(id, MessageBody::Text { text: format!("benchmark reply {i}") }, now.plus(i)).expect("send");
        send_samples.push(t.elapsed());
    }

    // Search (full-text index over message text and customer details), offline.
    let mut search_samples = Vec::new();
    let queries = ["delivery address", "Maya", "example.com", "invoice", "Norway", "charged twice", "4471", "Hansen"];
    let mut hits = 0;
    for round in 0..25 {
        for q in queries {
            let filter = Filter { team: (round % 2 == 1).then(|| demo::SALES.into()), ..Filter::default() };
            let t = Instant::now();
            let l = ada.list_search(&filter, now, q).expect("search");
            search_samples.push(t.elapsed());
            hits = hits.max(l.total);
        }
    }

    let (floor_list, floor_insert) = floor(dir.path(), conversations, per_conversation);
    let mut floor_list = floor_list;
    let mut floor_insert = floor_insert;

    let size: u64 = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", path.display())).ok())
        .map(|m| m.len())
        .sum();

    println!("Crewdesk replica benchmark");
    println!("machine: {}", machine());
    println!(
        "data: {conversations} conversations, {total_messages} messages (generated and imported in {:.1} s)",
        generated.as_secs_f64()
    );
    println!();
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let (list_p99, floor_list_p99) = (percentile(&mut list_samples, 0.99), percentile(&mut floor_list, 0.99));
    let (send_p99, floor_insert_p99) = (percentile(&mut send_samples, 0.99), percentile(&mut floor_insert, 0.99));
    println!("| floor (raw SQLite, same shape, same disk, same run) | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| list + counts: {conversations} conversation rows, the first 200 by activity and a count per status (indexed) | {} | {} |",
        ms(percentile(&mut floor_list, 0.5)),
        ms(floor_list_p99)
    );
    println!(
        "| one fsynced insert of a message row (WAL, synchronous=FULL) | {} | {} |",
        ms(percentile(&mut floor_insert, 0.5)),
        ms(floor_insert_p99)
    );
    println!();
    println!(
        "ratios to the floor (p99): list + counts {:.2}x (target ≤ 2.5x), durable send {:.2}x (target ≤ 3x)",
        ratio(list_p99, floor_list_p99),
        ratio(send_p99, floor_insert_p99)
    );
    println!();
    println!("| measure | p50 | p99 | target |");
    println!("|---|---|---|---|");
    println!(
        "| list + filter + all counts ({} samples, up to {listed} matches) | {} | {} | p99 < 5 ms |",
        list_samples.len(),
        ms(percentile(&mut list_samples, 0.5)),
        ms(list_p99)
    );
    println!(
        "| open a 1,000-message conversation | {} | {} | < 10 ms |",
        ms(percentile(&mut open_samples, 0.5)),
        ms(percentile(&mut open_samples, 0.99))
    );
    println!("| durable send (fsynced) | {} | {} | p99 < 1 ms |", ms(percentile(&mut send_samples, 0.5)), ms(send_p99));
    println!(
        "| search (name, email, phone, message text; {} samples, up to {hits} matches) | {} | {} | < 20 ms |",
        search_samples.len(),
        ms(percentile(&mut search_samples, 0.5)),
        ms(percentile(&mut search_samples, 0.99))
    );
    // The app's start: the replica opened again (its index read into memory), page cache warm.
    drop(ada);
    let (mut reopen, mut first_list) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let started = Instant::now();
        let r = Replica::open(&path, AgentId::from("ada")).expect("open again");
        reopen.push(started.elapsed());
        let started = Instant::now();
        r.list_search(&Filter { limit: 64, ..Filter::default() }, Timestamp::now(), "").expect("first list");
        first_list.push(started.elapsed());
    }
    println!(
        "| open the replica again (the app's start, warm page cache; 3 samples) | {} | {} (max) | the app's cold start < 1 s |",
        ms(percentile(&mut reopen, 0.5)),
        ms(percentile(&mut reopen, 1.0))
    );
    println!(
        "| its first list (64 rows and all counts, right after opening; 3 samples) | {} | {} (max) | |",
        ms(percentile(&mut first_list, 0.5)),
        ms(percentile(&mut first_list, 1.0))
    );
    println!();
    println!("replica on disk: {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    println!("RSS: {} (peak {})", proc_status("VmRSS:"), proc_status("VmHWM:"));
}

/// The floor, on the same disk: raw SQLite with the shape the replica's list and send need.
/// Returns the samples of list + counts (400) and of one fsynced message insert (1,000).
fn floor(dir: &std::path::Path, conversations: usize, per_conversation: usize) -> (Vec<Duration>, Vec<Duration>) {
    let db = rusqlite::Connection::open(dir.join("floor.sqlite3")).expect("floor database");
    db.pragma_update(None, "journal_mode", "WAL").expect("WAL");
    db.pragma_update(None, "synchronous", "FULL").expect("synchronous");
    db.execute_batch(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, team TEXT NOT NULL, status INTEGER NOT NULL,
             last_activity INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
         CREATE INDEX by_activity ON conversations (last_activity);
         CREATE INDEX by_team_status ON conversations (team, status);
         CREATE TABLE messages (conversation_id TEXT NOT NULL, at INTEGER NOT NULL, id TEXT NOT NULL,
             author_kind TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (conversation_id, at, id)) WITHOUT ROWID;",
    )
    .expect("floor schema");
    {
        let tx = db.unchecked_transaction().expect("tx");
        let summary = "x".repeat(400);
        for i in 0..conversations {
            tx.execute(
                "INSERT INTO conversations VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    format!("c{i:06}"),
                    if i % 2 == 0 { "sales" } else { "support" },
                    (i % 7) as i64,
                    i as i64,
                    summary
                ],
            )
            .expect("floor row");
        }
        // The message rows of a few conversations, so inserts land in a table of realistic depth.
        let body = "y".repeat(200);
        for i in 0..conversations.min(1_000) * per_conversation.max(1) {
            tx.execute(
                "INSERT INTO messages VALUES (?1, ?2, ?3, 'customer', ?4)",
                rusqlite::params![format!("c{:06}", i % conversations.max(1)), i as i64, format!("m{i}"), body],
            )
            .expect("floor message");
        }
        tx.commit().expect("floor commit");
    }
    let mut list = Vec::new();
    for round in 0..400 {
        let t = Instant::now();
        let team = if round % 2 == 0 { "sales" } else { "support" };
        let mut rows = db
            .prepare_cached("SELECT id, body FROM conversations ORDER BY last_activity DESC LIMIT 200")
            .expect("list")
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .expect("rows")
            .count();
        let counts: Vec<(i64, i64)> = db
            .prepare_cached("SELECT status, count(*) FROM conversations WHERE team = ?1 GROUP BY status")
            .expect("counts")
            .query_map([team], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("counts")
            .collect::<Result<_, _>>()
            .expect("counts");
        rows += counts.len();
        list.push(t.elapsed());
        assert!(rows > 0);
    }
    let mut insert = Vec::new();
    let body = "z".repeat(200);
    for i in 0..1_000 {
        let t = Instant::now();
        db.execute(
            "INSERT INTO messages VALUES ('c000002', ?1, ?2, 'crew', ?3)",
            rusqlite::params![1_000_000_000 + i as i64, format!("floor{i}"), body],
        )
        .expect("floor insert");
        insert.push(t.elapsed());
    }
    (list, insert)
}
