//! The widget hub: which conversations have customers' sockets on this relay instance, so that a
//! committed change wakes only the sockets of its own conversation, and how each conversation's
//! presence is coalesced before it reaches the crew.
//!
//! The presence rules are a pure state machine ([`PresenceState::step`], fed the time) so they are
//! tested without sockets or sleeps; the socket tasks in `mod.rs` carry out what it returns.

use crate::limits::Limiter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// At most one presence update per conversation per this interval reaches the crew.
pub const PRESENCE_MIN_GAP: Duration = Duration::from_secs(1);
/// A customer counts as gone only after their last socket has been closed this long, so a page
/// reload (or a connect/close loop) does not flap Online and Offline on every agent's screen.
pub const OFFLINE_GRACE: Duration = Duration::from_millis(1500);
/// Messages a session (one conversation) may send per window, across its sockets.
pub const MESSAGES_PER_SESSION: usize = 10;
pub const MESSAGE_WINDOW: Duration = Duration::from_secs(10);

/// What the presence of one conversation should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceStep {
    /// Tell the crew: online (`true`) or offline.
    Publish(bool),
    /// Look again at this time (a timer must be armed; none is armed yet).
    WaitUntil(Instant),
    /// Nothing to do (already told, or a timer is armed).
    Nothing,
}

/// Presence of one conversation as the crew last heard it from this instance.
#[derive(Debug, Default)]
pub struct PresenceState {
    published: Option<bool>,
    last_published: Option<Instant>,
    /// When the last socket closed.
    emptied_at: Option<Instant>,
    timer_armed: bool,
}

impl PresenceState {
    /// Decides what to do given the number of open sockets now.
    pub fn step(&mut self, sockets: usize, now: Instant) -> PresenceStep {
        let online = sockets > 0;
        if online {
            self.emptied_at = None;
        } else if self.emptied_at.is_none() {
            self.emptied_at = Some(now);
        }
        if self.published == Some(online) || (self.published.is_none() && !online) {
            return PresenceStep::Nothing;
        }
        let mut due = self.last_published.map_or(now, |t| t + PRESENCE_MIN_GAP);
        if !online && let Some(emptied) = self.emptied_at {
            due = due.max(emptied + OFFLINE_GRACE);
        }
        if now >= due {
            self.published = Some(online);
            self.last_published = Some(now);
            return PresenceStep::Publish(online);
        }
        if self.timer_armed {
            return PresenceStep::Nothing;
        }
        self.timer_armed = true;
        PresenceStep::WaitUntil(due)
    }

    /// The armed timer fired.
    pub fn timer_fired(&mut self) {
        self.timer_armed = false;
    }

    /// True when nothing remains to be told or waited for.
    fn settled(&self, sockets: usize) -> bool {
        sockets == 0 && self.published != Some(true) && !self.timer_armed
    }
}

struct Conversation {
    /// Bumped after each committed change of the conversation; its sockets wait on it.
    changed: watch::Sender<u64>,
    /// The name of the crew member who last said they are typing (bumped each time).
    crew_typing: watch::Sender<(u64, String)>,
    /// When the customer last said they are typing (passed on at most every `TYPING_EVERY`).
    customer_typing: Option<Instant>,
    /// When the crew's typing was last passed on to the widgets (the same bound).
    crew_typing_at: Option<Instant>,
    sockets: usize,
    presence: PresenceState,
    location: Option<String>,
}

/// How often someone's typing is passed on, at most.
pub const TYPING_EVERY: Duration = Duration::from_secs(2);

/// Conversations with customers' sockets here, and the customers' limits.
pub struct WidgetHub {
    conversations: Mutex<HashMap<String, Conversation>>,
    max_sockets: usize,
    pub(crate) messages_per_session: Limiter<String>,
    pub(crate) messages_per_address: Limiter<IpAddr>,
}

/// A socket's place in the hub; leaving is [`WidgetHub::leave`].
pub struct Membership {
    pub changed: watch::Receiver<u64>,
    /// Who of the crew is typing.
    pub crew_typing: watch::Receiver<(u64, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TooManySockets;

impl WidgetHub {
    pub fn new(max_sockets: usize, messages_per_address: usize) -> WidgetHub {
        WidgetHub {
            conversations: Mutex::new(HashMap::new()),
            max_sockets: max_sockets.max(1),
            messages_per_session: Limiter::new(MESSAGES_PER_SESSION, MESSAGE_WINDOW),
            messages_per_address: Limiter::new(messages_per_address.max(1), MESSAGE_WINDOW),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conversation>> {
        self.conversations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A committed change of `doc_id`: wakes that conversation's sockets, and no others. Costs a
    /// map lookup when nobody is there.
    pub fn changed(&self, doc_id: &str) {
        if let Some(c) = self.lock().get(doc_id) {
            c.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A socket of `doc_id` opens; refused beyond the sockets allowed per session.
    pub fn join(&self, doc_id: &str, location: Option<String>) -> Result<Membership, TooManySockets> {
        let mut all = self.lock();
        let c = all.entry(doc_id.to_owned()).or_insert_with(|| Conversation {
            changed: watch::channel(0).0,
            crew_typing: watch::channel((0, String::new())).0,
            customer_typing: None,
            crew_typing_at: None,
            sockets: 0,
            presence: PresenceState::default(),
            location: None,
        });
        if c.sockets >= self.max_sockets {
            return Err(TooManySockets);
        }
        c.sockets += 1;
        c.location = location;
        Ok(Membership { changed: c.changed.subscribe(), crew_typing: c.crew_typing.subscribe() })
    }

    /// A crew member is typing in `doc_id`: its open widgets say so (a map lookup when none is open;
    /// the same name at most every `TYPING_EVERY`, whatever a client sends).
    pub fn crew_typing(&self, doc_id: &str, name: &str, now: Instant) {
        if let Some(c) = self.lock().get_mut(doc_id) {
            let same = c.crew_typing.borrow().1 == name;
            if same && c.crew_typing_at.is_some_and(|t| now.duration_since(t) < TYPING_EVERY) {
                return;
            }
            c.crew_typing_at = Some(now);
            c.crew_typing.send_modify(|(n, who)| {
                *n = n.wrapping_add(1);
                name.clone_into(who);
            });
        }
    }

    /// The customer is typing in `doc_id`: true when it should be passed on to the crew (at most
    /// every `TYPING_EVERY`, however often the browser says so).
    pub fn customer_typing(&self, doc_id: &str, now: Instant) -> bool {
        let mut all = self.lock();
        let Some(c) = all.get_mut(doc_id) else { return false };
        if c.customer_typing.is_some_and(|t| now.duration_since(t) < TYPING_EVERY) {
            return false;
        }
        c.customer_typing = Some(now);
        true
    }

    /// A socket of `doc_id` closed.
    pub fn leave(&self, doc_id: &str) {
        if let Some(c) = self.lock().get_mut(doc_id) {
            c.sockets = c.sockets.saturating_sub(1);
        }
    }

    /// What the conversation's presence should do now, with the location to report. Forgets a
    /// conversation once it has nothing left to say.
    pub fn presence_step(&self, doc_id: &str, now: Instant, timer_fired: bool) -> (PresenceStep, Option<String>) {
        let mut all = self.lock();
        let Some(c) = all.get_mut(doc_id) else { return (PresenceStep::Nothing, None) };
        if timer_fired {
            c.presence.timer_fired();
        }
        let step = c.presence.step(c.sockets, now);
        let location = c.location.clone();
        if c.presence.settled(c.sockets) {
            all.remove(doc_id);
        }
        (step, location)
    }

    /// Sockets open here for a conversation (tests and the benchmark).
    pub fn sockets_of(&self, doc_id: &str) -> usize {
        self.lock().get(doc_id).map_or(0, |c| c.sockets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_wakes_only_its_own_conversation() {
        let hub = WidgetHub::new(3, 100);
        let mut a = hub.join("a", None).unwrap();
        let b = hub.join("b", None).unwrap();
        hub.changed("a");
        hub.changed("nobody-here");
        assert!(a.changed.has_changed().unwrap());
        assert!(!b.changed.has_changed().unwrap(), "a change of another conversation does not wake b");
        a.changed.mark_unchanged();
        hub.changed("b");
        assert!(!a.changed.has_changed().unwrap());
        assert!(b.changed.has_changed().unwrap());
    }

    #[test]
    fn sockets_per_session_are_limited() {
        let hub = WidgetHub::new(2, 100);
        let _one = hub.join("a", None).unwrap();
        let _two = hub.join("a", None).unwrap();
        assert_eq!(hub.join("a", None).err(), Some(TooManySockets));
        assert!(hub.join("b", None).is_ok(), "another conversation has its own sockets");
        hub.leave("a");
        assert!(hub.join("a", None).is_ok(), "a closed socket frees its place");
    }

    #[test]
    fn presence_is_published_at_once_then_coalesced() {
        let t0 = Instant::now();
        let mut p = PresenceState::default();
        assert_eq!(p.step(1, t0), PresenceStep::Publish(true));
        // Closed and reopened within the grace: nothing reaches the crew.
        assert_eq!(
            p.step(0, t0 + Duration::from_millis(10)),
            PresenceStep::WaitUntil(t0 + Duration::from_millis(1510))
        );
        assert_eq!(p.step(1, t0 + Duration::from_millis(20)), PresenceStep::Nothing);
        p.timer_fired();
        assert_eq!(p.step(1, t0 + Duration::from_millis(1510)), PresenceStep::Nothing);
        // Really gone: offline once the grace has passed, not before.
        assert_eq!(p.step(0, t0 + Duration::from_secs(2)), PresenceStep::WaitUntil(t0 + Duration::from_millis(3500)));
        assert_eq!(p.step(0, t0 + Duration::from_secs(3)), PresenceStep::Nothing, "the timer is armed");
        p.timer_fired();
        assert_eq!(p.step(0, t0 + Duration::from_millis(3500)), PresenceStep::Publish(false));
        // Back: online, but not sooner than a second after the last update.
        assert_eq!(
            p.step(1, t0 + Duration::from_millis(3600)),
            PresenceStep::WaitUntil(t0 + Duration::from_millis(4500))
        );
        p.timer_fired();
        assert_eq!(p.step(1, t0 + Duration::from_millis(4500)), PresenceStep::Publish(true));
    }

    #[test]
    fn a_connect_close_loop_publishes_about_once_a_second() {
        let t0 = Instant::now();
        let mut p = PresenceState::default();
        let mut published = 0;
        let mut timer: Option<Instant> = None;
        // 10,000 opens and closes over 10 s, with the armed timer firing when due.
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_micros(i * 500);
            if timer.is_some_and(|t| now >= t) {
                timer = None;
                p.timer_fired();
            }
            match p.step((i % 2 == 0) as usize, now) {
                PresenceStep::Publish(_) => published += 1,
                PresenceStep::WaitUntil(t) => timer = Some(t),
                PresenceStep::Nothing => {}
            }
        }
        assert!(published <= 11, "{published} presence updates in 10 s");
    }

    #[test]
    fn a_conversation_is_forgotten_once_told_offline() {
        let hub = WidgetHub::new(3, 100);
        let t0 = Instant::now();
        let _m = hub.join("a", None).unwrap();
        assert_eq!(hub.presence_step("a", t0, false).0, PresenceStep::Publish(true));
        hub.leave("a");
        let PresenceStep::WaitUntil(at) = hub.presence_step("a", t0, false).0 else { panic!("a timer") };
        assert_eq!(hub.presence_step("a", at, true).0, PresenceStep::Publish(false));
        assert_eq!(hub.lock().len(), 0);
    }
}
