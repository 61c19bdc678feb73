//! The cluster's side of the tenant actors: relays cluster events (a resync, a node that
//! joined or went) to them, and while the NATS link is down polls their heads in Postgres so
//! that other nodes' commits still reach this node's sessions, only later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::registry::TenantRegistry;
use crate::cluster::{Cluster, ClusterEvent};
use crate::ids::{Seq, TenantId};
use crate::metrics::Metrics;
use crate::storage::Store;

/// Hand each cluster event to every running tenant actor, in order, and keep `nodes` (the
/// count the tenant rate limits are shared by) current.
pub async fn relay(cluster: Arc<Cluster>, registry: Arc<TenantRegistry>, mut events: mpsc::Receiver<ClusterEvent>, nodes: Arc<AtomicUsize>) {
    while let Some(event) = events.recv().await {
        nodes.store(cluster.live_nodes(), Ordering::Relaxed);
        registry.cluster_event(event).await;
    }
}

/// While NATS is down, read the running tenants' heads every `every` and nudge the actors
/// whose head moved (one query per poll for all of them, not one per tenant).
pub async fn poll_heads_while_down(cluster: Arc<Cluster>, store: Arc<Store>, registry: Arc<TenantRegistry>, metrics: Arc<Metrics>, every: Duration) {
    let mut known: HashMap<TenantId, Seq> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if cluster.connected() {
            known.clear();
            continue;
        }
        let tenants = registry.running_tenants();
        if tenants.is_empty() {
            continue;
        }
        metrics.cluster_fallback_polls.fetch_add(1, Ordering::Relaxed);
        match store.within_transaction_deadline(store.tenant_heads(&tenants)).await {
            Ok(heads) => {
                for (tenant, head) in heads {
                    // The first poll nudges every tenant: commits may have been lost with the link.
                    if known.insert(tenant.clone(), head) != Some(head) {
                        registry.log_appended(&tenant);
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "cannot poll the tenants' heads"),
        }
    }
}
