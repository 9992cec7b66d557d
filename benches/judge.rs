//! What the judge of changes costs on the relay, against the floor: automerge applying the same
//! changes to the same conversation and the conversation's header read once after each (what any
//! relay that looks at a change does at least), measured in the same run. A conversation of
//! `CREWDESK_BENCH_JUDGE_MESSAGES` messages (default 1,000) gets 2,000 changes from agents in the
//! room, one at a time as the relay gets them: each is applied (floor) or applied and judged
//! (`conversation::apply_judged`). Also: one refused change (the document is rebuilt without it).
//! Run with `cargo bench --bench judge`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed run

use automerge::{ActorId, Automerge, Change};
use crewdesk::domain::{Channel, Customer, CustomerId, Message, MessageBody, MessageId, Role, TeamMode, Timestamp};
use crewdesk::replica::conversation::{self, ChangeAuthor};
use crewdesk::replica::doc;
use std::time::{Duration, Instant};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn message(id: String, agent: &str, text: String) -> Message {
    Message {
        id: MessageId(id),
        at: Timestamp::now(),
        author: doc::crew(&agent.into()),
        body: MessageBody::Text { text },
    }
}

fn main() {
    let size: usize = std::env::var("CREWDESK_BENCH_JUDGE_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let id = crewdesk::sync::document_id::encode(&[1; 16]);
    let new = doc::NewConversation {
        id: id.as_str().into(),
        team: "sales".into(),
        channel: Channel::WebWidget,
        customer: Customer { id: CustomerId("c".into()), name: "Jane".into(), email: None, phone: None, notes: None },
        created_at: Timestamp::now(),
    };
    let mut base = doc::create(ActorId::random(), &new).unwrap();
    let agents = ["bob", "carol"];
    base.transact::<_, _, doc::DocError>(|tx| agents.iter().try_for_each(|a| doc::set_in_room(tx, &(*a).into(), true)))
        .unwrap();
    for n in 0..size {
        let m = message(format!("old{n}"), agents[n % 2], format!("message {n} of the history"));
        base.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
    }
    // The changes two agents send, alternating, each on the other's last change (as they arrive at
    // the relay: every change's dependencies are the document's heads).
    let mut writer = base.fork();
    let actors = [ActorId::random(), ActorId::random()];
    let changes: Vec<(usize, Change)> = (0..2_000)
        .map(|n| {
            writer.set_actor(actors[n % 2].clone());
            let m = message(format!("new{n}"), agents[n % 2], format!("reply number {n}, with a few words of text"));
            writer.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
            (n % 2, writer.get_last_local_change().unwrap())
        })
        .collect();
    let author = |i: usize| ChangeAuthor {
        agent: agents[i].into(),
        team: "sales".into(),
        role: Role::Representative,
        mode: TeamMode::Open,
        foreign_actors: Vec::new(),
        members: Default::default(),
    };
    let authors = [author(0), author(1)];

    let run = |judged: bool| -> Vec<Duration> {
        let mut d: Automerge = base.fork();
        // The relay keeps the headers it read (`Stored::headers`).
        let mut headers = conversation::Headers::default();
        changes
            .iter()
            .map(|(who, c)| {
                let started = Instant::now();
                if judged {
                    let v = conversation::apply_judged_with(
                        &mut d,
                        id.as_str(),
                        vec![c.clone()],
                        &authors[*who],
                        Timestamp::now(),
                        &mut headers,
                    );
                    assert!(v.refused.is_none(), "{:?}", v.refused);
                } else {
                    // What any relay that looks at a change does at least: apply it, read the header.
                    d.apply_changes([c.clone()]).unwrap();
                    std::hint::black_box(doc::read_header(&d).unwrap());
                }
                started.elapsed()
            })
            .collect()
    };
    // Alternate the two, three rounds each, so both see the same machine.
    let (mut floor, mut judged) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        floor.extend(run(false));
        judged.extend(run(true));
    }
    let (f50, f99) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.99));
    let (j50, j99) = (percentile(&mut judged, 0.5), percentile(&mut judged, 0.99));
    let (ft, jt): (Duration, Duration) = (floor.iter().sum(), judged.iter().sum());

    // A refused change: applied, judged, and taken back out (the document rebuilt at its heads).
    let mut refused = Vec::new();
    for n in 0..20 {
        let mut d = base.fork();
        let mut forger = base.fork();
        let m =
            Message { author: crewdesk::domain::Author::Customer, ..message(format!("f{n}"), "bob", "forged".into()) };
        forger.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
        let c = forger.get_last_local_change().unwrap();
        let started = Instant::now();
        let v = conversation::apply_judged(&mut d, id.as_str(), vec![c], &authors[0], Timestamp::now());
        refused.push(started.elapsed());
        assert!(v.refused.is_some());
    }
    let r50 = percentile(&mut refused, 0.5);

    // Where the judge's time goes: reading the header, and reading what a change does.
    let mut d = base.fork();
    let (mut header, mut summary) = (Vec::new(), Vec::new());
    for (_, c) in changes.iter().take(500) {
        d.apply_changes([c.clone()]).unwrap();
        let started = Instant::now();
        doc::read_header(&d).unwrap();
        header.push(started.elapsed());
        let started = Instant::now();
        conversation::summarize(&d, c).unwrap();
        summary.push(started.elapsed());
    }
    let (h50, s50) = (percentile(&mut header, 0.5), percentile(&mut summary, 0.5));
    if std::env::var_os("CREWDESK_BENCH_JUDGE_STEPS").is_some() {
        let mut d = base.fork();
        let mut t = [Duration::ZERO; 5];
        for (who, c) in changes.iter().take(1000) {
            let s0 = Instant::now();
            let before = doc::read_header(&d).ok();
            let s1 = Instant::now();
            d.apply_changes([c.clone()]).unwrap();
            let s2 = Instant::now();
            let after = doc::read_header(&d).ok();
            let s3 = Instant::now();
            let sum = conversation::summarize(&d, c).unwrap();
            let s4 = Instant::now();
            conversation::judge(id.as_str(), before.as_ref(), after.as_ref(), &sum, &authors[*who], Timestamp::now())
                .unwrap();
            let s5 = Instant::now();
            for (i, (a, b)) in [(s0, s1), (s1, s2), (s2, s3), (s3, s4), (s4, s5)].into_iter().enumerate() {
                t[i] += b - a;
            }
        }
        println!("steps over 1,000 changes (before header, apply, after header, summarize, judge): {t:?}");
        let h = d.get_heads();
        let s0 = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(conversation::has_change(&d, &h[0]));
        }
        let s1 = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(d.get_heads());
        }
        println!("has_change x1000 {:?}, get_heads x1000 {:?}", s1 - s0, s1.elapsed());
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("Judge of changes against the floor (automerge applying the same change and reading the header),");
    println!("{size}-message conversation,");
    println!("2,000 changes x 3 rounds each, {cores} cores, release build:");
    println!();
    println!("| measure | p50 | p99 | total |");
    println!("|---|---|---|---|");
    println!(
        "| floor: `apply_changes` + one header read | {} | {} | {:.1} ms |",
        us(f50),
        us(f99),
        ft.as_secs_f64() * 1e3
    );
    println!(
        "| `apply_judged` (apply + summarize + judge) | {} | {} | {:.1} ms |",
        us(j50),
        us(j99),
        jt.as_secs_f64() * 1e3
    );
    println!("| refused change (apply, judge, rebuild without it) | {} | | |", us(r50));
    println!("| of which: reading the conversation's header once | {} | | |", us(h50));
    println!("| of which: reading what one change does (`summarize`) | {} | | |", us(s50));
    println!();
    println!(
        "judged / floor: p50 {:.2}x, total {:.2}x; judge overhead per change {}",
        j50.as_secs_f64() / f50.as_secs_f64(),
        jt.as_secs_f64() / ft.as_secs_f64(),
        us((jt.saturating_sub(ft)) / floor.len() as u32)
    );
}
