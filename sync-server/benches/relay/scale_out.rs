//! Scale-out: one relay instance against three over one PostgreSQL database, each instance held to
//! the same CPU quota in a cgroup v1 CPU group of its own (see `scale_out`).

use super::*;
use crewdesk::sync::relay_doc::{Action, Incoming, RelayDoc, WaitingBudget};

/// CPU seconds used by every PostgreSQL process on the machine (the servers' backends and, in
/// the postmaster's children's times, those that have exited). The benchmark's cluster is the
/// only one running while it measures.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter(|stat| stat.contains("(postgres)"))
        .map(|stat| {
            let f: Vec<f64> =
                stat.rsplit(')').next().unwrap_or("").split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
            // utime, stime, cutime, cstime.
            f.get(11..15).map_or(0.0, |t| t.iter().sum::<f64>()) / 100.0
        })
        .sum()
}

/// A cgroup v1 CPU group with a fixed quota (`cores` of CPU time per period), holding one relay
/// instance the way a machine of its own would. Removed when dropped (after its process ended).
struct CpuGroup {
    path: PathBuf,
}

const CGROUP_CPU: &str = "/sys/fs/cgroup/cpu";

impl CpuGroup {
    fn new(name: &str, cores: f64) -> Result<CpuGroup, String> {
        let path = Path::new(CGROUP_CPU).join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let group = CpuGroup { path };
        let period = 100_000_u64;
        group.write("cpu.cfs_period_us", &period.to_string())?;
        group.write("cpu.cfs_quota_us", &((cores * period as f64).round() as u64).max(1000).to_string())?;
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.path.join(file), value)
            .map_err(|e| format!("cannot write {}/{file}: {e}", self.path.display()))
    }

    /// How many periods the group was throttled in, and for how long in all (seconds).
    fn throttled(&self) -> (u64, f64) {
        let stat = std::fs::read_to_string(self.path.join("cpu.stat")).unwrap_or_default();
        let field =
            |name: &str| stat.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(0);
        (field("nr_throttled "), field("throttled_time ") as f64 / 1e9)
    }

    /// Whether groups can be made here (cgroup v1 CPU controller mounted and writable).
    fn available() -> Result<(), String> {
        CpuGroup::new(&format!("crewdesk-bench-probe-{}", std::process::id()), 1.0).map(drop)
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Anything still in the group goes back to the root group, so the group can be removed.
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CGROUP_CPU).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A fresh database on the PostgreSQL server at `base` (postgres://USER@HOST:PORT).
async fn new_database(base: &str) -> String {
    let (client, conn) = tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let name = format!("bench_{}", std::process::id() as u64 * 1000 + rand::random::<u16>() as u64 % 1000);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    format!("{base}/{name}")
}

/// The same load on one instance over SQLite, one over PostgreSQL and three over one PostgreSQL
/// database (agents spread over the instances, so most fan-out crosses instances).
///
/// With a CPU quota (`CREWDESK_BENCH_CPU_QUOTA` cores per instance, 0.25 unless set; 0 for none)
/// each instance runs in a cgroup of its own with that quota, as on a machine of its own, while the
/// generator and PostgreSQL stay outside the groups: each deployment takes the saturating load,
/// and three instances then take 70% and 35% of their own saturating rate. Without the controller (or
/// with 0) everything shares the machine and each deployment takes the three loads of `loads`.
pub(crate) async fn scale_out(
    base: &str,
    team: &Team,
    names: &[String],
    docs: &[(ConversationId, Automerge)],
    k: usize,
    loads: [Duration; 3],
) {
    let n = names.len();
    let quota: f64 = std::env::var("CREWDESK_BENCH_CPU_QUOTA").ok().and_then(|q| q.parse().ok()).unwrap_or(0.25);
    let quota = match quota > 0.0 {
        true => match CpuGroup::available() {
            Ok(()) => Some(quota),
            Err(e) => {
                println!("\nthe cgroup v1 CPU controller is not writable here ({e}): scale-out runs uncapped");
                None
            }
        },
        false => None,
    };
    println!();
    println!(
        "Scale-out: {n} agents, {} conversations, {k} messages per agent; agent i uses instance i mod instances; {}",
        docs.len(),
        match quota {
            Some(q) => format!(
                "each instance in a cgroup of its own with {q} core of CPU ({CGROUP_CPU}, cfs_quota_us / cfs_period_us), generator and PostgreSQL outside"
            ),
            None => "everything shares the machine (no CPU quotas)".to_owned(),
        }
    );
    per_change_floor();
    let mut rows: Vec<Row> = Vec::new();
    // CREWDESK_BENCH_SCALE_OUT_ROWS=3 runs only the three-instance deployment (to look at it alone).
    let only = std::env::var("CREWDESK_BENCH_SCALE_OUT_ROWS").ok();
    for (label, postgres, instances) in [
        ("1 instance, SQLite", false, 1),
        ("1 instance, PostgreSQL", true, 1),
        ("3 instances, one PostgreSQL", true, 3),
    ]
    .into_iter()
    .filter(|(_, pg, i)| only.as_deref().is_none_or(|o| o == i.to_string() || (o == "pg" && *pg)))
    {
        let dir = tempfile::tempdir().unwrap();
        let url = match postgres {
            true => Some(new_database(base).await),
            false => None,
        };
        let store = match &url {
            Some(u) => Store::connect(&sync_server::store::StoreUrl::parse(u).unwrap()).unwrap(),
            None => Store::open(&dir.path().join("i0")).unwrap(),
        };
        let tokens = seed_store(&store, team, names, docs);
        drop(store);
        let ports: Vec<u16> = (0..instances).map(|_| free_port()).collect();
        let servers: Vec<Instance> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let group =
                    quota.map(|q| CpuGroup::new(&format!("crewdesk-bench-{}-{p}", std::process::id()), q).unwrap());
                let data = dir.path().join(format!("i{i}"));
                let server = start_relay_on(&data, url.as_deref(), *p, group.as_ref().map(|g| g.path.as_path()));
                Instance { server, group }
            })
            .collect();
        for p in &ports {
            wait_listening(*p).await;
        }
        let run = async |every: Duration| {
            eprintln!("scale-out: {label}, a message every {every:?} per agent");
            let cpu: Vec<f64> = servers.iter().map(|s| cpu_seconds(s.server.id())).collect();
            let throttled: Vec<(u64, f64)> = servers.iter().map(Instance::throttled).collect();
            let pg = postgres_cpu_seconds();
            let r = load(&ports, &tokens, docs, k, every).await;
            let cpu: Vec<f64> = servers.iter().zip(cpu).map(|(s, c)| cpu_seconds(s.server.id()) - c).collect();
            let throttled: Vec<(u64, f64)> =
                servers.iter().zip(throttled).map(|(s, (n, t))| (s.throttled().0 - n, s.throttled().1 - t)).collect();
            let pg = postgres.then(|| postgres_cpu_seconds() - pg);
            let mem: Vec<(u64, u64)> = servers.iter().map(|s| memory_kib(s.server.id())).collect();
            Row { label, every, cpu, pg, throttled, mem, r }
        };
        match quota {
            None => {
                for every in loads {
                    let row = run(every).await;
                    rows.push(row);
                }
            }
            Some(_) => {
                let saturating = run(loads[0]).await;
                let rate = saturating.r.sent as f64 / saturating.r.elapsed.as_secs_f64();
                rows.push(saturating);
                if instances == 3 {
                    // 70% of what three capped instances take in (each agent writes every
                    // n / (0.7 rate) s), then 35%: where the tail stays short.
                    for share in [0.7, 0.35] {
                        let row = run(Duration::from_secs_f64(n as f64 / (share * rate))).await;
                        rows.push(row);
                    }
                }
            }
        }
    }
    println!();
    println!(
        "| deployment | load | messages/s | fan-out deliveries (complete) | fan-out p50 | fan-out p99 | cross-instance p50 / p99 | CPU per instance (cores) | relay CPU per message, per instance | PostgreSQL CPU (cores; per message) | CPU quota throttled (periods, s) | generator CPU (cores) | RSS per instance (peak) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for Row { label, every, cpu, pg, throttled, mem, r } in &rows {
        let secs = r.elapsed.as_secs_f64();
        println!(
            "| {label} | a message every {} ms per agent | {:.0} | {} of {}{} | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} | {:.2} | {} |",
            every.as_millis(),
            r.sent as f64 / secs,
            r.delivered,
            r.sent * (n / docs.len() - 1),
            if r.dropped > 0 { format!(", {} connections dropped", r.dropped) } else { String::new() },
            pct(&r.latencies, 0.5),
            pct(&r.latencies, 0.99),
            match r.cross_instance.is_empty() {
                true => "-".to_owned(),
                false => format!("{:.1} / {:.1} ms", pct(&r.cross_instance, 0.5), pct(&r.cross_instance, 0.99)),
            },
            cpu.iter().map(|c| format!("{:.2}", c / secs)).collect::<Vec<_>>().join(" / "),
            cpu.iter().map(|c| format!("{:.2} ms", c * 1e3 / r.sent.max(1) as f64)).collect::<Vec<_>>().join(" / "),
            pg.map_or("-".to_owned(), |p| format!("{:.2}; {:.2} ms", p / secs, p * 1e3 / r.sent.max(1) as f64)),
            match quota {
                Some(_) => throttled.iter().map(|(n, t)| format!("{n}, {t:.1}")).collect::<Vec<_>>().join(" / "),
                None => "-".to_owned(),
            },
            r.generator_cpu / secs,
            mem.iter().map(|m| format!("{} MiB ({} MiB)", m.0 / 1024, m.1 / 1024)).collect::<Vec<_>>().join(" / "),
        );
    }
    let rate = |r: &LoadResult| r.sent as f64 / r.elapsed.as_secs_f64();
    println!();
    let row = |label: &str, every: Duration| rows.iter().find(|r| r.label == label && r.every == every);
    let (one, three) = ("1 instance, PostgreSQL", "3 instances, one PostgreSQL");
    if let (Some(a), Some(b)) = (row(one, loads[0]), row(three, loads[0])) {
        println!(
            "saturating messages/s, 3 instances / 1 PostgreSQL instance{}: {:.2}x ({:.0} / {:.0})",
            quota.map_or(String::new(), |q| format!(", {q} core each")),
            rate(&b.r) / rate(&a.r),
            rate(&b.r),
            rate(&a.r)
        );
        if let Some(pg) = b.pg {
            let per_message = pg / b.r.sent.max(1) as f64;
            println!(
                "PostgreSQL ceiling: {:.2} ms of PostgreSQL CPU per message with 3 instances, so one core of PostgreSQL takes at most {:.0} messages/s",
                per_message * 1e3,
                1.0 / per_message
            );
        }
    }
    for r in rows.iter().filter(|r| r.label == three && r.every != loads[0]) {
        println!(
            "cross-instance fan-out p99 with 3 instances, a message every {} ms per agent ({:.0} messages/s): {:.1} ms",
            r.every.as_millis(),
            rate(&r.r),
            pct(&r.r.cross_instance, 0.99)
        );
    }
}

/// One relay instance of a scale-out deployment and its CPU group, if any (the process is
/// killed before the group is removed).
struct Instance {
    server: Server,
    group: Option<CpuGroup>,
}

impl Instance {
    fn throttled(&self) -> (u64, f64) {
        self.group.as_ref().map_or((0, 0.0), CpuGroup::throttled)
    }
}

/// One deployment under one load.
struct Row {
    label: &'static str,
    every: Duration,
    /// Relay CPU seconds, per instance.
    cpu: Vec<f64>,
    /// PostgreSQL CPU seconds (PostgreSQL deployments).
    pg: Option<f64>,
    /// Periods each instance's CPU group was throttled in, and for how long (seconds).
    throttled: Vec<(u64, f64)>,
    mem: Vec<(u64, u64)>,
    r: LoadResult,
}

/// What one change costs, against automerge alone, by the conversation's length: every instance
/// that has followers of a conversation applies each of its changes, one at a time when the load
/// is light (nothing to batch), and takes each follower's acknowledgement of it.
fn per_change_floor() {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        pct(&v, 0.5) * 1e3
    };
    println!();
    println!("Per change, by the conversation's length (medians of 200, µs):");
    println!(
        "| messages in the conversation | automerge: apply one change | automerge: apply 200 in one call, per change | automerge: take an acknowledgement | relay: take an acknowledgement |"
    );
    println!("|---|---|---|---|---|");
    for n in [100, 1_000, 5_000] {
        let (id, mut d) = conversation(0, "load");
        let add = |d: &mut Automerge, id: String| {
            let m = Message {
                id: MessageId(id),
                at: Timestamp::now(),
                author: Author::Crew { agent: AgentId::from("agent0") },
                body: MessageBody::Text { text: "a reply of a usual length, a sentence or two".into() },
            };
            d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
        };
        for i in 0..n {
            add(&mut d, format!("m{i}"));
        }
        let mut other = d.fork().with_actor(ActorId::random());
        let changes: Vec<automerge::Change> = (0..200)
            .map(|i| {
                add(&mut other, format!("later{i}"));
                other.get_last_local_change().unwrap()
            })
            .collect();
        let mut one = d.clone();
        let apply_one: Vec<Duration> = changes
            .iter()
            .map(|c| {
                let t = Instant::now();
                one.apply_changes([c.clone()]).unwrap();
                t.elapsed()
            })
            .collect();
        let mut batch = d.clone();
        let t = Instant::now();
        batch.apply_changes(changes.clone()).unwrap();
        let per_change = t.elapsed().as_secs_f64() * 1e6 / changes.len() as f64;
        // A follower at the conversation's heads acknowledges them.
        let mut relay = RelayDoc::new(id.as_str(), "relay", ActorId::random());
        relay.load(batch.clone(), TeamId::from("load"));
        relay.follow(1, "agent0");
        let data = relay
            .fanout()
            .into_iter()
            .find_map(|a| match a {
                Action::Send(1, WireMessage::Sync { data, .. }) => Some(data),
                _ => None,
            })
            .unwrap();
        let (mut follower, mut theirs) = (batch.clone(), sync::State::new());
        follower.receive_sync_message(&mut theirs, sync::Message::decode(&data).unwrap()).unwrap();
        let ack = follower.generate_sync_message(&mut theirs).unwrap();
        let budget = WaitingBudget::new();
        let take = |relay: &mut RelayDoc| {
            let incoming = Incoming {
                conn: 1,
                peer_id: "agent0",
                message: ack.clone(),
                changes: Vec::new(),
                is_request: false,
                author: None,
                waiting: &budget,
            };
            relay.receive(incoming, Timestamp::now())
        };
        take(&mut relay);
        let by_relay: Vec<Duration> = (0..200)
            .map(|_| {
                let t = Instant::now();
                take(&mut relay);
                t.elapsed()
            })
            .collect();
        let mut ours = sync::State::new();
        let _ = batch.generate_sync_message(&mut ours);
        let by_automerge: Vec<Duration> = (0..200)
            .map(|_| {
                let mut state = ours.clone();
                let t = Instant::now();
                batch.receive_sync_message(&mut state, ack.clone()).unwrap();
                t.elapsed()
            })
            .collect();
        println!(
            "| {n} | {:.0} | {per_change:.1} | {:.0} | {:.1} |",
            median(apply_one),
            median(by_automerge),
            median(by_relay)
        );
    }
}
