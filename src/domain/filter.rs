//! The red block as functions of (conversations, agent, now): views, team, status, channel
//! selection, sorting, and the live counts beside every filter.

use super::access::{may_act_on, may_see};
use super::status::{ConversationSummary, Status, Statuses};
use super::{AgentId, Channel, Role, Team, TeamId, Timestamp};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
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
    matches_selection(Selection::View(view), s, team, agent, now)
}

pub fn matches_selection(
    sel: Selection,
    s: &ConversationSummary,
    team: &Team,
    agent: &AgentId,
    now: Timestamp,
) -> bool {
    may_see(team, agent, s) && selected(sel, Statuses::of(s, team, now), s.is_in_room(agent))
}

/// The selection rule for a conversation the agent may see, from its statuses: views hold open
/// conversations (Joined: those the agent is in), a status its conversations.
fn selected(sel: Selection, statuses: Statuses, in_room: bool) -> bool {
    let open = !statuses.contains(Status::Closed);
    match sel {
        Selection::View(View::AllChatroom) => open,
        Selection::View(View::Joined) => open && in_room,
        Selection::Status(st) => statuses.contains(st),
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
pub fn evaluate<'a, T, F>(
    conversations: impl IntoIterator<Item = &'a T>,
    team_of: F,
    agent: &AgentId,
    now: Timestamp,
    filter: &Filter,
) -> Listing<&'a T>
where
    T: Borrow<ConversationSummary> + 'a,
    F: Fn(&TeamId) -> Option<&'a Team>,
{
    let mut counts = Counts::default();
    let conversations = conversations.into_iter();
    let mut rows = Vec::with_capacity(conversations.size_hint().0);
    // Per team met so far (a handful): the agent's role in it, whether the team selection takes
    // it, and its All Chatroom count, so none of them is looked up again for every row.
    struct Seen<'t> {
        team: &'t Team,
        role: Option<Role>,
        selected: bool,
        open: usize,
    }
    let mut teams: Vec<Seen<'a>> = Vec::new();
    for row in conversations {
        let s: &ConversationSummary = row.borrow();
        // Compared by id first: cheaper than hashing the id to look the team up for every row.
        let at = match teams.iter().position(|t| t.team.id == s.team) {
            Some(at) => at,
            None => {
                let Some(team) = team_of(&s.team) else { continue };
                let selected = filter.team.as_ref().is_none_or(|t| *t == team.id);
                teams.push(Seen { team, role: team.role_of(agent), selected, open: 0 });
                teams.len() - 1
            }
        };
        let (team, in_team_selection) = (teams[at].team, teams[at].selected);
        let Some(role) = teams[at].role else { continue };
        if !filter.channels.is_empty() && !filter.channels.contains(&s.channel) {
            continue;
        }
        if !may_act_on(team.mode, role, s.owner.as_ref(), agent) {
            continue;
        }
        let statuses = Statuses::of(s, team, now);
        let closed = statuses.contains(Status::Closed);
        if !closed {
            teams[at].open += 1;
        }
        if !in_team_selection {
            continue;
        }
        let in_room = s.is_in_room(agent);
        if !closed {
            counts.all_chatroom += 1;
            if in_room {
                counts.joined += 1;
            }
        }
        for st in Status::ALL {
            if statuses.contains(st) {
                *counts.of_status_mut(st) += 1;
            }
        }
        if selected(filter.selection, statuses, in_room) {
            rows.push((sort_key(s, filter.sort), row));
        }
    }
    for t in teams {
        if t.role.is_some() {
            *counts.teams.entry(t.team.id.clone()).or_insert(0) += t.open;
        }
    }
    let total = rows.len();
    // A window past the end shows the last rows (the list shrank under the agent's eyes).
    let offset = if filter.offset >= total { total.saturating_sub(filter.limit) } else { filter.offset };
    let end = offset.saturating_add(filter.limit).min(total);
    window_rows(&mut rows, end);
    let rows: Vec<_> = rows.into_iter().skip(offset).take(filter.limit).map(|(_, row)| row).collect();
    Listing { rows, total, offset, counts }
}

/// Sorts the first `end` rows into place: only the window and what comes before it are ordered
/// (the rows after it are dropped), so a list of thousands costs a selection, not a full sort.
/// Rows carry their sort key, so comparing two reads the conversations only on a tie.
fn window_rows<T: Borrow<ConversationSummary>>(rows: &mut Vec<(SortKey, &T)>, end: usize) {
    let by = |a: &(SortKey, &T), b: &(SortKey, &T)| {
        a.0.cmp(&b.0).then_with(|| {
            let (a, b): (&ConversationSummary, &ConversationSummary) = (a.1.borrow(), b.1.borrow());
            a.id.cmp(&b.id)
        })
    };
    if end == 0 {
        rows.clear();
        return;
    }
    if end < rows.len() {
        rows.select_nth_unstable_by(end - 1, by);
        rows.truncate(end);
    }
    rows.sort_unstable_by(by);
}

/// Where a conversation sorts (ties fall to its id, so the order is total): newest activity first;
/// or longest waiting first, then those where nobody waits, newest first.
type SortKey = (bool, i64);

fn sort_key(s: &ConversationSummary, sort: Sort) -> SortKey {
    match (sort, s.waiting_since) {
        (Sort::LongestWaiting, Some(w)) => (false, w.0),
        (Sort::LongestWaiting, None) => (true, s.last_activity().0.saturating_neg()),
        (Sort::NewestActivity, _) => (false, s.last_activity().0.saturating_neg()),
    }
}
