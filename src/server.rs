//! The HTTP server: routes (`/v1/ws`, `/rxdb/v1`, `/realtime/v1`, `/healthz`, `/readyz`, `/metrics`, and the API of
//! [`crate::http`]), start-up of the hub's parts,
//! the notification listener for other SQL writers, and the one graceful shutdown sequence:
//! stop accepting → sessions finish in-flight pushes and close with going-away → stop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use dashmap::DashMap;
use sqlx::postgres::PgListener;

use crate::actors::messages::SessionControl;
use crate::actors::sweep::{self, SessionHandle};
use crate::actors::registry::TenantRegistry;
use crate::auth::TokenVerifier;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{SessionId, TenantId};
use crate::limits::Limits;
use crate::metrics::{AllocatingThreads, AllocatorStats, ClusterGauges, Gauges, Metrics};
use crate::recorder::Recorder;
use crate::rules::Rules;
use crate::storage::Store;

/// Shared state of a running hub, handed to every session.
pub struct Hub {
    pub config: Arc<Config>,
    pub verifier: TokenVerifier,
    pub registry: Arc<TenantRegistry>,
    pub store: Arc<Store>,
    /// Every open session with its deadlines, for the session clock and for shutdown.
    pub sessions: DashMap<SessionId, Arc<SessionHandle>>,
    pub metrics: Arc<Metrics>,
    /// Roles and rules (`[[rules]]`): what each identity may read and write.
    pub rules: Rules,
    /// Present when `record_file` is set.
    pub recorder: Option<Recorder>,
    /// Rate limits and the session cap.
    pub limits: Limits,
    /// Its HTTP workers and tenant arbiters, whose allocator caches an idle hub flushes.
    pub threads: AllocatingThreads,
    /// Cluster mode (`nats_url`): the link to the other nodes.
    pub cluster: Option<Arc<Cluster>>,
    accepting: AtomicBool,
}

impl Hub {
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }
}

/// A started hub: its bound address, and the handle to stop it.
pub struct RunningHub {
    pub addr: SocketAddr,
    pub hub: Arc<Hub>,
    handle: ServerHandle,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    listener: tokio::task::JoinHandle<()>,
    session_clock: tokio::task::JoinHandle<()>,
    /// Cluster mode: the relay of cluster events and the poller of heads while NATS is down.
    cluster_tasks: Vec<tokio::task::JoinHandle<()>>,
    arbiters: Vec<Arbiter>,
}

/// Start the hub inside the current actix system. `config.listen` may use port 0.
pub async fn start(config: Config) -> Result<RunningHub> {
    let config = Arc::new(config);
    let verifier = TokenVerifier::from_config(&config)?;
    let rules = Rules::from_config(&config.rules)?;
    let store = Store::open(&config).await?;
    for problem in rules.problems_with(&store.catalog()) {
        tracing::warn!(%problem, "rules name what the synced tables lack");
    }
    let arbiters: Vec<Arbiter> = (0..config.workers).map(|_| Arbiter::new()).collect();
    let metrics = Arc::new(Metrics::default());
    let recorder = match &config.record_file {
        Some(path) => Some(Recorder::start(path, &config.record_tenants, config.record_queue_entries, metrics.clone())?),
        None => None,
    };
    let (cluster, cluster_events) = match config.clustered() {
        true => {
            let (cluster, events) = Cluster::start(&config, metrics.clone()).await?;
            (Some(cluster), Some(events))
        }
        false => (None, None),
    };
    let registry = TenantRegistry::new(store.clone(), config.clone(), metrics.clone(), arbiters.iter().map(Arbiter::handle).collect(), cluster.clone());
    let limits = Limits::from_config(&config);
    let mut cluster_tasks = Vec::new();
    if let (Some(cluster), Some(events)) = (&cluster, cluster_events) {
        use crate::actors::cluster_events;
        cluster_tasks.push(tokio::spawn(cluster_events::relay(cluster.clone(), registry.clone(), events, limits.cluster_nodes())));
        let every = Duration::from_millis(config.cluster_fallback_poll_ms);
        cluster_tasks.push(tokio::spawn(cluster_events::poll_heads_while_down(cluster.clone(), store.clone(), registry.clone(), metrics.clone(), every)));
    }
    let hub = Arc::new(Hub {
        config: config.clone(),
        verifier,
        registry: registry.clone(),
        store: store.clone(),
        sessions: DashMap::new(),
        metrics,
        rules,
        recorder,
        limits,
        threads: AllocatingThreads::default(),
        cluster,
        accepting: AtomicBool::new(true),
    });
    for arbiter in &arbiters {
        hub.threads.add(arbiter.handle());
    }
    let listener = tokio::spawn(listen_for_log_writes(store.clone(), registry));

    let data = web::Data::new(hub.clone());
    let app_config = config.clone();
    let workers = hub.clone();
    let server = HttpServer::new(move || {
        // Called on each worker's thread as it starts.
        workers.threads.add(Arbiter::current());
        App::new()
            .app_data(data.clone())
            .configure(|cfg| crate::http::routes(cfg, &app_config))
            .route("/v1/ws", web::get().to(crate::transport::ws::upgrade))
            .route("/rxdb/v1", web::get().to(crate::transport::rxdb::upgrade))
            .configure(crate::transport::supabase::routes)
            .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_text))
            .configure(crate::console::configure)
    })
    .workers(config.workers)
    // Connections the workers accept before they stop accepting: the session cap and a few for
    // plain HTTP requests and for upgrades to refuse, so that accept waits rather than fails for
    // want of file descriptors (sessions past the cap are refused at the upgrade).
    .max_connections((hub.limits.max_connections + 64).div_ceil(config.workers.max(1)))
    // Frames are small and latency matters: without TCP_NODELAY, Nagle's algorithm holds a
    // frame written while an earlier one is unacknowledged until the client's delayed ACK
    // (up to 40 ms on Linux), which dominated push→ack latency.
    .tcp_nodelay(true)
    .client_request_timeout(config.http_request_timeout())
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout().as_secs().max(1))
    .bind(&config.listen)
    .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    let server = tokio::spawn(server);
    tracing::info!(%addr, "synchub listening; WebSocket at /v1/ws, RxDB replication at /rxdb/v1, Supabase Realtime at /realtime/v1");
    let session_clock = tokio::spawn(sweep::run(hub.clone()));
    let mut cluster_tasks = cluster_tasks;
    if let Some(cluster) = &hub.cluster {
        cluster_tasks.push(tokio::spawn(crate::http::sessions::serve_forwarded_refreshes(hub.clone(), cluster.clone())));
    }
    Ok(RunningHub { addr, hub, handle, server, listener, session_clock, cluster_tasks, arbiters })
}

/// Ready while Postgres answers. The body names both links; a NATS outage leaves the node
/// ready: it still commits and acknowledges, and reads other nodes' commits from Postgres
/// (taking every node out of the load balancer for it would turn slower deliveries into an
/// outage).
async fn readyz(hub: web::Data<Arc<Hub>>) -> HttpResponse {
    let nats = match &hub.cluster {
        None => "off",
        Some(cluster) if cluster.connected() => "up",
        Some(_) => "down",
    };
    let node = hub.cluster.as_ref().map(|c| format!("node: {}\n", c.node())).unwrap_or_default();
    if !hub.accepting() {
        return HttpResponse::ServiceUnavailable().body(format!("shutting down\n{node}"));
    }
    // A database that does not answer at all (frozen, or a network that drops packets) must
    // not hold the probe: it is not ready either.
    let waited = hub.config.readyz_timeout();
    match tokio::time::timeout(waited, hub.store.ping()).await.unwrap_or(Err(Error::StorageTimeout(waited))) {
        Ok(()) => HttpResponse::Ok().body(format!("ready\n{node}postgres: up\nnats: {nats}\n")),
        Err(err) => {
            tracing::warn!(%err, "readiness check failed");
            HttpResponse::ServiceUnavailable().body(format!("database unavailable\n{node}postgres: down\nnats: {nats}\n"))
        }
    }
}

async fn metrics_text(hub: web::Data<Arc<Hub>>) -> HttpResponse {
    let gauges = Gauges {
        sessions: hub.sessions.len(),
        tenants: hub.registry.tenant_count(),
        db_connections: hub.store.pool.size(),
        db_idle: hub.store.pool.num_idle(),
        row_cache_rows: hub.store.row_budget().held(),
        memory: AllocatorStats::read(),
        cluster: hub.cluster.as_ref().map(|c| ClusterGauges { nats_connected: c.connected(), nodes: c.live_nodes() }),
    };
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(hub.metrics.render(&gauges))
}

/// Forward `synchub_log` notifications (sent by the capture trigger when another SQL client
/// writes a synced table) to the tenant's actor.
async fn listen_for_log_writes(store: Arc<Store>, registry: Arc<TenantRegistry>) {
    loop {
        let mut listener = match PgListener::connect_with(&store.pool).await {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(%err, "cannot open the notification listener; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen("synchub_log").await {
            tracing::warn!(%err, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything written while we were not listening is read now.
        registry.log_appended_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) => registry.log_appended(&TenantId::new(note.payload())),
                // The connection was lost and re-established: notifications may be missing.
                Ok(None) => registry.log_appended_all(),
                Err(err) => {
                    tracing::warn!(%err, "notification listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

impl RunningHub {
    /// Graceful shutdown: refuse new sessions, let sessions finish their in-flight pushes
    /// (whose transactions the tenant actors complete) and close them with 1001, then stop.
    pub async fn shutdown(self) {
        let RunningHub { hub, handle, server, listener, session_clock, cluster_tasks, arbiters, .. } = self;
        hub.accepting.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + hub.config.shutdown_timeout();
        let mut told = std::collections::HashSet::new();
        while !hub.sessions.is_empty() && Instant::now() < deadline {
            for entry in hub.sessions.iter() {
                if !told.contains(entry.key()) && entry.value().session.try_control(SessionControl::Shutdown).is_ok() {
                    told.insert(*entry.key());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Its sessions are closed: the other nodes drop them from presence now rather than
        // after the node timeout.
        if let Some(cluster) = &hub.cluster {
            cluster.leave().await;
        }
        handle.stop(true).await;
        let _ = server.await;
        if let Some(recorder) = &hub.recorder {
            recorder.finish();
        }
        listener.abort();
        session_clock.abort();
        for task in cluster_tasks {
            task.abort();
        }
        for arbiter in arbiters {
            arbiter.stop();
        }
        hub.store.pool.close().await;
        tracing::info!("synchub stopped");
    }

    /// Wait until the server stops by itself (it does not, unless stopped).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.server).await;
    }
}
