//! Who is signed in: tokens checked against an in-memory cache (a known token costs one read of
//! the access version, not a lookup), failed sign-ins limited per address (beyond the limit, no
//! database work at all), and open connections checked again whenever the store's access version
//! moves (a token revoked, a membership or role changed).

use super::*;
use crate::store::hash_token;
use std::net::IpAddr;

/// Failed sign-ins one address (IPv6: one /64) may make per minute; beyond them, sign-ins from
/// there are refused without looking at the token.
pub(super) const FAILURES_PER_MINUTE: usize = 20;

/// Tokens kept in the cache at most (cleared when full; a team of 1,000 agents uses ~1,000).
const MAX_CACHED: usize = 10_000;

/// How often the store's access version is read: revocation reaches open connections within this.
const ACCESS_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// A token that signed in: its agent and when (by the access version) it was checked.
pub(crate) struct SignedIn {
    pub(crate) agent: Agent,
    pub(super) token_hash: String,
    pub(super) version: i64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SignInError {
    #[error("authentication failed: missing, unknown or revoked token")]
    Refused,
    #[error("too many failed sign-ins from your address; wait a minute")]
    TooManyFailures,
    /// The store failed; what failed goes to the log only.
    #[error("the relay cannot check tokens right now; try again shortly")]
    Unavailable,
}

impl SignInError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            SignInError::Refused => StatusCode::UNAUTHORIZED,
            SignInError::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
            SignInError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

pub(super) struct Credentials {
    cache: Mutex<Cache>,
    failures: crate::limits::Limiter<IpAddr>,
    /// Tokens not in the cache are looked up a few at a time: a flood of made-up tokens waits here,
    /// and once an address has failed enough its attempts are refused without a lookup, while a
    /// burst of good tokens from one address (an office behind one NAT, reconnecting after a relay
    /// restart) is only queued, never refused.
    checks: tokio::sync::Semaphore,
    /// Tokens looked up in the store since the start (shown by `/health`).
    pub(super) lookups: AtomicU64,
}

/// Token lookups at once (not in the cache).
const CHECKS_AT_ONCE: usize = 4;

#[derive(Default)]
struct Cache {
    /// The access version the cached agents were read at (`None`: not read yet).
    version: Option<i64>,
    agents: HashMap<String, Agent>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            cache: Mutex::default(),
            failures: crate::limits::Limiter::new(FAILURES_PER_MINUTE, std::time::Duration::from_secs(60)),
            checks: tokio::sync::Semaphore::new(CHECKS_AT_ONCE),
            lookups: AtomicU64::new(0),
        }
    }
}

impl Relay {
    /// The address sign-ins are counted under: the client's, past trusted proxies.
    pub(crate) fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        crate::widget::net::counted(crate::widget::net::client_ip(peer, headers, &self.config.trusted_proxies))
    }

    /// Checks a token: from the cache when it signed in since access last changed, else from the
    /// store. An address with too many failures is refused before its token is looked at.
    pub(crate) async fn sign_in(&self, token: Option<String>, from: IpAddr) -> Result<SignedIn, SignInError> {
        let token = token.filter(|t| !t.is_empty() && t.len() <= 200);
        let Some(token) = token else {
            self.credentials.failures.allow(from);
            return Err(SignInError::Refused);
        };
        let hash = hash_token(&token);
        let cached = {
            let cache = self.credentials.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.version.and_then(|v| cache.agents.get(&hash).map(|a| (a.clone(), v)))
        };
        // A token that signed in since access last changed: one read of the access version (a
        // single row) instead of the token and membership lookup, so a removal made a moment ago
        // is never missed; allowed even from an address that is failing (agents behind the same
        // NAT as an attacker keep working).
        if let Some((agent, version)) = cached {
            match self.blocking(|s| s.access_version()).await {
                Ok(now) if now == version => return Ok(SignedIn { agent, token_hash: hash, version }),
                Ok(_) => {}
                Err(e) => {
                    warn!(%e, "the access version could not be read");
                    return Err(SignInError::Unavailable);
                }
            }
        }
        // Failures are counted when they happen; lookups go a few at a time, and each checks the
        // address's failures first, so a flood costs at most the limit plus the lookups in flight.
        if self.credentials.failures.is_full(&from) {
            return Err(SignInError::TooManyFailures);
        }
        let Ok(_check) = self.credentials.checks.acquire().await else { return Err(SignInError::Unavailable) };
        if self.credentials.failures.is_full(&from) {
            return Err(SignInError::TooManyFailures);
        }
        self.credentials.lookups.fetch_add(1, Ordering::Relaxed);
        let h = hash.clone();
        let read = self.blocking(move |s| Ok((s.access_version()?, s.authenticate_hash(&h)?))).await;
        match read {
            Ok((version, Some(agent))) => {
                let mut cache = self.credentials.cache.lock().unwrap_or_else(|p| p.into_inner());
                // Cached only when read at the version the cache holds (or a first one).
                if cache.version.is_none() {
                    cache.version = Some(version);
                }
                if cache.version == Some(version) {
                    if cache.agents.len() >= MAX_CACHED {
                        cache.agents.clear();
                    }
                    cache.agents.insert(hash.clone(), agent.clone());
                }
                Ok(SignedIn { agent, token_hash: hash, version })
            }
            Ok((_, None)) => {
                self.credentials.failures.allow(from);
                Err(SignInError::Refused)
            }
            Err(e) => {
                warn!(%e, "a token could not be checked");
                Err(SignInError::Unavailable)
            }
        }
    }

    /// Whether access changed after a sign-in checked at `version`.
    pub(super) fn access_moved_since(&self, version: i64) -> bool {
        let cache = self.credentials.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.version != Some(version)
    }

    /// Checks open connections against the store: a revoked token's are closed (signed out), an
    /// agent whose teams or roles changed is disconnected to sync again with the new access.
    pub(super) async fn check_again(&self, sessions: &[Session]) {
        let mut by_token: HashMap<Arc<str>, Vec<&Session>> = HashMap::new();
        for s in sessions {
            by_token.entry(s.token_hash.clone()).or_default().push(s);
        }
        for (hash, sessions) in by_token {
            let h = hash.to_string();
            let now = match self.blocking(move |s| s.authenticate_hash(&h)).await {
                Ok(now) => now,
                Err(e) => {
                    warn!(%e, "open connections could not be checked against revoked tokens");
                    continue;
                }
            };
            for session in sessions {
                let why = match &now {
                    None => Hangup {
                        code: close::SIGNED_OUT,
                        reason: "signed out: token revoked".into(),
                        error: Some(
                            "signed out: token revoked (or its agent removed); sign in again with a new token".into(),
                        ),
                    },
                    Some(agent) if agent.teams != session.agent.teams => Hangup {
                        code: close::ACCESS_CHANGED,
                        reason: "your teams or roles changed; reconnect".into(),
                        error: Some("your teams or roles changed; reconnecting to sync with the new access".into()),
                    },
                    Some(_) => continue,
                };
                info!(agent = %session.agent.id, reason = %why.reason, "closing a connection whose access changed");
                session.hangup.hang_up(why);
            }
        }
    }
}

/// Reads the store's access version every `ACCESS_POLL`; when it moves (whoever moved it: this
/// relay, an admin command, another instance), the token cache is dropped and every open
/// connection is checked again.
pub(super) async fn watch_access(relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ACCESS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let version = match relay.blocking(|s| s.access_version()).await {
            Ok(v) => v,
            Err(e) => {
                debug!(%e, "the access version could not be read");
                continue;
            }
        };
        let moved = {
            let mut cache = relay.credentials.cache.lock().unwrap_or_else(|p| p.into_inner());
            let moved = cache.version.is_some_and(|v| v != version);
            if cache.version != Some(version) {
                cache.version = Some(version);
                cache.agents.clear();
            }
            moved
        };
        if moved {
            let sessions: Vec<Session> =
                relay.sessions.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            relay.check_again(&sessions).await;
        }
    }
}
