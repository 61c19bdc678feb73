//! An idle hub gives its memory back: after a burst of pushes to many tenants, once every
//! tenant actor has stopped, the allocator's resident bytes come back near its allocated bytes,
//! and its active pages near those of the start.
//! This test binary allocates with jemalloc, as the `synchub` binary does.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use protocol::ChangeStatus;
use serde_json::json;
use synchub::metrics::AllocatorStats;
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const TENANTS: usize = 16;
const BATCHES: u64 = 4;
const ROWS_PER_BATCH: usize = 250;
/// Resident bytes that may stay above allocated ones once idle: the allocator's metadata and
/// thread caches (about 6 MiB in this test before the burst).
const IDLE_SLACK: u64 = 24 << 20;
/// Active pages an idle hub may hold above those of the start: the sessions' and tenants' maps
/// as the burst left them, and what the test's own clients keep.
const ACTIVE_SLACK: u64 = 11 << 20;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// One store's burst: a device pushes rows with names of a kilobyte, batch after batch.
async fn burst(hub: &TestHub, tenant: String) {
    let (mut c, _, _) = Client::device(hub, &tenant, "till-1").await;
    let name = "n".repeat(1024);
    for b in 0..BATCHES {
        let changes = (0..ROWS_PER_BATCH)
            .map(|i| {
                let id = Uuid::now_v7();
                let seq = b * ROWS_PER_BATCH as u64 + i as u64 + 1;
                upsert("products", json!({"id": id}), json!({"sku": format!("SKU-{seq}"), "name": name, "price_cents": 100}), seq, now_ms(), 0)
            })
            .collect();
        let results = c.push(changes).await;
        assert!(results.iter().all(|r| r.status == ChangeStatus::Applied), "{tenant}: {:?}", results.first());
    }
    c.ws.close(None).await.unwrap();
}

#[actix_web::test]
async fn resident_memory_returns_near_allocated_once_every_tenant_actor_stopped() {
    let hub = TestHub::start_with(|c| c.tenant_idle_ms = 300).await;
    let registry = hub.running.as_ref().expect("running").hub.registry.clone();
    let start = AllocatorStats::read().expect("this binary allocates with jemalloc");

    join_all((0..TENANTS).map(|t| burst(&hub, format!("store-{t}")))).await;
    let busy = AllocatorStats::read().unwrap();

    let waiting = Instant::now();
    while registry.tenant_count() > 0 {
        assert!(waiting.elapsed() < Duration::from_secs(60), "tenant actors still running: {}", registry.tenant_count());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session clock notices within a tick; a few ticks' grace, well within jemalloc's own
    // decay time (10 s), so pages that merely decayed do not pass for pages given back.
    let mut idle = AllocatorStats::read().unwrap();
    let stopped = Instant::now();
    while idle.resident - idle.allocated > IDLE_SLACK && stopped.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle = AllocatorStats::read().unwrap();
    }
    let line = |what: &str, s: &AllocatorStats| {
        format!("{what}: allocated {:.1} MiB, active {:.1} MiB, resident {:.1} MiB", mib(s.allocated), mib(s.active), mib(s.resident))
    };
    eprintln!("{}\n{}\n{}", line("start", &start), line("after the burst", &busy), line("idle", &idle));
    assert!(busy.resident > start.resident + 2 * IDLE_SLACK, "the burst did not grow the heap enough to tell: {}", line("after the burst", &busy));
    // Every thread's allocator cache is flushed too: held there, the few regions each caches
    // keep whole pages in use (14 MiB of active pages above the start here without it, 8 with).
    assert!(
        idle.active < start.active + ACTIVE_SLACK,
        "active pages stay {:.1} MiB above the start once idle ({})",
        mib(idle.active - start.active),
        line("idle", &idle)
    );
    assert!(
        idle.resident - idle.allocated < IDLE_SLACK,
        "resident stays {:.1} MiB above allocated once idle ({})",
        mib(idle.resident - idle.allocated),
        line("idle", &idle)
    );
    hub.shutdown().await;
}
