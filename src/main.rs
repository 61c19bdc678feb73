//! `synchub serve` runs against `DATABASE_URL`; `synchub dev` brings up a private Postgres
//! cluster, a demo schema and tenant, and prints ready-to-use tokens (and with `--demo` runs
//! two simulated tills against it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use synchub::config::{Config, Secret};
use synchub::embedded_pg::{ClusterOptions, PgCluster};
use synchub::{demo, server, telemetry};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment adds to
/// them). Every connection holds two 8 KiB buffers (actix-http's read and write buffers); by
/// default jemalloc gives each its own slab with its own metadata, and slabs of four (8 pages)
/// save about 0.2 KiB per idle connection. Freed pages go back to the system over the decay
/// time (`dirty_decay_ms`, 10 s; `muzzy_decay_ms:0` returns them outright rather than keeping
/// them resident until the kernel wants them); without background threads an arena decays only
/// when it allocates again, so the arenas of threads that went quiet after a burst kept their
/// pages resident for good (178 MB resident for 6 MB allocated, an idle minute after a replay).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0,slab_sizes:8192-8192:8".as_ptr());

/// A C string pointer jemalloc reads once at start-up.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: it points to a static, immutable C string.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(name = "synchub", version, about = "Realtime sync hub for offline-first apps")]
struct Cli {
    /// TOML configuration file (env: SYNCHUB_CONFIG); `SYNCHUB_<FIELD>` variables override it.
    #[arg(long, env = "SYNCHUB_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve against the database in `DATABASE_URL` (or `database_url` in the config).
    Serve {
        /// Cluster mode: link to the other nodes over this NATS server (`nats://host:4222`,
        /// several comma-separated); overrides `nats_url`.
        #[arg(long)]
        nats: Option<String>,
        /// This node's id in the cluster; overrides `node_id`.
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Development hub: a private Postgres cluster in `--data-dir` (unless DATABASE_URL is
    /// set), the demo point-of-sale schema and tenant, and printed tokens.
    Dev {
        /// Folder for the private cluster and the dev token secret. Run as root, the cluster's
        /// files live under the `postgres` user's home (`~postgres/synchub/<hash>`, which
        /// PostgreSQL can reach) and this folder keeps a pointer to them.
        #[arg(long, default_value = ".synchub")]
        data_dir: PathBuf,
        /// Once the hub is ready, run two simulated tills (pos-1 and pos-2) against it: sales
        /// every few seconds, and now and then one goes offline and edits what the other edits,
        /// so that conflicts are logged for review in the console.
        #[arg(long)]
        demo: bool,
    },
}

/// Exit 1 with the error and its causes on one line: a refusal to start (a folder another hub
/// owns, a bad setting) is an answer for the operator, not a crash, so no backtrace even with
/// `RUST_BACKTRACE` set.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("synchub: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[actix_web::main]
async fn run() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref()).context("loading configuration")?;
    if let Command::Serve { nats, node_id } = &cli.command {
        config.nats_url = nats.clone().or(config.nats_url.take());
        config.node_id = node_id.clone().or(config.node_id.take());
        config.validate().context("checking configuration")?;
    }
    let mut cluster = None;
    let dev = matches!(cli.command, Command::Dev { .. });
    let demo_devices = matches!(cli.command, Command::Dev { demo: true, .. });
    if let Command::Dev { data_dir, .. } = &cli.command {
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        if config.database_url.0.is_empty() {
            let started = PgCluster::start(ClusterOptions { data_dir: data_dir.clone(), ephemeral: false })
                .await
                .context("starting the private PostgreSQL cluster")?;
            config.database_url = Secret(started.database_url("postgres"));
            tracing::info!(dir = %started.cluster_dir().display(), "private PostgreSQL cluster running");
            cluster = Some(started);
        }
        if config.jwt_hs256_secret.0.is_empty() && config.jwt_public_key_file.is_none() && config.jwt_jwks_file.is_none() {
            config.jwt_hs256_secret = Secret(dev_secret(data_dir)?);
        }
        let pool = sqlx::PgPool::connect(&config.database_url.0).await.context("connecting to PostgreSQL")?;
        demo::install_schema(&pool).await.context("installing the demo schema")?;
        pool.close().await;
        let registered: Vec<String> = config.tables.iter().map(|t| t.name.clone()).collect();
        config.tables.extend(demo::tables().into_iter().filter(|t| !registered.contains(&t.name)));
    }

    let running = server::start(config.clone()).await.context("starting the hub")?;
    let mut tills = None;
    if dev {
        demo::seed(&running.hub.store.pool).await.context("seeding the demo tenant")?;
        println!("\nsynchub dev is ready: ws://{}/v1/ws  (tenant `{}`)", running.addr, demo::DEMO_TENANT);
        println!("  console: http://{}/console  (sign in with the Manager token below)", running.addr);
        if cluster.is_some() {
            println!("  database: {}", config.database_url.0);
        }
        let tokens = demo::tokens(&config.jwt_hs256_secret.0, 30);
        for (who, token) in &tokens {
            println!("  {who}:\n    {token}");
        }
        println!();
        if demo_devices {
            // The tills are clients of the running hub: they start after it is ready, and
            // whatever befalls them is a printed line and a retry, never the hub's concern.
            let options = demo::devices::Options::new(format!("ws://{}/v1/ws", running.addr), tokens[0].1.clone(), tokens[1].1.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let pool = running.hub.store.pool.clone();
            let task = tokio::spawn(demo::devices::run(options, pool, async move { let _ = stopped.await; }, |line: &str| println!("demo: {line}")));
            tills = Some((stop, task));
        }
    }

    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some((stop, task)) = tills {
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
    }
    running.shutdown().await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    Ok(())
}

/// The dev secret persists in the data folder so printed tokens stay valid across restarts.
fn dev_secret(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("dev-jwt-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        if !secret.trim().is_empty() {
            return Ok(secret.trim().to_owned());
        }
    }
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
