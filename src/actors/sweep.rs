//! The session clock: one task for all sessions instead of timers in each. Every tick it
//! checks each open session's hello deadline and token expiry, and tells the sessions whose
//! heartbeat slot came round to ping their client (each once per heartbeat interval); a
//! session acts on these as control messages. When the last tenant actor stops, it has the
//! allocator give its free pages back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::device::DeviceSession;
use super::messages::{LiveFrame, Notice, RefreshToken, SessionControl};
use crate::ids::SessionId;
use crate::server::Hub;

/// What the hub keeps of an open session: where to reach it, its deadline, and when its client
/// was last heard. The session clock and the session's tenant actor share it, so a session
/// costs one mailbox sender; what the session itself needs only now and then lives here too,
/// which keeps an idle session in a smaller allocation.
pub struct SessionHandle {
    pub session: SessionAddr,
    /// Unix milliseconds of the session's next deadline: by which `hello` must arrive until it
    /// did, then after which its token (plus leeway) is void; 0 when the session was told, or
    /// between `hello` and its token's verification.
    pub deadline_ms: AtomicU64,
    /// When the client's last frame came, in `monotonic_ms`.
    pub last_heard_ms: AtomicU64,
    /// Bytes the client has confirmed reading (the count a pong echoes back).
    pub bytes_confirmed: AtomicU64,
    /// Bytes the session has written (only the session writes it). Kept here rather than in
    /// the session, whose idle size is at its allocation class's edge; this allocation had
    /// room.
    pub bytes_written: AtomicU64,
}

impl SessionHandle {
    pub fn new(session: SessionAddr, hello_deadline_ms: u64) -> SessionHandle {
        SessionHandle { session, deadline_ms: AtomicU64::new(hello_deadline_ms), last_heard_ms: AtomicU64::new(monotonic_ms()), bytes_confirmed: AtomicU64::new(0), bytes_written: AtomicU64::new(0) }
    }
}

/// Where a session of any wire protocol is reached. Native sessions, by far the most numerous,
/// keep a plain address (one sender); sessions of other protocols (RxDB, Supabase Realtime)
/// are reached through one recipient per message kind, so that this module needs to know
/// nothing of the transports above it.
#[derive(Clone)]
pub enum SessionAddr {
    Native(Addr<DeviceSession>),
    Adapter(Arc<AdapterRecipients>),
}

/// The messages every session takes, as recipients of an adapter's actor.
pub struct AdapterRecipients {
    pub live: Recipient<LiveFrame>,
    pub notice: Recipient<Notice>,
    pub control: Recipient<SessionControl>,
    pub refresh: Recipient<RefreshToken>,
}

impl AdapterRecipients {
    pub fn of<A>(addr: &Addr<A>) -> AdapterRecipients
    where
        A: Actor + Handler<LiveFrame> + Handler<Notice> + Handler<SessionControl> + Handler<RefreshToken>,
        A::Context: actix::dev::ToEnvelope<A, LiveFrame>
            + actix::dev::ToEnvelope<A, Notice>
            + actix::dev::ToEnvelope<A, SessionControl>
            + actix::dev::ToEnvelope<A, RefreshToken>,
    {
        AdapterRecipients { live: addr.clone().recipient(), notice: addr.clone().recipient(), control: addr.clone().recipient(), refresh: addr.clone().recipient() }
    }
}

impl SessionAddr {
    pub fn try_live(&self, msg: LiveFrame) -> Result<(), SendError<LiveFrame>> {
        match self {
            SessionAddr::Native(addr) => addr.try_send(msg),
            SessionAddr::Adapter(r) => r.live.try_send(msg),
        }
    }

    pub fn try_notice(&self, msg: Notice) -> Result<(), SendError<Notice>> {
        match self {
            SessionAddr::Native(addr) => addr.try_send(msg),
            SessionAddr::Adapter(r) => r.notice.try_send(msg),
        }
    }

    pub fn try_control(&self, msg: SessionControl) -> Result<(), SendError<SessionControl>> {
        match self {
            SessionAddr::Native(addr) => addr.try_send(msg),
            SessionAddr::Adapter(r) => r.control.try_send(msg),
        }
    }

    /// Hand a fresh token to the session and wait (at most `wait`) for its answer.
    pub async fn refresh(&self, msg: RefreshToken, wait: Duration) -> Result<crate::error::Result<u64>, MailboxError> {
        match self {
            SessionAddr::Native(addr) => addr.send(msg).timeout(wait).await,
            SessionAddr::Adapter(r) => r.refresh.send(msg).timeout(wait).await,
        }
    }

    pub fn connected(&self) -> bool {
        match self {
            SessionAddr::Native(addr) => addr.connected(),
            SessionAddr::Adapter(r) => r.control.connected(),
        }
    }
}

/// Milliseconds on a monotonic clock that starts at the process's first call.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Tell a session once that `deadline` passed; if its mailbox is full, try again next tick.
fn fire(deadline: &AtomicU64, now_ms: u64, session: &SessionAddr, msg: SessionControl) {
    let at = deadline.load(Ordering::Relaxed);
    if at != 0 && now_ms >= at && session.try_control(msg).is_ok() {
        // A refresh that stored a new deadline meanwhile wins.
        let _ = deadline.compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Run until the hub is dropped or the task is aborted at shutdown.
pub async fn run(hub: Arc<Hub>) {
    let interval = hub.config.heartbeat_interval();
    // Deadlines are met within a tick; hello timeouts and token expiry are seconds apart.
    let tick = Duration::from_millis(250).min(interval).min(hub.config.hello_timeout() / 2).max(Duration::from_millis(10));
    let slots = HeartbeatSlots::new(interval, tick);
    let started = Instant::now();
    let mut last_tick = 0;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tenants_were_running = false;
    loop {
        ticker.tick().await;
        let tenants_running = hub.registry.tenant_count() > 0;
        if tenants_were_running && !tenants_running {
            // The last tenant actor stopped: the hub is idle, and what its row caches, queues
            // and frames held is free. Returned now rather than never, for arenas that no
            // longer allocate do not decay on their own.
            // Each thread's allocator cache goes back first: it would keep the pages of what it
            // caches in use.
            let hub = hub.clone();
            tokio::spawn(async move {
                if let Some((before, after)) = hub.threads.flush_and_purge().await {
                    tracing::info!(resident_before = before, resident_after = after, "hub idle: free memory returned to the system");
                }
            });
        }
        tenants_were_running = tenants_running;
        let now_ms = unix_ms();
        // Ticks count from the start, so a late tick still covers every slot it passed.
        let this_tick = (started.elapsed().as_millis() / tick.as_millis()) as u64;
        for entry in hub.sessions.iter() {
            let handle = entry.value();
            fire(&handle.deadline_ms, now_ms, &handle.session, SessionControl::Deadline);
            if slots.due(slots.of(entry.key()), last_tick, this_tick) {
                // A full mailbox means the session is busy with frames: it is alive.
                let _ = handle.session.try_control(SessionControl::Heartbeat);
            }
        }
        last_tick = this_tick;
    }
}

/// Heartbeats spread over the interval: each session has a slot, one of the interval's ticks
/// (from its random id), and is pinged when the clock passes it. Pinging every session in the
/// same tick sent a ping to, and read a pong from, each of them at once, and pushes that came
/// in meanwhile waited behind that burst (device→device p99 rose in the seconds it happened).
#[derive(Debug, Clone, Copy)]
struct HeartbeatSlots {
    count: u64,
}

impl HeartbeatSlots {
    fn new(interval: Duration, tick: Duration) -> HeartbeatSlots {
        HeartbeatSlots { count: (interval.as_millis() / tick.as_millis().max(1)).max(1) as u64 }
    }

    fn of(&self, session: &SessionId) -> u64 {
        session.as_u64_pair().0 % self.count
    }

    /// Whether `slot` is among the ticks after `last_tick` up to `this_tick`.
    fn due(&self, slot: u64, last_tick: u64, this_tick: u64) -> bool {
        let passed = this_tick.saturating_sub(last_tick);
        passed >= self.count || (slot + self.count - (last_tick + 1) % self.count) % self.count < passed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_interval_of_ticks_gives_each_session_its_own_tick() {
        let slots = HeartbeatSlots::new(Duration::from_secs(15), Duration::from_millis(250));
        assert_eq!(slots.count, 60);
        let ids: Vec<SessionId> = (0..6_000).map(|_| SessionId::new_v4()).collect();
        let mut per_tick = vec![0usize; 60];
        for id in &ids {
            let slot = slots.of(id);
            let due: Vec<u64> = (0..60).filter(|&t| slots.due(slot, t, t + 1)).collect();
            assert_eq!(due.len(), 1, "one tick per interval");
            per_tick[due[0] as usize] += 1;
        }
        // About 100 per tick: no tick pings more than a small share of the sessions.
        assert!(per_tick.iter().all(|&n| n > 40 && n < 200), "{per_tick:?}");
        // An interval no longer than a tick pings everyone every tick.
        let one = HeartbeatSlots::new(Duration::from_millis(100), Duration::from_millis(100));
        assert!(ids.iter().all(|id| one.due(one.of(id), 7, 8)));
    }

    proptest! {
        /// However late a tick comes, it pings exactly the slots of the ticks it passed, so
        /// over any run of ticks each slot is due once per interval: none skipped, none twice.
        #[test]
        fn late_ticks_skip_no_slot_and_repeat_none(count in 1u64..100, start in 0u64..1_000, steps in proptest::collection::vec(1u64..150, 1..50)) {
            let slots = HeartbeatSlots { count };
            let mut last = start;
            for step in steps {
                let this = last + step;
                for slot in 0..count {
                    let passed = (last + 1..=this).any(|t| t % count == slot);
                    prop_assert_eq!(slots.due(slot, last, this), passed, "slot {} from {} to {}", slot, last, this);
                }
                last = this;
            }
        }
    }
}
