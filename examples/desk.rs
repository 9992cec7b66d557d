//! The demo desk in a terminal: a replica filled with the demo data, seen by one agent (default
//! the representative `bob`; pass another demo agent id to switch), with the red block's counts,
//! the list and the Notifications panel. `cargo xtask run` starts it.

use crewdesk::demo::{self, DemoSpec};
use crewdesk::domain::filter::{Filter, Selection, View};
use crewdesk::domain::status::{Status, waiting_for};
use crewdesk::domain::{AgentId, Timestamp};
use crewdesk::replica::Replica;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let agent = std::env::args().nth(1).unwrap_or_else(|| "bob".to_owned());
    if !demo::AGENTS.iter().any(|(id, ..)| *id == agent) {
        let known: Vec<_> = demo::AGENTS.iter().map(|(id, ..)| *id).collect();
        return Err(format!("unknown demo agent `{agent}`; pick one of {}", known.join(", ")).into());
    }
    let dir = std::env::temp_dir().join(format!("crewdesk-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut replica = Replica::open(dir.join("replica.sqlite3"), AgentId::from(agent.as_str()))?;
    let now = Timestamp::now();
    demo::fill(&mut replica, &DemoSpec::default(), now)?;

    let listing = replica.list(&Filter::default(), now);
    let c = &listing.counts;
    println!("Crewdesk demo desk, signed in as {agent} (replica in {})\n", dir.display());
    println!("Views   All Chatroom {:>3}   Joined {:>3}", c.all_chatroom, c.joined);
    for team in replica.teams() {
        println!(
            "Team    {:<12} {:>3}  ({:?} mode)",
            team.name,
            c.teams.get(&team.id).copied().unwrap_or(0),
            team.mode
        );
    }
    let statuses: Vec<String> = Status::ALL.iter().map(|s| format!("{} {}", s.label(), c.of_status(*s))).collect();
    println!("Status  {}\n", statuses.join("   "));

    println!("All Chatroom (newest activity first)");
    for row in &listing.rows {
        let Some(team) = replica.team(&row.team) else { continue };
        let badges: Vec<&str> = Status::badges(row, team, now).iter().map(|s| s.label()).collect();
        let waiting = waiting_for(row, team, now)
            .map_or(String::new(), |w| format!("waiting {}:{:02}", w / 60_000, (w / 1000) % 60));
        let join = match crewdesk::domain::access::join_kind(team, replica.agent(), row, now) {
            Ok(kind) => format!("[{}]", format!("{kind:?}").to_uppercase()),
            Err(_) => String::new(),
        };
        let last = row.last_message.as_ref().map_or("", |m| m.text.as_str());
        println!(
            "  {:<18} {:<10} {:<8} {:<14} {:<28} {:<6} {}",
            row.customer.name,
            row.channel.label(),
            team.name,
            waiting,
            badges.join(", "),
            join,
            last.chars().take(40).collect::<String>()
        );
    }
    let notes = replica.notifications(now);
    println!("\nNotifications ({})", notes.len());
    for (row, state) in notes {
        println!("  {} ({}) {:?}", row.customer.name, row.channel.label(), state);
    }
    let joined = replica.list(&Filter { selection: Selection::View(View::Joined), ..Filter::default() }, now);
    println!("\nJoined: {}", joined.rows.iter().map(|r| r.customer.name.as_str()).collect::<Vec<_>>().join(", "));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
