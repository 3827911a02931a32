//! Who may use the tracker's HTTP side: bearer tokens for the API, logins
//! and sessions for the dashboard, roles, and the limit on failed attempts.
//!
//! Secrets (`tracker.tokens`, `tracker.users`) are read once at start from
//! the environment variable or file each entry names; only an HMAC-SHA256
//! digest of each, under a key drawn at random for this process, is kept in
//! memory, and a presented secret is digested the same way and compared in
//! constant time. Sessions are random 256-bit ids held in memory (a restart
//! logs everyone out), each with its own CSRF token.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use warren_core::config::{SecretSource, TrackerCredential, TrackerRole};
use warren_core::Config;

/// Shortest API token accepted.
const MIN_TOKEN_CHARS: usize = 16;

/// Shortest dashboard password accepted.
const MIN_PASSWORD_CHARS: usize = 8;

/// Most sessions kept at once; past that the oldest goes.
const MAX_SESSIONS: usize = 10_000;

/// Most client addresses whose failures are remembered at once.
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The window of the failed-attempt limit.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Longest user name written to a log line.
const MAX_LOGGED_NAME: usize = 64;

type Digest = [u8; 32];

/// A credential as kept in memory: its name, role and secret's digest.
struct Known {
    name: String,
    role: TrackerRole,
    digest: Digest,
}

/// Who made a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The token's or user's name; `anonymous` in open mode.
    pub name: String,
    /// What it may do.
    pub role: TrackerRole,
    /// How it was authenticated.
    pub via: Via,
}

/// How a request was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// `Authorization: Bearer`.
    Token,
    /// A dashboard session, with its CSRF token.
    Session { csrf: String },
    /// `tracker.open = true`: nobody is asked.
    Open,
}

/// A dashboard session.
#[derive(Debug, Clone)]
struct Session {
    user: String,
    role: TrackerRole,
    csrf: String,
    expires: Instant,
}

/// The tracker's credentials, sessions and failed-attempt counts.
pub(crate) struct Auth {
    open: bool,
    key: [u8; 32],
    tokens: Vec<Known>,
    users: Vec<Known>,
    session_ttl: Duration,
    max_failures: usize,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Auth {
    /// Reads every secret the configuration names. The error is one line
    /// naming the key (never a secret).
    pub fn from_config(config: &Config) -> Result<Auth, String> {
        if let Some(missing) = config.tracker_auth_missing() {
            return Err(missing);
        }
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let mut auth = Auth {
            open: config.tracker.open,
            key,
            tokens: Vec::new(),
            users: Vec::new(),
            session_ttl: Duration::from_millis(config.tracker.session_ttl_ms),
            max_failures: config.tracker.max_failed_logins_per_minute as usize,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        };
        for (i, c) in config.tracker_tokens().iter().enumerate() {
            let secret = read_secret(&format!("tracker.tokens[{i}]"), c, MIN_TOKEN_CHARS)?;
            auth.tokens.push(auth.known(c, &secret));
        }
        for (i, c) in config.tracker_users().iter().enumerate() {
            let secret = read_secret(&format!("tracker.users[{i}]"), c, MIN_PASSWORD_CHARS)?;
            auth.users.push(auth.known(c, &secret));
        }
        Ok(auth)
    }

    /// Credentials that let nobody in (for a tracker that serves no HTTP).
    pub fn closed() -> Auth {
        Auth {
            open: false,
            key: [0u8; 32],
            tokens: Vec::new(),
            users: Vec::new(),
            session_ttl: Duration::ZERO,
            max_failures: 1,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self, c: &TrackerCredential, secret: &str) -> Known {
        Known {
            name: c.name.clone(),
            role: c.role,
            digest: self.digest(secret.as_bytes()),
        }
    }

    /// Whether authentication is off (`tracker.open = true`).
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn digest(&self, secret: &[u8]) -> Digest {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }

    /// The token's name and role, if `token` is one of `tracker.tokens`.
    /// Every token is compared, in constant time.
    pub fn token(&self, token: &str) -> Option<Identity> {
        let digest = self.digest(token.as_bytes());
        let mut found = None;
        for known in &self.tokens {
            if bool::from(known.digest.ct_eq(&digest)) && found.is_none() {
                found = Some(Identity {
                    name: known.name.clone(),
                    role: known.role,
                    via: Via::Token,
                });
            }
        }
        found
    }

    /// The user's role if `password` is theirs. An unknown user costs the
    /// same digest and comparison as a known one.
    pub fn login(&self, user: &str, password: &str) -> Option<TrackerRole> {
        let digest = self.digest(password.as_bytes());
        let known = self.users.iter().find(|k| k.name == user);
        let expected = known.map_or([0u8; 32], |k| k.digest);
        let matches = bool::from(expected.ct_eq(&digest));
        known.filter(|_| matches).map(|k| k.role)
    }

    /// Opens a session: its id (the cookie's value) and how long it lasts.
    pub fn open_session(&self, user: &str, role: TrackerRole) -> (String, Duration) {
        let id = random_token();
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_token(),
                expires: now + self.session_ttl,
            },
        );
        (id, self.session_ttl)
    }

    /// The identity of a live session.
    pub fn session(&self, id: &str) -> Option<Identity> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let s = sessions.get(id)?;
        if s.expires <= Instant::now() {
            sessions.remove(id);
            return None;
        }
        Some(Identity {
            name: s.user.clone(),
            role: s.role,
            via: Via::Session {
                csrf: s.csrf.clone(),
            },
        })
    }

    /// Ends a session.
    pub fn close_session(&self, id: &str) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }

    /// How long `client` must wait before it may try a credential again,
    /// if it used up its failed attempts of the last minute.
    pub fn blocked_for(&self, client: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("failures lock");
        let times = failures.get_mut(&client)?;
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
        {
            times.pop_front();
        }
        if times.is_empty() {
            failures.remove(&client);
            return None;
        }
        (times.len() >= self.max_failures)
            .then(|| FAILURE_WINDOW.saturating_sub(now.duration_since(times[0])))
    }

    /// Counts a failed login or bad token of `client`; true when this one
    /// used up its allowance (from now on it is answered 429).
    pub fn record_failure(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() >= MAX_TRACKED_CLIENTS && !failures.contains_key(&client) {
            failures.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        let times = failures.entry(client).or_default();
        times.push_back(now);
        while times.len() > self.max_failures {
            times.pop_front();
        }
        times.len() >= self.max_failures
    }
}

/// Reads a credential's secret; the error names the key and the source.
fn read_secret(key: &str, c: &TrackerCredential, min_chars: usize) -> Result<String, String> {
    let what = format!("config key {key} ({}:{})", c.name, c.role);
    let raw = match &c.source {
        SecretSource::Env(var) => std::env::var(var).map_err(|_| {
            format!("{what}: environment variable {var} is not set (or not UTF-8): set it to the secret")
        })?,
        SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            format!("{what}: cannot read the secret from file {}: {e}", path.display())
        })?,
    };
    let secret = raw.strip_suffix('\n').unwrap_or(&raw);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.chars().count() < min_chars {
        return Err(format!(
            "{what}: the secret in {} is shorter than {min_chars} characters: use a longer \
             one, for example 32 random characters (openssl rand -hex 16)",
            c.source
        ));
    }
    Ok(secret.to_owned())
}

/// 256 random bits from the operating system, as 64 hex digits.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whether two tokens are equal, compared in constant time.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A user name as it may appear in a log line: at most 64 characters.
pub(crate) fn loggable(name: &str) -> String {
    name.chars().take(MAX_LOGGED_NAME).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(toml: &str, vars: &[(&str, &str)]) -> Result<Auth, String> {
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        Auth::from_config(&Config::from_toml(toml).unwrap())
    }

    #[test]
    fn tokens_users_and_roles() {
        let a = auth(
            "[tracker]\ntokens = [\"ops:admin:env:WT_AUTH_T1\", \"ci:read:env:WT_AUTH_T2\"]\n\
             users = [\"alice:read:env:WT_AUTH_P1\"]",
            &[
                ("WT_AUTH_T1", "admin-token-0123456789\n"),
                ("WT_AUTH_T2", "read-token-0123456789"),
                ("WT_AUTH_P1", "alice-password"),
            ],
        )
        .unwrap();
        assert_eq!(
            a.token("admin-token-0123456789").unwrap().role,
            TrackerRole::Admin
        );
        let ci = a.token("read-token-0123456789").unwrap();
        assert_eq!((ci.name.as_str(), ci.role), ("ci", TrackerRole::Read));
        assert!(a.token("admin-token-012345678").is_none());
        assert!(a.token("").is_none());
        assert_eq!(a.login("alice", "alice-password"), Some(TrackerRole::Read));
        assert_eq!(a.login("alice", "alice-passwor"), None);
        assert_eq!(a.login("bob", "alice-password"), None);
        assert!(!a.is_open());
    }

    #[test]
    fn secrets_missing_or_short_are_one_line_naming_the_key() {
        let e = auth(
            "[tracker]\ntokens = [\"ops:admin:env:WT_AUTH_UNSET_VAR\"]",
            &[],
        )
        .err()
        .unwrap();
        assert!(e.starts_with("config key tracker.tokens[0] (ops:admin): environment variable WT_AUTH_UNSET_VAR is not set"), "{e}");
        let e = auth(
            "[tracker]\nusers = [\"bob:read:env:WT_AUTH_SHORT\"]",
            &[("WT_AUTH_SHORT", "pw-1")],
        )
        .err()
        .unwrap();
        assert!(
            e.contains("tracker.users[0]") && e.contains("shorter than 8"),
            "{e}"
        );
        assert!(!e.contains("pw-1"), "{e}");
        let e = auth(
            "[tracker]\ntokens = [\"x:read:file:/nonexistent/wt-token\"]",
            &[],
        )
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/wt-token"), "{e}");
        let e = auth("", &[]).err().unwrap();
        assert!(
            e.contains("tracker.tokens") && e.contains("tracker.open"),
            "{e}"
        );
        assert!(auth("[tracker]\nopen = true", &[]).unwrap().is_open());
    }

    #[test]
    fn sessions_expire_and_close() {
        let a = auth("[tracker]\nopen = true\nsession_ttl_ms = 60000", &[]).unwrap();
        let (id, ttl) = a.open_session("alice", TrackerRole::Admin);
        assert_eq!(ttl, Duration::from_secs(60));
        assert_eq!(id.len(), 64);
        let who = a.session(&id).unwrap();
        assert_eq!(who.name, "alice");
        let Via::Session { csrf } = &who.via else {
            panic!("{who:?}")
        };
        assert_eq!(csrf.len(), 64);
        assert_ne!(csrf, &id);
        assert!(a.session("nope").is_none());
        a.close_session(&id);
        assert!(a.session(&id).is_none());
        let a = auth("[tracker]\nopen = true\nsession_ttl_ms = 1", &[]).unwrap();
        let (id, _) = a.open_session("bob", TrackerRole::Read);
        std::thread::sleep(Duration::from_millis(5));
        assert!(a.session(&id).is_none(), "expired");
    }

    #[test]
    fn failures_are_limited_per_client() {
        let a = auth(
            "[tracker]\nopen = true\nmax_failed_logins_per_minute = 3",
            &[],
        )
        .unwrap();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(a.blocked_for(one).is_none());
        assert!(!a.record_failure(one));
        assert!(!a.record_failure(one));
        assert!(a.blocked_for(one).is_none());
        assert!(a.record_failure(one));
        let wait = a.blocked_for(one).unwrap();
        assert!(
            wait <= FAILURE_WINDOW && wait > Duration::from_secs(50),
            "{wait:?}"
        );
        assert!(a.blocked_for(two).is_none());
    }

    #[test]
    fn token_helpers() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
        assert_ne!(random_token(), random_token());
        assert_eq!(loggable(&"x".repeat(100)).len(), 64);
    }
}
