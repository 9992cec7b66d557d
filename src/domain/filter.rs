//! The red block as functions of (conversations, agent, now): views, team, status, channel
//! selection, sorting, and the live counts beside every filter.

use super::access::may_see;
use super::status::{ConversationSummary, Status, is_closed};
use super::{AgentId, Channel, Team, TeamId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Views exclude Closed conversations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Every open conversation the agent may join (or is already in).
    AllChatroom,
    /// Open conversations the agent is in.
    Joined,
}

/// One entry of the red block is selected at a time: a view or a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Selection {
    View(View),
    Status(Status),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sort {
    #[default]
    NewestActivity,
    LongestWaiting,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub selection: Selection,
    /// Narrow everything (list and counts) to one team.
    pub team: Option<TeamId>,
    /// Channel selection; empty means every channel.
    pub channels: Vec<Channel>,
    pub sort: Sort,
    /// At most this many rows are returned, starting at `offset` in the sorted result (a window
    /// over the whole list: the desk asks for the rows around what is on screen); `total` and the
    /// counts always cover everything.
    pub limit: usize,
    #[serde(default)]
    pub offset: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            selection: Selection::View(View::AllChatroom),
            team: None,
            channels: Vec::new(),
            sort: Sort::default(),
            limit: 200,
            offset: 0,
        }
    }
}

/// The numbers beside each entry of the red block, under the current team and channel selection
/// (team counts ignore the team selection, so each team shows its own number).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub all_chatroom: usize,
    pub joined: usize,
    pub online: usize,
    pub overdue: usize,
    pub soon_to_be: usize,
    pub rep_needed: usize,
    pub pending: usize,
    pub closed: usize,
    /// All Chatroom count per team the agent belongs to.
    pub teams: BTreeMap<TeamId, usize>,
}

impl Counts {
    pub fn of_status(&self, status: Status) -> usize {
        match status {
            Status::Online => self.online,
            Status::Overdue => self.overdue,
            Status::SoonToBe => self.soon_to_be,
            Status::RepNeeded => self.rep_needed,
            Status::Pending => self.pending,
            Status::Closed => self.closed,
        }
    }
    fn of_status_mut(&mut self, status: Status) -> &mut usize {
        match status {
            Status::Online => &mut self.online,
            Status::Overdue => &mut self.overdue,
            Status::SoonToBe => &mut self.soon_to_be,
            Status::RepNeeded => &mut self.rep_needed,
            Status::Pending => &mut self.pending,
            Status::Closed => &mut self.closed,
        }
    }
}

/// Does the conversation fall under this view at `now`? (`team` is the conversation's team.)
pub fn in_view(view: View, s: &ConversationSummary, team: &Team, agent: &AgentId, now: Timestamp) -> bool {
    if !may_see(team, agent, s) || is_closed(s, team, now) {
        return false;
    }
    match view {
        View::AllChatroom => true,
        View::Joined => s.is_in_room(agent),
    }
}

pub fn matches_selection(
    sel: Selection,
    s: &ConversationSummary,
    team: &Team,
    agent: &AgentId,
    now: Timestamp,
) -> bool {
    match sel {
        Selection::View(v) => in_view(v, s, team, agent, now),
        Selection::Status(st) => may_see(team, agent, s) && st.holds(s, team, now),
    }
}

/// The result of evaluating a filter: matching rows (sorted, limited) and all counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing<T> {
    pub rows: Vec<T>,
    /// How many conversations matched (the whole list; `rows` is the window from `offset`).
    pub total: usize,
    /// Where `rows` start in the whole sorted list.
    #[serde(default)]
    pub offset: usize,
    pub counts: Counts,
}

/// Evaluates the red block over `conversations` in one pass. `team_of` finds a conversation's
/// team; conversations of teams the agent does not belong to are never shown or counted.
pub fn evaluate<'a, F>(
    conversations: impl IntoIterator<Item = &'a ConversationSummary>,
    team_of: F,
    agent: &AgentId,
    now: Timestamp,
    filter: &Filter,
) -> Listing<&'a ConversationSummary>
where
    F: Fn(&TeamId) -> Option<&'a Team>,
{
    let mut counts = Counts::default();
    let mut rows = Vec::new();
    for s in conversations {
        let Some(team) = team_of(&s.team) else { continue };
        if team.member(agent).is_none() {
            continue;
        }
        // One map entry per team, created once (not a key clone per row).
        if !counts.teams.contains_key(&team.id) {
            counts.teams.insert(team.id.clone(), 0);
        }
        if !filter.channels.is_empty() && !filter.channels.contains(&s.channel) {
            continue;
        }
        if !may_see(team, agent, s) {
            continue;
        }
        let closed = is_closed(s, team, now);
        if !closed && let Some(n) = counts.teams.get_mut(&team.id) {
            *n += 1;
        }
        if filter.team.as_ref().is_some_and(|t| t != &s.team) {
            continue;
        }
        if !closed {
            counts.all_chatroom += 1;
            if s.is_in_room(agent) {
                counts.joined += 1;
            }
        }
        for st in Status::ALL {
            if st.holds(s, team, now) {
                *counts.of_status_mut(st) += 1;
            }
        }
        if matches_selection(filter.selection, s, team, agent, now) {
            rows.push(s);
        }
    }
    let total = rows.len();
    sort_rows(&mut rows, filter.sort);
    // A window past the end shows the last rows (the list shrank under the agent's eyes).
    let offset = if filter.offset >= total { total.saturating_sub(filter.limit) } else { filter.offset };
    let rows: Vec<_> = rows.into_iter().skip(offset).take(filter.limit).collect();
    Listing { rows, total, offset, counts }
}

fn sort_rows(rows: &mut [&ConversationSummary], sort: Sort) {
    match sort {
        Sort::NewestActivity => {
            rows.sort_by(|a, b| b.last_activity().cmp(&a.last_activity()).then_with(|| a.id.cmp(&b.id)))
        }
        // Longest waiting first; conversations where nobody waits come last, newest first.
        Sort::LongestWaiting => rows.sort_by(|a, b| match (a.waiting_since, b.waiting_since) {
            (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.id.cmp(&b.id)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => b.last_activity().cmp(&a.last_activity()).then_with(|| a.id.cmp(&b.id)),
        }),
    }
}
