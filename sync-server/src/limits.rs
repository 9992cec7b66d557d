//! Sliding-window limits on what customers may do (start conversations, send files).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` events per key within `window`; memory is bounded by pruning idle keys.
pub struct Limiter<K> {
    window: Duration,
    max: usize,
    events: Mutex<HashMap<K, Vec<Instant>>>,
}

impl<K: Hash + Eq> Limiter<K> {
    pub fn new(max: usize, window: Duration) -> Limiter<K> {
        Limiter { window, max, events: Mutex::new(HashMap::new()) }
    }

    /// Whether `key` has used up its events in the window (nothing is counted).
    pub fn is_full(&self, key: &K) -> bool {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.get(key).is_some_and(|times| times.iter().filter(|t| t.elapsed() < self.window).count() >= self.max)
    }

    /// Counts an event for `key`; false (and not counted) when the key has used up its events.
    pub fn allow(&self, key: K) -> bool {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() > 100_000 {
            events.retain(|_, times| times.iter().any(|t| t.elapsed() < self.window));
        }
        let times = events.entry(key).or_default();
        times.retain(|t| t.elapsed() < self.window);
        if times.len() >= self.max {
            return false;
        }
        times.push(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_max_events_per_key_within_the_window() {
        let l = Limiter::new(2, Duration::from_millis(200));
        assert!(l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"), "keys are counted apart");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.allow("a"), "the window slides");
    }
}
