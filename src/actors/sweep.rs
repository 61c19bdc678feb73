//! The session clock: one task for all sessions instead of timers in each. Every tick it
//! checks each open session's hello deadline and token expiry, and every heartbeat interval it
//! tells each session to ping its client; a session acts on these as control messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::device::DeviceSession;
use super::messages::SessionControl;
use crate::server::Hub;

/// What the hub keeps of an open session: where to reach it, its deadline, and when its client
/// was last heard. The session clock and the session's tenant actor share it, so a session
/// costs one mailbox sender; what the session itself needs only now and then lives here too,
/// which keeps an idle session in a smaller allocation.
pub struct SessionHandle {
    pub session: Addr<DeviceSession>,
    /// Unix milliseconds of the session's next deadline: by which `hello` must arrive until it
    /// did, then after which its token (plus leeway) is void; 0 when the session was told, or
    /// between `hello` and its token's verification.
    pub deadline_ms: AtomicU64,
    /// When the client's last frame came, in `monotonic_ms`.
    pub last_heard_ms: AtomicU64,
    /// Bytes the client has confirmed reading (the count a pong echoes back).
    pub bytes_confirmed: AtomicU64,
}

impl SessionHandle {
    pub fn new(session: Addr<DeviceSession>, hello_deadline_ms: u64) -> SessionHandle {
        SessionHandle { session, deadline_ms: AtomicU64::new(hello_deadline_ms), last_heard_ms: AtomicU64::new(monotonic_ms()), bytes_confirmed: AtomicU64::new(0) }
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
fn fire(deadline: &AtomicU64, now_ms: u64, session: &Addr<DeviceSession>, msg: SessionControl) {
    let at = deadline.load(Ordering::Relaxed);
    if at != 0 && now_ms >= at && session.try_send(msg).is_ok() {
        // A refresh that stored a new deadline meanwhile wins.
        let _ = deadline.compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Run until the hub is dropped or the task is aborted at shutdown.
pub async fn run(hub: Arc<Hub>) {
    let interval = hub.config.heartbeat_interval();
    // Deadlines are met within a tick; hello timeouts and token expiry are seconds apart.
    let tick = Duration::from_millis(250).min(interval).min(hub.config.hello_timeout() / 2).max(Duration::from_millis(10));
    let mut next_heartbeat = Instant::now() + interval;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now_ms = unix_ms();
        let heartbeat = Instant::now() >= next_heartbeat;
        if heartbeat {
            next_heartbeat = Instant::now() + interval;
        }
        for entry in hub.sessions.iter() {
            let handle = entry.value();
            fire(&handle.deadline_ms, now_ms, &handle.session, SessionControl::Deadline);
            if heartbeat {
                // A full mailbox means the session is busy with frames: it is alive.
                let _ = handle.session.try_send(SessionControl::Heartbeat);
            }
        }
    }
}
