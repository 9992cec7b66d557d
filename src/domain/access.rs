//! Who may see, join, grab, send, leave, close and edit. Admins see and join every conversation of
//! their team but never grab; in a grab-mode team a conversation handled by one representative is
//! neither visible nor joinable for the other representatives.

use super::status::{ConversationSummary, is_closed, whatsapp_window_open, whatsapp_window_open_since};
use super::{AgentId, Channel, DomainError, MessageBody, Role, Team, TeamMode, Timestamp};
use serde::{Deserialize, Serialize};

/// What pressing JOIN does for this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKind {
    /// Enter the room now.
    Join,
    /// Ask the relay to make this representative the handler (grab-mode teams).
    Grab,
}

/// Where this agent stands on a grab-mode conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrabState {
    /// Nothing asked.
    None,
    /// Asked (maybe offline); the relay has not decided yet.
    AwaitingConfirmation,
    /// The relay recorded this agent as the handler.
    Won,
    /// The relay recorded someone else as the handler.
    Lost,
}

fn is_handled_by_other(s: &ConversationSummary, agent: &AgentId) -> bool {
    s.owner.as_ref().is_some_and(|o| o != agent)
}

fn member_role(team: &Team, agent: &AgentId) -> Result<Role, DomainError> {
    team.role_of(agent).ok_or(DomainError::NotAMember)
}

/// May this agent see the conversation at all (list, counts, opening it)?
pub fn may_see(team: &Team, agent: &AgentId, s: &ConversationSummary) -> bool {
    team.role_of(agent).is_some_and(|role| may_act_on(team.mode, role, s.owner.as_ref(), agent))
}

// The rules below take only what a single change can be judged by (team mode, role, the grab
// winner), so the judge of changes (`replica::conversation`) and the desk's actions share them.

/// May this agent see and act on a conversation whose grab winner is `owner`? In grab-mode teams a
/// conversation handled by one representative is invisible and unjoinable for the others.
pub fn may_act_on(mode: TeamMode, role: Role, owner: Option<&AgentId>, agent: &AgentId) -> bool {
    role == Role::Admin || mode == TeamMode::Open || owner.is_none_or(|o| o == agent)
}

/// May this agent enter the room directly (rather than asking to grab)?
pub fn may_enter(mode: TeamMode, role: Role, owner: Option<&AgentId>, agent: &AgentId) -> Result<(), DomainError> {
    match (mode, role, owner) {
        (TeamMode::Open, _, _) | (TeamMode::Grab, Role::Admin, _) => Ok(()),
        (TeamMode::Grab, Role::Representative, Some(o)) if o == agent => Ok(()),
        (TeamMode::Grab, Role::Representative, Some(_)) => Err(DomainError::HandledByAnother),
        (TeamMode::Grab, Role::Representative, None) => Err(DomainError::GrabRequired),
    }
}

/// May this agent ask to grab conversations at all (grab-mode teams, representatives)?
pub fn may_ask_to_grab(mode: TeamMode, role: Role) -> Result<(), DomainError> {
    if mode != TeamMode::Grab {
        return Err(DomainError::NotGrabMode);
    }
    if role == Role::Admin {
        return Err(DomainError::AdminsDoNotGrab);
    }
    Ok(())
}

/// May `agent` hand a conversation over to `to` (whose role in the team is `to_role`)? Judged from
/// what one change can be judged by: the team's mode, the roles, the grab winner (`owner`) and
/// whether the agent was in the room. Crew in the room hand over; admins also without joining. In
/// a grab-mode team the receiver becomes the conversation's representative, so only
/// representatives receive one.
pub fn may_hand_over(
    mode: TeamMode,
    role: Role,
    owner: Option<&AgentId>,
    in_room: bool,
    agent: &AgentId,
    to: &AgentId,
    to_role: Option<Role>,
) -> Result<(), DomainError> {
    let refuse = |why: &str| Err(DomainError::InvalidTransfer(why.to_owned()));
    if to == agent {
        return refuse("it is yours already");
    }
    let Some(to_role) = to_role else {
        return Err(DomainError::InvalidTransfer(format!("{to} is not a member of the team")));
    };
    if !may_act_on(mode, role, owner, agent) {
        return Err(DomainError::HandledByAnother);
    }
    if !(in_room || role == Role::Admin) {
        return Err(DomainError::NotInRoom);
    }
    if mode == TeamMode::Grab && to_role != Role::Representative {
        return refuse("in a grab-mode team conversations go to representatives (admins join any conversation)");
    }
    Ok(())
}

/// TRANSFER in the conversation header: may this agent hand the conversation to `to` now?
pub fn may_transfer(team: &Team, agent: &AgentId, s: &ConversationSummary, to: &AgentId) -> Result<(), DomainError> {
    let role = member_role(team, agent)?;
    if s.owner.as_ref() == Some(to) || (s.is_in_room(to) && team.mode == TeamMode::Open) {
        return Err(DomainError::InvalidTransfer(format!("{to} is in the conversation already")));
    }
    may_hand_over(team.mode, role, s.owner.as_ref(), s.is_in_room(agent), agent, to, team.role_of(to))
}

/// The colleagues this agent may hand the conversation to, in the team's order.
pub fn transfer_candidates<'a>(team: &'a Team, agent: &AgentId, s: &ConversationSummary) -> Vec<&'a AgentId> {
    team.members.iter().map(|m| &m.agent).filter(|to| may_transfer(team, agent, s, to).is_ok()).collect()
}

/// May a member open a conversation on this channel? Agents start email threads; conversations on
/// the other channels start when the customer writes (or an admin imports them).
pub fn may_open(_role: Role, channel: Channel) -> Result<(), DomainError> {
    match channel {
        Channel::Email => Ok(()),
        other => Err(DomainError::OpenedByTheCustomer(other.label().to_owned())),
    }
}

/// What JOIN would do, or why it is not offered.
pub fn join_kind(
    team: &Team,
    agent: &AgentId,
    s: &ConversationSummary,
    now: Timestamp,
) -> Result<JoinKind, DomainError> {
    let role = member_role(team, agent)?;
    if s.is_in_room(agent) {
        return Err(DomainError::AlreadyInRoom);
    }
    // Joining a closed conversation is allowed (to follow up); grabbing one is not.
    match may_enter(team.mode, role, s.owner.as_ref(), agent) {
        Ok(()) => Ok(JoinKind::Join),
        Err(DomainError::GrabRequired) if s.grab_requests.contains(agent) => Err(DomainError::GrabAlreadyRequested),
        Err(DomainError::GrabRequired) if is_closed(s, team, now) => Err(DomainError::Closed),
        Err(DomainError::GrabRequired) => Ok(JoinKind::Grab),
        Err(e) => Err(e),
    }
}

/// May this agent enter the room directly?
pub fn may_join(team: &Team, agent: &AgentId, s: &ConversationSummary, now: Timestamp) -> Result<(), DomainError> {
    match join_kind(team, agent, s, now)? {
        JoinKind::Join => Ok(()),
        JoinKind::Grab => Err(DomainError::GrabRequired),
    }
}

/// May this agent ask to grab the conversation (Notifications, grab-mode teams, representatives)?
pub fn may_grab(team: &Team, agent: &AgentId, s: &ConversationSummary, now: Timestamp) -> Result<(), DomainError> {
    may_ask_to_grab(team.mode, member_role(team, agent)?)?;
    if is_handled_by_other(s, agent) {
        return Err(DomainError::HandledByAnother);
    }
    if s.owner.as_ref() == Some(agent) || s.is_in_room(agent) {
        return Err(DomainError::AlreadyInRoom);
    }
    if s.grab_requests.contains(agent) {
        return Err(DomainError::GrabAlreadyRequested);
    }
    if is_closed(s, team, now) {
        return Err(DomainError::Closed);
    }
    Ok(())
}

/// Does this conversation belong in the agent's Notifications panel (grabbable or awaiting)?
pub fn in_notifications(team: &Team, agent: &AgentId, s: &ConversationSummary, now: Timestamp) -> bool {
    team.mode == TeamMode::Grab
        && team.role_of(agent) == Some(Role::Representative)
        && !is_closed(s, team, now)
        && (s.owner.is_none() || grab_state(agent, s) == GrabState::Lost)
}

pub fn grab_state(agent: &AgentId, s: &ConversationSummary) -> GrabState {
    // Whoever handed the conversation over neither won nor lost it any more.
    if s.handover.as_ref().is_some_and(|h| h.from == *agent) && s.owner.as_ref() != Some(agent) {
        return GrabState::None;
    }
    match &s.owner {
        Some(o) if o == agent => GrabState::Won,
        Some(_) if s.grab_requests.contains(agent) => GrabState::Lost,
        None if s.grab_requests.contains(agent) => GrabState::AwaitingConfirmation,
        _ => GrabState::None,
    }
}

/// May this agent send this message now? Checks membership, the room and the WhatsApp window.
pub fn may_send(
    team: &Team,
    agent: &AgentId,
    s: &ConversationSummary,
    body: &MessageBody,
    now: Timestamp,
) -> Result<(), DomainError> {
    member_role(team, agent)?;
    if !s.is_in_room(agent) {
        return Err(DomainError::NotInRoom);
    }
    // A note never leaves the crew: no channel rule applies to it.
    if body.is_internal() {
        return body.validate();
    }
    // Crew may follow up in a closed conversation; it stays closed until the customer writes.
    match whatsapp_window_open(s, now) {
        Some(_) => may_deliver_on_whatsapp(s.last_customer_message_at, body, now)?,
        None if !body.is_free_form() => return Err(DomainError::WhatsAppTemplateOutsideWhatsApp),
        None => {}
    }
    body.validate()
}

/// What WhatsApp itself accepts: free-form messages only inside the 24 h window, approved
/// templates at any time. The relay checks this again when it hands a message to WhatsApp.
pub fn may_deliver_on_whatsapp(
    last_customer_message_at: Option<Timestamp>,
    body: &MessageBody,
    now: Timestamp,
) -> Result<(), DomainError> {
    if body.is_free_form() && !whatsapp_window_open_since(last_customer_message_at, now) {
        return Err(DomainError::WhatsAppWindowClosed);
    }
    Ok(())
}

pub fn may_leave(team: &Team, agent: &AgentId, s: &ConversationSummary) -> Result<(), DomainError> {
    member_role(team, agent)?;
    if s.is_in_room(agent) { Ok(()) } else { Err(DomainError::NotInRoom) }
}

/// CLOSE: crew in the room, or any admin of the team.
pub fn may_close(team: &Team, agent: &AgentId, s: &ConversationSummary, now: Timestamp) -> Result<(), DomainError> {
    let role = member_role(team, agent)?;
    if is_closed(s, team, now) {
        return Err(DomainError::Closed);
    }
    if role == Role::Admin || s.is_in_room(agent) { Ok(()) } else { Err(DomainError::NotInRoom) }
}

/// 📄 edit customer details: crew in the room, or any admin of the team.
pub fn may_edit_customer(team: &Team, agent: &AgentId, s: &ConversationSummary) -> Result<(), DomainError> {
    let role = member_role(team, agent)?;
    if !may_see(team, agent, s) {
        return Err(DomainError::HandledByAnother);
    }
    if role == Role::Admin || s.is_in_room(agent) { Ok(()) } else { Err(DomainError::NotInRoom) }
}

/// The relay's grab arbitration: the first request it received wins; once decided, never changes.
/// `requests_in_arrival_order` is the order in which the relay received the grab requests.
pub fn decide_grab<'a>(
    current_owner: Option<&'a AgentId>,
    team: &Team,
    requests_in_arrival_order: &'a [AgentId],
) -> Option<&'a AgentId> {
    current_owner.or_else(|| requests_in_arrival_order.iter().find(|a| team.role_of(a) == Some(Role::Representative)))
}
