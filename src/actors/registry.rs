//! The registry of tenant actors: finds a tenant's actor, starting it on demand on one of a
//! fixed set of arbiters (so tenants spread over threads), and forgets it when it stops.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

use actix::prelude::*;
use dashmap::DashMap;

use super::messages::{ClusterNews, LogAppended};
use super::tenant::TenantActor;
use crate::cluster::{Body, Cluster, ClusterEvent};
use crate::config::Config;
use crate::ids::TenantId;
use crate::metrics::Metrics;
use crate::storage::Store;

pub struct TenantRegistry {
    actors: DashMap<TenantId, Addr<TenantActor>>,
    arbiters: Vec<ArbiterHandle>,
    store: Arc<Store>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Cluster mode: the NATS link every tenant actor publishes on and subscribes through.
    cluster: Option<Arc<Cluster>>,
    this: Weak<TenantRegistry>,
}

impl TenantRegistry {
    pub fn new(
        store: Arc<Store>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        arbiters: Vec<ArbiterHandle>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<TenantRegistry> {
        assert!(!arbiters.is_empty(), "at least one arbiter");
        Arc::new_cyclic(|this| TenantRegistry { actors: DashMap::new(), arbiters, store, config, metrics, cluster, this: this.clone() })
    }

    /// The tenant's actor, started if it is not running.
    pub fn get(&self, tenant: &TenantId) -> Addr<TenantActor> {
        if let Some(addr) = self.actors.get(tenant).filter(|a| a.connected()) {
            return addr.clone();
        }
        let mut entry = self.actors.entry(tenant.clone()).or_insert_with(|| self.start(tenant));
        if !entry.connected() {
            *entry = self.start(tenant);
        }
        entry.clone()
    }

    fn start(&self, tenant: &TenantId) -> Addr<TenantActor> {
        let mut hasher = DefaultHasher::new();
        tenant.hash(&mut hasher);
        let arbiter = &self.arbiters[(hasher.finish() % self.arbiters.len() as u64) as usize];
        let actor = TenantActor::new(tenant.clone(), self.store.clone(), self.config.clone(), self.metrics.clone(), self.this.clone(), self.cluster.clone());
        TenantActor::start_in_arbiter(arbiter, move |_| actor)
    }

    /// The registry's own copy of `tenant` (one allocation shared by all of its sessions).
    pub fn shared_id(&self, tenant: &TenantId) -> TenantId {
        self.actors.get(tenant).map(|entry| entry.key().clone()).unwrap_or_else(|| tenant.clone())
    }

    /// The tenant's actor if it is running (it is while the tenant has sessions); never starts one.
    pub fn running(&self, tenant: &TenantId) -> Option<Addr<TenantActor>> {
        self.actors.get(tenant).filter(|a| a.connected()).map(|a| a.clone())
    }

    /// Called by a stopping actor; only removes the entry if it is still that actor.
    pub fn forget(&self, tenant: &TenantId, addr: &Addr<TenantActor>) {
        self.actors.remove_if(tenant, |_, current| current == addr);
    }

    /// Tell a running tenant actor that other writers appended to its log.
    pub fn log_appended(&self, tenant: &TenantId) {
        if let Some(addr) = self.actors.get(tenant) {
            // A full mailbox means the actor is busy; its periodic re-read picks the rows up.
            let _ = addr.try_send(LogAppended);
        }
    }

    /// Nudge every running tenant actor (after the notification listener reconnected).
    pub fn log_appended_all(&self) {
        for entry in self.actors.iter() {
            let _ = entry.value().try_send(LogAppended);
        }
    }

    /// Tell every running tenant actor of a cluster event. A resync that does not fit a busy
    /// actor's mailbox is caught by its periodic re-read; presence news is retried.
    pub async fn cluster_event(&self, event: ClusterEvent) {
        let actors: Vec<Addr<TenantActor>> = self.actors.iter().map(|e| e.value().clone()).collect();
        for actor in actors {
            if actor.try_send(ClusterNews(event.clone())).is_err() && event != ClusterEvent::Resync {
                let _ = actor.send(ClusterNews(event.clone())).await;
            }
        }
    }

    /// Tell the other nodes what a tenant with no actor here has for their sessions (a
    /// broadcast, conflict news); a running actor passes such news on itself.
    pub fn publish_elsewhere(&self, tenant: &TenantId, body: Body<'_>) {
        if let Some(cluster) = &self.cluster {
            cluster.publish(tenant, body);
        }
    }

    /// The tenants with a running actor.
    pub fn running_tenants(&self) -> Vec<TenantId> {
        self.actors.iter().map(|e| e.key().clone()).collect()
    }

    pub fn tenant_count(&self) -> usize {
        self.actors.len()
    }
}
