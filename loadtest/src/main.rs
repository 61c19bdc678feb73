//! `synchub-loadtest`: drives a synchub hub over real WebSockets on loopback with bounded,
//! self-stopping scenarios, and reports latency, throughput, errors and hub CPU/memory.

use synchub_loadtest::{client, compare, dashboards, devices, error, fanout, idle, lean_tables, pg_ceiling, plot, replay, soak, storm, tables, tokens};

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use protocol::Encoding;

#[derive(Parser)]
#[command(name = "synchub-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Write the JSON report here as well as printing the table.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write an SVG plot of throughput and latency over the run here (devices, fanout, dashboards, replay).
    #[arg(long, global = true)]
    svg: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct HubArgs {
    /// WebSocket URL of the hub (loopback only); for a cluster, the nodes' URLs separated by
    /// commas: client socket n connects to the (n mod count)-th.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    url: String,
    /// The hub's HS256 secret, to mint device tokens.
    #[arg(long, env = "SYNCHUB_JWT_HS256_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the secret (`synchub dev` writes `.synchub/dev-jwt-secret`).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// File of ready-made tokens, one per line, used round-robin.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Speak MessagePack (binary frames) instead of JSON.
    #[arg(long)]
    msgpack: bool,
    /// Spread sockets over this many source addresses 127.0.0.1..=127.0.0.N (0: kernel's choice).
    #[arg(long, default_value_t = 0)]
    source_addrs: usize,
    /// Pid of the hub, to report its CPU time and memory; for a cluster, every node's pid,
    /// separated by commas (their CPU and memory are summed as the hub's, and each node's CPU
    /// is also reported apart).
    #[arg(long, value_delimiter = ',')]
    hub_pid: Vec<u32>,
    /// Another process to report the CPU time of, apart from the hub's: NAME=PID (e.g.
    /// `nats-server=1234`); repeatable.
    #[arg(long, value_parser = parse_side_pid)]
    side_pid: Vec<(String, u32)>,
    /// Pid of the hub's Postgres postmaster: only its cluster counts as Postgres's CPU (by
    /// default every `postgres` process of the machine does).
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// Seconds a client waits for the hub to accept its socket, and then to answer its hello.
    #[arg(long, default_value_t = 30)]
    answer_timeout_secs: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Devices pushing batches and receiving each other's deltas (merge throughput, latency).
    Devices {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: devices::DevicesArgs,
        /// The hub's database, to report the WAL Postgres wrote over the measured window.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The same rows written straight to Postgres with plain SQL: the ceiling for merge
    /// (`--with-log`: with the previous hub's log, versions and cursors as well; `--lean-log`:
    /// with the hub's current log format instead).
    PgCeiling {
        #[command(flatten)]
        args: pg_ceiling::CeilingArgs,
    },
    /// Hold many authenticated idle sockets over several processes; report memory per socket.
    Idle {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: idle::IdleArgs,
    },
    /// One publisher, many subscribers: deliveries per second and latency, against the hub
    /// or (with --nats-url) against nats-server's WebSocket listener.
    Fanout {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// Dashboards subscribe with filters (snapshot, then live) while devices keep writing:
    /// push→dashboard latency, subscription deltas per second, snapshot time.
    Dashboards {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: dashboards::DashboardsArgs,
    },
    /// All devices drop and come back at once, catching up and pushing what they queued.
    Storm {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: storm::StormArgs,
    },
    /// Play a hub's capture file (see `record_file`) at 1×, N× or full speed, as one or more
    /// copies with renamed tenants, devices and keys.
    Replay {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: replay::ReplayArgs,
    },
    /// A long run of devices (with conflicts and reconnects) and dashboards, through whatever
    /// restarts of the hub and Postgres happen meanwhile (see loadtest/run-soak): RSS, p99 and
    /// errors every interval and per phase, then a check of the log against every ack.
    /// Exits with status 1 when an acked change was lost, doubled or misplaced, or seqs skipped.
    Soak {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        args: soak::SoakArgs,
    },
    /// One process of the `idle` scenario (started by it).
    #[command(hide = true)]
    IdleWorker {
        #[command(flatten)]
        hub: HubArgs,
        #[arg(long)]
        worker: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        tenants: usize,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        hold_secs: u64,
        #[arg(long)]
        no_hello: bool,
        #[arg(long)]
        token_in_hello: bool,
    },
    /// Compare two results folders (e.g. the last release's and this one's): each scenario's
    /// headline figures side by side, marked where the current run is worse.
    Compare {
        #[arg(long)]
        baseline: PathBuf,
        #[arg(long, default_value = "bench-results")]
        current: PathBuf,
        /// Relative change tolerated before a figure counts as worse.
        #[arg(long, default_value_t = 0.05)]
        tolerance: f64,
        /// Exit with status 1 when a figure is worse (for CI).
        #[arg(long)]
        fail_on_worse: bool,
    },
    /// Print the tables of loadtest/run-lean-log (the previous hub against this one) from the
    /// `lean-*.json` reports in a results folder, as markdown.
    LeanLogTables {
        #[arg(long, default_value = "bench-results")]
        results: PathBuf,
    },
    /// Rewrite the tables of BENCHMARKS.md from the JSON reports in a results folder.
    Tables {
        #[arg(long)]
        results: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        benchmarks: PathBuf,
    },
}

/// `NAME=PID`.
fn parse_side_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text.rsplit_once('=').ok_or_else(|| format!("{text}: give NAME=PID"))?;
    let pid = pid.trim().parse().map_err(|_| format!("{text}: the pid is not a number"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{text}: give the process a name (NAME=PID)"));
    }
    Ok((name.to_string(), pid))
}

#[cfg(test)]
mod tests {
    use super::parse_side_pid;

    #[test]
    fn a_side_process_is_named_and_numbered() {
        assert_eq!(parse_side_pid("nats-server=4242"), Ok(("nats-server".to_string(), 4242)));
        assert_eq!(parse_side_pid(" redis = 7 "), Ok(("redis".to_string(), 7)));
        assert!(parse_side_pid("4242").is_err(), "no name");
        assert!(parse_side_pid("=4242").is_err(), "an empty name");
        assert!(parse_side_pid("nats=abc").is_err(), "no pid");
    }
}

impl HubArgs {
    /// The hub's pid (the first node's), having set every node and side process to be measured.
    fn watched_hub_pid(&self) -> Option<u32> {
        synchub_loadtest::proc_stats::watch(self.hub_pid.clone(), self.side_pid.clone());
        if let Some(pid) = self.postgres_pid {
            synchub_loadtest::proc_stats::postgres_only(pid);
        }
        self.hub_pid.first().copied()
    }

    fn connect_parts(self) -> Result<(client::Target, tokens::TokenSource), error::LoadError> {
        let encoding = if self.msgpack { Encoding::MsgPack } else { Encoding::Json };
        let mut target = client::Target::new(&self.url, encoding, self.source_addrs)?;
        target.answer_timeout = std::time::Duration::from_secs(self.answer_timeout_secs.max(1));
        let tokens = tokens::TokenSource::from_args(self.secret, self.secret_file, self.tokens_file)?;
        Ok((target, tokens))
    }

    /// The same hub arguments, for a worker process.
    fn worker_args(&self) -> Vec<String> {
        let mut args = vec![
            "--url".to_string(),
            self.url.clone(),
            "--source-addrs".into(),
            self.source_addrs.to_string(),
            "--answer-timeout-secs".into(),
            self.answer_timeout_secs.to_string(),
        ];
        if let Some(s) = &self.secret {
            args.extend(["--secret".into(), s.clone()]);
        }
        if let Some(p) = &self.secret_file {
            args.extend(["--secret-file".into(), p.display().to_string()]);
        }
        if let Some(p) = &self.tokens_file {
            args.extend(["--tokens-file".into(), p.display().to_string()]);
        }
        if self.msgpack {
            args.push("--msgpack".into());
        }
        args
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Devices { hub, args, database_url } => {
            let hub_pid = hub.watched_hub_pid();
            let (target, tokens) = hub.connect_parts()?;
            let database = match database_url {
                Some(url) => Some(sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await?),
                None => None,
            };
            devices::run_measuring_wal(target, tokens, args, hub_pid, database.as_ref()).await
        }
        Command::Replay { hub, args } => {
            let hub_pid = hub.watched_hub_pid();
            let (target, tokens) = hub.connect_parts()?;
            replay::run(target, tokens, args, hub_pid).await?
        }
        Command::Dashboards { hub, args } => {
            let hub_pid = hub.watched_hub_pid();
            let (target, tokens) = hub.connect_parts()?;
            dashboards::run(target, tokens, args, hub_pid).await?
        }
        Command::PgCeiling { args } => pg_ceiling::run(args).await?,
        Command::Fanout { hub, args } => {
            let hub_pid = hub.watched_hub_pid();
            let url = args.nats_url.clone();
            let mut hub = hub;
            if let Some(url) = url {
                // Connect to nats-server's address; tokens are not used.
                hub.url = url;
                hub.secret.get_or_insert_with(String::new);
            }
            let (target, tokens) = hub.connect_parts()?;
            fanout::run(target, tokens, args, hub_pid).await?
        }
        Command::Idle { hub, args } => {
            let hub_pid = hub.watched_hub_pid().ok_or_else(|| anyhow::anyhow!("idle needs --hub-pid to measure the hub"))?;
            let worker_args = hub.worker_args();
            let report = tokio::task::spawn_blocking(move || idle::run(&worker_args, args, hub_pid)).await??;
            print!("{}", report.table());
            if let Some(path) = cli.json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
            }
            return Ok(());
        }
        Command::IdleWorker { hub, worker, count, tenants, concurrency, hold_secs, no_hello, token_in_hello } => {
            let (target, tokens) = hub.connect_parts()?;
            let handshake = idle::IdleHandshake::from_flags(no_hello, token_in_hello);
            idle::worker(target, tokens, worker, count, tenants, concurrency, std::time::Duration::from_secs(hold_secs), handshake).await;
            return Ok(());
        }
        Command::Storm { hub, args } => {
            let hub_pid = hub.watched_hub_pid();
            let (target, tokens) = hub.connect_parts()?;
            let report = storm::run(target, tokens, args, hub_pid).await?;
            print!("{}", report.table());
            if let Some(path) = cli.json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
            }
            return Ok(());
        }
        Command::Soak { hub, args } => {
            let (target, tokens) = hub.connect_parts()?;
            let report = soak::run(target, tokens, args).await?;
            print!("{}", report.table());
            if let Some(path) = cli.json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
            }
            if let Some(path) = cli.svg {
                let title = format!("synchub soak: {:.0} s, hub kill -9 and Postgres restart", report.duration_s);
                std::fs::write(&path, plot::timeline_svg(&title, &report.ticks()))?;
            }
            if !report.passed() {
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::Compare { baseline, current, tolerance, fail_on_worse } => {
            let (table, worse) = compare::compare(&baseline, &current, tolerance)?;
            print!("{table}");
            if worse && fail_on_worse {
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::LeanLogTables { results } => {
            print!("{}", lean_tables::render(&results));
            return Ok(());
        }
        Command::Tables { results, benchmarks } => {
            tables::rewrite(&results, &benchmarks)?;
            eprintln!("{} rewritten from {}", benchmarks.display(), results.display());
            return Ok(());
        }
    };
    print!("{}", report.table());
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(path) = cli.svg {
        if report.timeline.is_empty() {
            eprintln!("{} has no timeline to plot; no SVG written", report.scenario);
        } else {
            let mut title = format!("synchub-loadtest {}: {}", report.scenario, plot::in_words(&report.parameters));
            if title.chars().count() > 90 {
                title = title.chars().take(89).chain(['…']).collect();
            }
            std::fs::write(&path, plot::timeline_svg(&title, &report.timeline))?;
            eprintln!("plot written to {}", path.display());
        }
    }
    Ok(())
}
