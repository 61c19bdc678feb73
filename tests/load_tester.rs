//! The load tester's `devices` scenario against a real hub: the measured window opens after the
//! warm-up, and the report gives latencies of the window alone and with the warm-up.

mod common;

use common::*;
use protocol::Encoding;
use synchub_loadtest::client::Target;
use synchub_loadtest::devices::{self, DevicesArgs};
use synchub_loadtest::report::Report;
use synchub_loadtest::tokens::TokenSource;

async fn run_devices(hub: &TestHub, warmup_secs: u64, duration_secs: u64) -> Report {
    let target = Target::new(&format!("ws://{}/v1/ws", hub.addr), Encoding::MsgPack, 0).unwrap();
    let args = DevicesArgs {
        tenants: 1,
        devices: 3,
        batch: 1,
        batches_per_device: 1_000,
        duration_secs,
        warmup_secs,
        conflict_rate: 0.0,
        // Ten changes a second per device: a few dozen in each phase.
        rate: 10.0,
        rows_per_device: 20,
        shared_rows: 5,
        id_prefix: None,
    };
    devices::run(target, TokenSource::Secret(SECRET.into()), args, None).await
}

fn merged(report: &Report) -> u64 {
    ["applied", "merged", "conflict"].iter().map(|k| report.outcomes[k]).sum()
}

#[actix_web::test]
async fn devices_measure_after_their_warm_up_and_report_both() {
    let hub = TestHub::start().await;
    let warmed = run_devices(&hub, 1, 2).await;
    let plain = run_devices(&hub, 0, 1).await;
    hub.shutdown().await;

    assert!(warmed.errors.is_empty() && plain.errors.is_empty(), "{:?} {:?}", warmed.errors, plain.errors);
    assert!(warmed.warmup_s >= 1.0 && warmed.duration_s >= 2.0, "warm-up {} s, window {} s", warmed.warmup_s, warmed.duration_s);
    // Latencies of the window exclude the warm-up's; the figures with it count both.
    let (ack, delivery) = (&warmed.ack_latency, &warmed.delivery_latency);
    let ack_whole = warmed.ack_latency_with_warmup.as_ref().expect("ack latency with the warm-up");
    let delivery_whole = warmed.delivery_latency_with_warmup.as_ref().expect("delivery latency with the warm-up");
    assert!(ack.count > 0 && ack_whole.count > ack.count, "{ack:?} {ack_whole:?}");
    assert!(delivery.count > 0 && delivery_whole.count > delivery.count, "{delivery:?} {delivery_whole:?}");
    // The rate counts the window only, while the outcomes count every change acked.
    let in_window = (warmed.changes_merged_per_s * warmed.duration_s).round() as u64;
    assert!(in_window > 0 && in_window < merged(&warmed), "{in_window} of {}", merged(&warmed));
    // The timeline covers the warm-up and the window, a tick a second.
    assert!(warmed.timeline.len() >= 3, "{:?}", warmed.timeline);
    // CPU is sampled over the window: the load generator's own and Postgres's (the hub's needs
    // its pid, not given here), and the machine's steal is a reading, not a default.
    assert!(warmed.loadgen_cpu_s > 0.0 && warmed.postgres_cpu_s > 0.0, "{} {}", warmed.loadgen_cpu_s, warmed.postgres_cpu_s);
    assert!(warmed.steal_cpu_s.is_finite() && warmed.timeline.iter().all(|t| t.steal_pct.is_finite()));

    // Without a warm-up there is nothing to add.
    assert_eq!(plain.warmup_s, 0.0);
    assert!(plain.ack_latency_with_warmup.is_none() && plain.delivery_latency_with_warmup.is_none());
    assert!(plain.ack_latency.count > 0);
}
