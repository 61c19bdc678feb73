//! Rate limits: token buckets that let a device, a session or a tenant do something at most
//! `rate` times a second on average, `burst` times at once, and say how long to wait when it is
//! over. Kept per key in a bounded map, so a flood of one key costs others nothing but the look-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, TenantId};

/// One key's bucket: how many tokens it had at `at`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A rate: `per_sec` tokens a second on average, at most `burst` at once. A rate of 0 is no
/// limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_sec: u32, burst: u32) -> Rate {
        Rate { per_sec: per_sec as f64, burst: burst.max(1) as f64 }
    }

    pub fn unlimited(&self) -> bool {
        self.per_sec <= 0.0
    }

    /// A full bucket, as a key starts with.
    pub fn full(&self, now: Instant) -> Bucket {
        Bucket { tokens: self.burst, at: now }
    }

    /// Take one token from `bucket` at `now`: `Ok`, or how long until one is there.
    pub fn take(&self, bucket: &mut Bucket, now: Instant) -> Result<(), Duration> {
        if self.unlimited() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_sec))
        }
    }

    /// This rate shared by `nodes` nodes: each admits its part (at least one token at once).
    pub fn share(&self, nodes: usize) -> Rate {
        let nodes = nodes.max(1) as f64;
        Rate { per_sec: self.per_sec / nodes, burst: (self.burst / nodes).max(1.0) }
    }

    /// Whether `bucket` would be full again by `now` (then forgetting it changes nothing).
    fn refilled(&self, bucket: &Bucket, now: Instant) -> bool {
        bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec >= self.burst
    }
}

/// Buckets of one limit, per key (a tenant, or a tenant's device).
pub struct RateLimiter {
    rate: Rate,
    buckets: DashMap<Arc<str>, Bucket>,
    /// Most keys held; past it, buckets that are full again are forgotten, and if none is, a new
    /// key is let through unmetered (and the log says so) rather than growing the map.
    max_keys: usize,
}

impl RateLimiter {
    pub fn new(rate: Rate, max_keys: usize) -> RateLimiter {
        RateLimiter { rate, buckets: DashMap::new(), max_keys }
    }

    /// Take one token for `key`: `Ok`, or how long to wait for one.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_share(key, 1)
    }

    /// Take one token for `key` from this node's share of the rate, of `nodes` nodes.
    pub fn take_share(&self, key: &str, nodes: usize) -> Result<(), Duration> {
        if self.rate.unlimited() {
            return Ok(());
        }
        let rate = self.rate.share(nodes);
        let now = Instant::now();
        if let Some(mut bucket) = self.buckets.get_mut(key) {
            return rate.take(&mut bucket, now);
        }
        if self.buckets.len() >= self.max_keys {
            self.forget_refilled();
            if self.buckets.len() >= self.max_keys {
                tracing::warn!(keys = self.max_keys, "rate limiter full; a new key goes unmetered");
                return Ok(());
            }
        }
        let mut bucket = self.buckets.entry(Arc::from(key)).or_insert_with(|| rate.full(now));
        rate.take(&mut bucket, now)
    }

    /// Forget the keys whose buckets are full again: they start full when next seen.
    pub fn forget_refilled(&self) {
        let now = Instant::now();
        self.buckets.retain(|_, bucket| !self.rate.refilled(bucket, now));
    }

    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

/// The hub's rate limits and session cap, from the configuration.
pub struct Limits {
    device_pushes: RateLimiter,
    tenant_pushes: RateLimiter,
    tenant_connects: RateLimiter,
    tenant_http: RateLimiter,
    /// Per session, kept by the session itself.
    pub session_subscribes: Rate,
    /// Sessions this process holds at most.
    pub max_connections: usize,
    /// Nodes of the cluster alive (1 alone): a tenant's rates are shared among them, each
    /// node admitting its part, so that together they hold the configured rate.
    nodes: Arc<AtomicUsize>,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        let keys = config.rate_limit_keys;
        Limits {
            device_pushes: RateLimiter::new(Rate::new(config.device_push_rate, config.device_push_burst), keys),
            tenant_pushes: RateLimiter::new(Rate::new(config.tenant_push_rate, config.tenant_push_burst), keys),
            tenant_connects: RateLimiter::new(Rate::new(config.tenant_connect_rate, config.tenant_connect_burst), keys),
            tenant_http: RateLimiter::new(Rate::new(config.tenant_http_rate, config.tenant_http_burst), keys),
            session_subscribes: Rate::new(config.session_subscribe_rate, config.session_subscribe_burst),
            max_connections: match config.max_connections {
                0 => open_file_limit().saturating_sub(FD_RESERVE).max(MIN_AUTO_CONNECTIONS),
                n => n,
            },
            nodes: Arc::new(AtomicUsize::new(1)),
        }
    }

    /// Where the cluster keeps the count of live nodes for the tenant rates.
    pub fn cluster_nodes(&self) -> Arc<AtomicUsize> {
        self.nodes.clone()
    }

    fn nodes(&self) -> usize {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    /// A push (a batch) by `device` of `tenant`: its device's and its tenant's rates.
    pub fn push(&self, tenant: &TenantId, device: &DeviceId) -> Result<()> {
        let limited = |retry_after| Error::RateLimited { what: "pushes", retry_after };
        self.device_pushes.take(&device_key(tenant.as_str(), device.as_str())).map_err(limited)?;
        self.tenant_pushes.take_share(tenant.as_str(), self.nodes()).map_err(limited)
    }

    /// A new session (`hello`) of `tenant`.
    pub fn connect(&self, tenant: &TenantId) -> Result<()> {
        self.tenant_connects.take_share(tenant.as_str(), self.nodes()).map_err(|retry_after| Error::RateLimited { what: "new sessions", retry_after })
    }

    /// An HTTP API request for `tenant`.
    pub fn http(&self, tenant: &TenantId) -> Result<()> {
        self.tenant_http.take_share(tenant.as_str(), self.nodes()).map_err(|retry_after| Error::RateLimited { what: "API requests", retry_after })
    }
}

/// File descriptors kept for other than sessions, when the session cap is derived from the
/// open-file limit: the pool's connections, the listener, the capture file, and margin.
const FD_RESERVE: usize = 512;
/// The least session cap derived from a small open-file limit.
const MIN_AUTO_CONNECTIONS: usize = 64;

/// The process's open-file limit (soft), as `getrlimit` reports it.
fn open_file_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok && limit.rlim_cur != libc::RLIM_INFINITY {
        limit.rlim_cur as usize
    } else {
        // Unknown or unlimited: as many as a common default allows.
        65_536
    }
}

/// A key of a tenant's device, for limiters kept per device. Ids hold no NUL (see
/// `ids::id_problem`), so the two parts cannot run into each other.
pub fn device_key(tenant: &str, device: &str) -> String {
    format!("{tenant}\0{device}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_then_the_rate_then_a_wait() {
        let rate = Rate::new(10, 3);
        let start = Instant::now();
        let mut bucket = rate.full(start);
        for _ in 0..3 {
            assert_eq!(rate.take(&mut bucket, start), Ok(()));
        }
        let wait = rate.take(&mut bucket, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(rate.take(&mut bucket, start + Duration::from_millis(100)), Ok(()));
        assert!(rate.take(&mut bucket, start + Duration::from_millis(150)).is_err());
    }

    #[test]
    fn keys_are_metered_apart_and_refilled_keys_are_forgotten() {
        let limiter = RateLimiter::new(Rate::new(1, 1), 2);
        assert_eq!(limiter.take("a"), Ok(()));
        assert!(limiter.take("a").is_err());
        assert_eq!(limiter.take("b"), Ok(()), "another key has its own bucket");
        // Full map, no bucket refilled: a new key is let through without a bucket.
        assert_eq!(limiter.take("c"), Ok(()));
        assert_eq!(limiter.keys(), 2);
        assert!(limiter.take("a").is_err(), "a's bucket is kept while it is not full");
    }

    #[test]
    fn a_tenant_rate_shared_by_three_nodes_holds_across_them() {
        // Each node admits a third: three nodes together admit the burst, and the rate.
        let nodes: Vec<RateLimiter> = (0..3).map(|_| RateLimiter::new(Rate::new(30, 9), 10)).collect();
        let admitted = nodes.iter().map(|n| (0..20).filter(|_| n.take_share("t", 3).is_ok()).count()).sum::<usize>();
        assert_eq!(admitted, 9);
        let alone = RateLimiter::new(Rate::new(30, 9), 10);
        assert_eq!((0..20).filter(|_| alone.take_share("t", 1).is_ok()).count(), 9);
        assert_eq!(Rate::new(30, 2).share(3), Rate { per_sec: 10.0, burst: 1.0 }, "a share keeps at least one token");
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let limiter = RateLimiter::new(Rate::new(0, 1), 1);
        for _ in 0..100 {
            assert_eq!(limiter.take("a"), Ok(()));
        }
        assert_eq!(limiter.keys(), 0);
    }

    proptest! {
        /// Over any span, no more than burst + rate × span tokens are taken, and every refusal
        /// says to wait at most 1 / rate.
        #[test]
        fn never_more_than_burst_plus_rate(per_sec in 1u32..1000, burst in 1u32..100, steps in prop::collection::vec(0u64..50_000, 1..200)) {
            let rate = Rate::new(per_sec, burst);
            let start = Instant::now();
            let mut bucket = rate.full(start);
            let (mut now, mut taken) = (start, 0u64);
            for step in steps {
                now += Duration::from_micros(step);
                match rate.take(&mut bucket, now) {
                    Ok(()) => taken += 1,
                    Err(wait) => prop_assert!(wait <= Duration::from_secs_f64(1.0 / per_sec as f64) + Duration::from_nanos(1)),
                }
            }
            let span = now.duration_since(start).as_secs_f64();
            prop_assert!(taken as f64 <= burst as f64 + span * per_sec as f64 + 1e-6);
        }
    }
}
