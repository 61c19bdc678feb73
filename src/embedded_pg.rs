//! Owns the private PostgreSQL cluster behind `synchub dev` and the integration tests: finding the binaries, initdb, starting (or adopting) the server on a socket-only config, a watchdog that stops it when its owner dies, and teardown.
//!
//! Ownership: the live owner holds an exclusive `flock` on `data_dir/cluster.lock` for as long
//! as it runs (the kernel drops it when the process dies, even by SIGKILL). The watchdog waits
//! for that lock and stops the server only while holding it, so it can never stop a server that
//! a successor has taken over; a successor waits while a dead owner's watchdog holds the lock,
//! and refuses to start, naming the owner, while a live one does.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;

/// Only names the socket file (`.s.PGSQL.5432`). TCP is off, so this cannot
/// clash with a system server that owns TCP port 5432.
const PORT: u16 = 5432;
const SOCKET_FILE: &str = ".s.PGSQL.5432";
/// `sun_path` holds 108 bytes including the trailing NUL; postgres refuses
/// longer socket paths.
const MAX_SOCKET_PATH: usize = 107;
/// Written into `data_dir` when the cluster itself has to live elsewhere.
const POINTER_FILE: &str = "pgdata-location";
/// Our settings live in their own file, rewritten on every start, so that
/// postgresql.conf stays the user's and options like `ephemeral` can change.
const CONF_FILE: &str = "synchub.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'synchub.conf'";
/// How long a server from an earlier run may take to finish starting or stopping, and a dead
/// owner's watchdog to finish stopping it.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(60);
/// In `data_dir`: locked by the live owner, and naming it and its watchdog (see the module docs).
const OWNER_FILE: &str = "cluster.lock";
/// How often a starting hub looks again at a lock held by a dead owner's watchdog.
const OWNER_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL installation found: {0}")]
    BinariesNotFound(String),
    #[error(
        "running as root, which PostgreSQL refuses, and there is no `postgres` user to run it as"
    )]
    NoPostgresUser,
    #[error("path is not valid UTF-8: {}", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{cmd} failed ({status}): {output}")]
    CommandFailed {
        cmd: String,
        status: ExitStatus,
        output: String,
    },
    #[error("PostgreSQL did not start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    StartFailed {
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("socket directory {} exists but is not a directory owned by the cluster's user", .0.display())]
    SocketDirNotOurs(PathBuf),
    #[error("a server from an earlier run in {} neither became ready nor went away", .0.display())]
    AdoptTimeout(PathBuf),
    #[error(
        "the cluster of {} is in use by another synchub process (pid {pid}); stop that one first, \
         or give this one another data folder",
        dir.display()
    )]
    InUse { dir: PathBuf, pid: u32 },
    #[error(
        "{} stayed locked for {} s by a process that is not a live synchub (a dead hub's watchdog \
         stopping its cluster?); see `fuser {}`",
        .0.display(), ADOPT_TIMEOUT.as_secs(), .0.display()
    )]
    OwnerTimeout(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct ClusterOptions {
    /// Where this cluster's state belongs. Created if missing.
    pub data_dir: PathBuf,
    /// For tests: no durability, and `data_dir` (and the cluster) are
    /// deleted on `stop()` or when the owning process exits.
    pub ephemeral: bool,
}

/// A running cluster, owned by this process. Dropping it gives up ownership: the watchdog then
/// stops the server (as it does when this process exits). `stop()` stops it at once.
pub struct PgCluster {
    data_dir: PathBuf,
    cluster_dir: PathBuf,
    socket_dir: PathBuf,
    ephemeral: bool,
    bin_dir: PathBuf,
    run_as: RunAs,
    watchdog: Option<std::process::Child>,
    /// Holds the owner lock (closing it releases the lock).
    owner: std::fs::File,
}

impl PgCluster {
    pub async fn start(opts: ClusterOptions) -> Result<PgCluster, ClusterError> {
        let bin_dir = find_bin_dir().await?;
        let run_as = RunAs::detect().await;

        tokio::fs::create_dir_all(&opts.data_dir)
            .await
            .map_err(io_err(&opts.data_dir))?;
        let data_dir = tokio::fs::canonicalize(&opts.data_dir)
            .await
            .map_err(io_err(&opts.data_dir))?;
        // Paths end up in shell lines (su, watchdog) and config files. Every
        // other path is built from these two, ASCII, or getent's (UTF-8) output.
        for p in [&data_dir, &bin_dir] {
            if p.to_str().is_none() {
                return Err(ClusterError::NonUtf8Path(p.clone()));
            }
        }

        // Before anything touches the cluster: a dead owner's watchdog may still be stopping it.
        let (owner, previous) = take_ownership(&data_dir).await?;
        if let Some(watchdog) = previous.watchdog.filter(ProcessToken::alive) {
            // It waits for the lock we now hold and would stop the server once we are gone, as
            // ours will: one is enough.
            kill_process(watchdog.pid).await;
        }

        let cluster_dir = if run_as.is_root() {
            // The postgres user usually cannot traverse into a root-owned
            // data_dir (mktemp -d gives 0700), so the cluster lives in its home.
            let parent = postgres_home().await?.join("synchub");
            let mkdir = run_as.command(Path::new("mkdir"), &["-p", "-m", "0700", &lossy(&parent)]);
            run_ok(mkdir, "mkdir (as postgres)").await?;
            let dir = parent.join(format!("{:016x}", fnv1a(&data_dir)));
            let pointer = data_dir.join(POINTER_FILE);
            tokio::fs::write(&pointer, format!("{}\n", dir.display()))
                .await
                .map_err(io_err(&pointer))?;
            dir
        } else {
            data_dir.join("pgdata")
        };
        let socket_dir = socket_dir_for(&cluster_dir);

        let mut pg = PgCluster {
            data_dir,
            cluster_dir,
            socket_dir,
            ephemeral: opts.ephemeral,
            bin_dir,
            run_as,
            watchdog: None,
            owner,
        };
        if !pg.cluster_dir.join("PG_VERSION").exists() {
            pg.initdb().await?;
        }
        pg.ensure_socket_dir().await?;
        pg.write_config().await?;
        // We hold the owner lock, so no watchdog is at work: a server that runs is ours to use.
        if pg.adopt_running_server().await? {
            tracing::info!(cluster = %pg.cluster_dir.display(), "took over the server of an earlier run");
        } else {
            pg.pg_ctl_start().await?;
        }
        pg.watchdog = pg.spawn_watchdog()?;
        let watchdog = pg.watchdog.as_ref().and_then(|w| ProcessToken::of(w.id()));
        write_owner(&pg.owner, &pg.data_dir.join(OWNER_FILE), watchdog)?;
        Ok(pg)
    }

    /// A URL sqlx accepts: the `host` query parameter points at the socket dir.
    pub fn database_url(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@localhost/{}?host={}&port={PORT}",
            percent_encode(dbname, b""),
            percent_encode(&lossy(&self.socket_dir), b"/"),
        )
    }

    /// The directory this cluster belongs to (absolute form of `ClusterOptions::data_dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The actual PGDATA: `data_dir/pgdata`, or under the postgres user's home when root.
    pub fn cluster_dir(&self) -> &Path {
        &self.cluster_dir
    }

    /// Fast shutdown; ephemeral clusters are also deleted. Failures are only
    /// logged: there is nothing useful a caller can do about them at shutdown.
    pub async fn stop(mut self) {
        let dir = lossy(&self.cluster_dir);
        match run(
            self.pg_ctl(&["-D", &dir, "stop", "-m", "fast"]),
            "pg_ctl stop",
        )
        .await
        {
            Ok(out) if !out.status.success() => {
                tracing::warn!(cluster = %dir, output = %output_text(&out), "pg_ctl stop failed")
            }
            Err(e) => tracing::warn!(cluster = %dir, error = %e, "pg_ctl stop failed"),
            Ok(_) => {}
        }
        if self.ephemeral {
            for path in self.ephemeral_paths() {
                match tokio::fs::remove_dir_all(&path).await {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove ephemeral cluster")
                    }
                    _ => {}
                }
            }
        }
        // Only now: had we died above, the watchdog would have finished the job.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    fn ephemeral_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cluster_dir.clone()];
        if !self.socket_dir.starts_with(&self.cluster_dir) {
            paths.push(self.socket_dir.clone());
        }
        paths.push(self.data_dir.clone());
        paths
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        self.run_as.command(&self.bin_dir.join("pg_ctl"), args)
    }

    async fn initdb(&self) -> Result<(), ClusterError> {
        let dir = lossy(&self.cluster_dir);
        let mut args = vec![
            "-D",
            &dir,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ];
        if self.ephemeral {
            // Nothing to make durable for a throwaway cluster; saves seconds per test.
            args.push("--no-sync");
        }
        run_ok(
            self.run_as.command(&self.bin_dir.join("initdb"), &args),
            "initdb",
        )
        .await?;
        Ok(())
    }

    async fn ensure_socket_dir(&self) -> Result<(), ClusterError> {
        // Whoever owns PGDATA (after initdb) is the user the server runs as.
        let owner = tokio::fs::metadata(&self.cluster_dir)
            .await
            .map_err(io_err(&self.cluster_dir))?;
        let sock = &self.socket_dir;
        match tokio::fs::symlink_metadata(sock).await {
            // symlink_metadata: a pre-planted symlink in /tmp must not pass.
            Ok(m) if m.is_dir() && m.uid() == owner.uid() => {}
            Ok(_) => return Err(ClusterError::SocketDirNotOurs(sock.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tokio::fs::create_dir(sock).await.map_err(io_err(sock))?;
                if self.run_as.is_root() {
                    std::os::unix::fs::chown(sock, Some(owner.uid()), Some(owner.gid()))
                        .map_err(io_err(sock))?;
                }
            }
            Err(e) => return Err(io_err(sock)(e)),
        }
        // Only the cluster's user needs in; root gets in regardless.
        tokio::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io_err(sock))
    }

    async fn write_config(&self) -> Result<(), ClusterError> {
        // The hub writes every change several times (row, log, versions): with Postgres's
        // default 128 MB of buffers, its backends wrote out dirty pages themselves (62,000 in
        // one 15 s merge run), which larger buffers avoid.
        // Double quotes protect spaces/commas inside the directory list; single
        // quotes are the config file's own string quoting.
        let sock =
            format!("\"{}\"", lossy(&self.socket_dir).replace('"', "\"\"")).replace('\'', "''");
        let mut conf = format!(
            "# Written by synchub on every start; put your own settings in postgresql.conf.\n\
             listen_addresses = ''\n\
             port = {PORT}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = 200\n\
             shared_buffers = {shared_mb}MB\n\
             max_wal_size = 2GB\n",
            shared_mb = shared_buffers_mb(),
        );
        if self.ephemeral {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let conf_path = self.cluster_dir.join(CONF_FILE);
        tokio::fs::write(&conf_path, conf)
            .await
            .map_err(io_err(&conf_path))?;
        if self.run_as.is_root() {
            let owner = tokio::fs::metadata(&self.cluster_dir)
                .await
                .map_err(io_err(&self.cluster_dir))?;
            std::os::unix::fs::chown(&conf_path, Some(owner.uid()), Some(owner.gid()))
                .map_err(io_err(&conf_path))?;
        }

        let main_conf = self.cluster_dir.join("postgresql.conf");
        let text = tokio::fs::read_to_string(&main_conf)
            .await
            .map_err(io_err(&main_conf))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
            // Last in the file, so our settings win over initdb's defaults.
            let appended = format!("{text}\n# synchub: socket-only, dev tuning\n{INCLUDE_LINE}\n");
            tokio::fs::write(&main_conf, appended)
                .await
                .map_err(io_err(&main_conf))?;
        }
        Ok(())
    }

    /// True if a server from an earlier run is up on this cluster and usable.
    async fn adopt_running_server(&self) -> Result<bool, ClusterError> {
        let pid_file = self.cluster_dir.join("postmaster.pid");
        let socket_lock = self.socket_dir.join(format!("{SOCKET_FILE}.lock"));
        let deadline = Instant::now() + ADOPT_TIMEOUT;
        loop {
            let pm = read_pid_file(&pid_file).await;
            if !pm.as_ref().is_some_and(|pm| postmaster_alive(pm.pid)) {
                // Lock files left by a crash or kill -9. Postgres checks them
                // itself but takes a zombie or recycled pid for a live server.
                remove_stale_lock(&pid_file).await?;
                remove_stale_lock(&socket_lock).await?;
                return Ok(false);
            }
            let dir = lossy(&self.cluster_dir);
            let answers = run(self.pg_ctl(&["-D", &dir, "status"]), "pg_ctl status")
                .await?
                .status
                .success();
            // No status line (pre-10 servers) counts as ready.
            let ready = !matches!(pm.and_then(|pm| pm.status), Some(s) if s != "ready");
            if answers && ready {
                return Ok(true);
            }
            // Still starting, or stopping (e.g. a dead owner's watchdog is at
            // work): wait to see which way it goes.
            if Instant::now() >= deadline {
                return Err(ClusterError::AdoptTimeout(self.cluster_dir.clone()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let dir = lossy(&self.cluster_dir);
        let log = self.cluster_dir.join("server.log");
        let log_arg = lossy(&log);
        let out = run(
            self.pg_ctl(&["-D", &dir, "-l", &log_arg, "-w", "-t", "60", "start"]),
            "pg_ctl start",
        )
        .await?;
        if out.status.success() {
            return Ok(());
        }
        // pg_ctl gives up at the timeout but leaves a slow postmaster running.
        // Any pid file now is from this attempt: we only get here without one.
        if self.cluster_dir.join("postmaster.pid").exists() {
            let _ = run(
                self.pg_ctl(&["-D", &dir, "stop", "-m", "immediate"]),
                "pg_ctl stop",
            )
            .await;
        }
        Err(ClusterError::StartFailed {
            reason: output_text(&out),
            tail: tail_lines(&log, 20).await,
            log,
        })
    }

    /// A detached `flock` that outlives us, even on SIGKILL: it waits for the owner lock,
    /// which is free once we are gone (or have dropped the cluster), and holding it stops the
    /// server. None (with a warning) where `flock(1)` is missing: the server then outlives us
    /// and the next start adopts it.
    fn spawn_watchdog(&self) -> Result<Option<std::process::Child>, ClusterError> {
        let Some(flock) = find_in_path("flock") else {
            tracing::warn!(cluster = %self.cluster_dir.display(), "flock(1) not found (util-linux): the cluster keeps running if this process is killed");
            return Ok(None);
        };
        let dir = lossy(&self.cluster_dir);
        let stop = self.run_as.shell_line(
            &self.bin_dir.join("pg_ctl"),
            &["-D", &dir, "stop", "-m", "fast"],
        );
        let cleanup = if self.ephemeral {
            let paths: Vec<String> = self
                .ephemeral_paths()
                .iter()
                .map(|p| sh_quote(&lossy(p)))
                .collect();
            format!(" rm -rf -- {};", paths.join(" "))
        } else {
            String::new()
        };
        let script = format!("{stop};{cleanup}");
        let lock = lossy(&self.data_dir.join(OWNER_FILE));
        let flock = lossy(&flock);
        let args = [flock.as_str(), lock.as_str(), "sh", "-c", &script];
        let quiet = |cmd: &mut std::process::Command| {
            cmd.current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        };
        // setsid: a new session, so neither the terminal's ^C/SIGHUP nor a kill of our
        // process group reaches it. It execs flock, so the child's pid is flock's.
        let mut setsid = std::process::Command::new("setsid");
        setsid.args(args);
        quiet(&mut setsid);
        match setsid.spawn() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::process::CommandExt;
                let mut nohup = std::process::Command::new("nohup");
                nohup.args(args).process_group(0);
                quiet(&mut nohup);
                nohup.spawn()
            }
            other => other,
        }
        .map(Some)
        .map_err(|source| ClusterError::Spawn {
            cmd: "watchdog".into(),
            source,
        })
    }
}

/// A process, told apart from a later one that reuses its pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessToken {
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    start: u64,
}

impl ProcessToken {
    fn of(pid: u32) -> Option<ProcessToken> {
        Some(ProcessToken { pid, start: process_start_time(pid)? })
    }

    /// Still running (a zombie counts as dead).
    fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start)
    }
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": fields after the name, which may hold spaces and parens.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X")) | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Who the owner file names: the owning hub and its watchdog.
#[derive(Debug, Default)]
struct OwnerRecord {
    hub: Option<ProcessToken>,
    watchdog: Option<ProcessToken>,
}

fn parse_owner(text: &str) -> OwnerRecord {
    let mut record = OwnerRecord::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(role), Some(pid), Some(start)) = (words.next(), words.next(), words.next()) else { continue };
        let (Ok(pid), Ok(start)) = (pid.parse(), start.parse()) else { continue };
        match role {
            "hub" => record.hub = Some(ProcessToken { pid, start }),
            "watchdog" => record.watchdog = Some(ProcessToken { pid, start }),
            _ => {}
        }
    }
    record
}

/// Take the owner lock of `data_dir`, returning it with what the file said of the previous
/// owner. Waits while a dead owner's watchdog holds it (it is stopping the cluster); refuses
/// while a live hub does.
async fn take_ownership(data_dir: &Path) -> Result<(std::fs::File, OwnerRecord), ClusterError> {
    let path = data_dir.join(OWNER_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    let deadline = Instant::now() + ADOPT_TIMEOUT;
    let mut waited = false;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        let record = parse_owner(&std::fs::read_to_string(&path).unwrap_or_default());
        if let Some(hub) = record.hub.filter(ProcessToken::alive) {
            return Err(ClusterError::InUse { dir: data_dir.to_path_buf(), pid: hub.pid });
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::OwnerTimeout(path));
        }
        if !waited {
            tracing::info!(lock = %path.display(), "the previous owner is gone; waiting for its watchdog to stop the cluster");
            waited = true;
        }
        tokio::time::sleep(OWNER_POLL).await;
    }
    let previous = parse_owner(&std::fs::read_to_string(&path).unwrap_or_default());
    // Named at once, so that a hub started meanwhile refuses instead of waiting.
    write_owner(&file, &path, None)?;
    Ok((file, previous))
}

/// Name this process (and its watchdog) in the owner file, which we hold locked.
fn write_owner(file: &std::fs::File, path: &Path, watchdog: Option<ProcessToken>) -> Result<(), ClusterError> {
    use std::os::unix::fs::FileExt;
    let me = ProcessToken::of(std::process::id());
    let mut text = String::new();
    for (role, token) in [("hub", me), ("watchdog", watchdog)] {
        if let Some(t) = token {
            text.push_str(&format!("{role} {} {}\n", t.pid, t.start));
        }
    }
    file.set_len(0)
        .and_then(|()| file.write_all_at(text.as_bytes(), 0))
        .map_err(io_err(path))
}

/// SIGKILL, best effort (the process may be gone, or another user's).
async fn kill_process(pid: u32) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -KILL {pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// How PostgreSQL's tools are run: as ourselves, or, because the server
/// refuses to run as root, as the `postgres` user.
#[derive(Debug, Clone, Copy)]
enum RunAs {
    Me,
    Runuser,
    Su,
}

impl RunAs {
    async fn detect() -> RunAs {
        if !running_as_root().await {
            return RunAs::Me;
        }
        let runuser = Command::new("runuser")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if matches!(runuser, Ok(s) if s.success()) {
            RunAs::Runuser
        } else {
            RunAs::Su
        }
    }

    fn is_root(self) -> bool {
        !matches!(self, RunAs::Me)
    }

    fn command(self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = match self {
            RunAs::Me => Command::new(program),
            RunAs::Runuser => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            }
            RunAs::Su => {
                let mut c = Command::new("su");
                c.args([
                    "postgres",
                    "-s",
                    "/bin/sh",
                    "-c",
                    &shell_words(program, args),
                ]);
                c
            }
        };
        if !matches!(self, RunAs::Su) {
            cmd.args(args);
        }
        // The tools chdir to where they started; a cwd postgres cannot enter
        // (e.g. /root) only produces noise, so start somewhere everyone can.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    fn shell_line(self, program: &Path, args: &[&str]) -> String {
        let line = shell_words(program, args);
        match self {
            RunAs::Me => line,
            RunAs::Runuser => format!("runuser -u postgres -- {line}"),
            RunAs::Su => format!("su postgres -s /bin/sh -c {}", sh_quote(&line)),
        }
    }
}

async fn running_as_root() -> bool {
    // Postgres checks the effective uid: the second field of the Uid line.
    if let Ok(status) = tokio::fs::read_to_string("/proc/self/status").await {
        if let Some(euid) = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
        {
            return euid == "0";
        }
    }
    matches!(Command::new("id").arg("-u").output().await,
             Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
}

async fn postgres_home() -> Result<PathBuf, ClusterError> {
    let out = Command::new("getent")
        .args(["passwd", "postgres"])
        .output()
        .await
        .map_err(|_| ClusterError::NoPostgresUser)?;
    // name:password:uid:gid:gecos:home:shell
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .nth(5)
        .filter(|home| out.status.success() && !home.is_empty())
        .map(PathBuf::from)
        .ok_or(ClusterError::NoPostgresUser)
}

async fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("SYNCHUB_PG_BIN") {
        // An explicit choice that is wrong should fail loudly, not be second-guessed.
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::BinariesNotFound(format!(
                "SYNCHUB_PG_BIN={} has no initdb/pg_ctl/postgres",
                dir.display()
            )))
        };
    }
    if let Some(dir) = newest_packaged_bin_dir() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Ok(dir);
        }
    }
    Err(ClusterError::BinariesNotFound(
        "looked at $SYNCHUB_PG_BIN, /usr/lib/postgresql/*/bin and `pg_config --bindir`; \
         install PostgreSQL or set SYNCHUB_PG_BIN"
            .into(),
    ))
}

fn has_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|t| dir.join(t).is_file())
}

/// Debian/Ubuntu install each major version side by side; take the newest.
fn newest_packaged_bin_dir() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            // Numeric, so that 10 sorts above 9.6.
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn socket_dir_for(cluster_dir: &Path) -> PathBuf {
    let inside = cluster_dir.join("sock");
    if inside.as_os_str().len() + 1 + SOCKET_FILE.len() <= MAX_SOCKET_PATH {
        inside
    } else {
        PathBuf::from(format!("/tmp/synchub-{:016x}", fnv1a(cluster_dir)))
    }
}

/// FNV-1a rather than `DefaultHasher`, whose output may change between Rust
/// releases: a changed name would silently orphan a dev cluster.
fn fnv1a(path: &Path) -> u64 {
    path.as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

struct PidFile {
    pid: u32,
    /// Line 8 ("starting", "ready", "stopping", ...); absent before PG 10.
    status: Option<String>,
}

async fn read_pid_file(path: &Path) -> Option<PidFile> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let status = lines.nth(6).map(|s| s.trim().to_string());
    Some(PidFile { pid, status })
}

/// Removes a postmaster.pid-style lock file unless its pid is a live postmaster.
async fn remove_stale_lock(path: &Path) -> Result<(), ClusterError> {
    let Some(lock) = read_pid_file(path).await else {
        return Ok(()); // absent, or not ours to judge
    };
    if postmaster_alive(lock.pid) {
        return Ok(());
    }
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn postmaster_alive(pid: u32) -> bool {
    // /proc/<pid>/stat is "pid (comm) state ...". The name guards against a
    // recycled pid; the state against a killed postmaster that lingers as a
    // zombie (containers whose init reaps slowly), which `kill -0` and hence
    // `pg_ctl status` still report as running.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next();
    matches!(comm, "postgres" | "postmaster") && !matches!(state, Some('Z' | 'X') | None)
}

async fn run(mut cmd: Command, what: &str) -> Result<Output, ClusterError> {
    cmd.output().await.map_err(|source| ClusterError::Spawn {
        cmd: what.to_string(),
        source,
    })
}

async fn run_ok(cmd: Command, what: &str) -> Result<Output, ClusterError> {
    let out = run(cmd, what).await?;
    if !out.status.success() {
        return Err(ClusterError::CommandFailed {
            cmd: what.to_string(),
            status: out.status,
            output: output_text(&out),
        });
    }
    Ok(out)
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text = format!("{}\n{}", stdout.trim(), text);
    }
    text
}

async fn tail_lines(path: &Path, n: usize) -> String {
    match tokio::fs::read_to_string(path).await {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(could not read log: {e})"),
    }
}

/// Start checked that the paths we build from are UTF-8, so this is exact.
fn lossy(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn shell_words(program: &Path, args: &[&str]) -> String {
    std::iter::once(sh_quote(&lossy(program)))
        .chain(args.iter().map(|a| sh_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn percent_encode(s: &str, keep: &[u8]) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_name_live_processes_only() {
        let me = ProcessToken::of(std::process::id()).expect("our own start time");
        assert!(me.alive());
        // The same pid with another start time is a later process that reused it.
        assert!(!ProcessToken { start: me.start + 1, ..me }.alive());
        let record = parse_owner(&format!("hub {} {}\nwatchdog 7 99\n", me.pid, me.start));
        assert_eq!(record.hub, Some(me));
        assert_eq!(record.watchdog, Some(ProcessToken { pid: 7, start: 99 }));
        // A file cut short while being rewritten names nobody.
        let cut = parse_owner("hub 12");
        assert!(cut.hub.is_none() && cut.watchdog.is_none());
    }

    #[tokio::test]
    async fn a_live_owner_is_named_and_a_released_lock_is_taken() {
        let dir = std::env::temp_dir().join(format!("synchub-owner-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (held, _) = take_ownership(&dir).await.expect("a free lock is taken");
        match take_ownership(&dir).await {
            Err(ClusterError::InUse { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected InUse, got {:?}", other.map(|_| ())),
        }
        drop(held);
        let (_again, previous) = take_ownership(&dir).await.expect("a released lock is taken");
        assert_eq!(previous.hub.map(|h| h.pid), Some(std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn ephemeral_cluster_serves_queries_and_cleans_up() {
        let dir =
            std::env::temp_dir().join(format!("synchub-pg-test-{}", uuid::Uuid::new_v4().simple()));
        let pg = PgCluster::start(ClusterOptions {
            data_dir: dir.clone(),
            ephemeral: true,
        })
        .await
        .expect("cluster starts");
        let cluster_dir = pg.cluster_dir().to_path_buf();

        let pool = sqlx::PgPool::connect(&pg.database_url("postgres"))
            .await
            .expect("connect over the unix socket");
        let one: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
        // We must have reached our own server, not one the machine runs.
        let served_from: String = sqlx::query_scalar("select current_setting('data_directory')")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(Path::new(&served_from), cluster_dir);
        pool.close().await;

        pg.stop().await;
        assert!(!dir.exists(), "data dir {} should be gone", dir.display());
        assert!(
            !cluster_dir.exists(),
            "cluster dir {} should be gone",
            cluster_dir.display()
        );
    }
}

/// Shared buffers for the private cluster: an eighth of the machine's memory, between
/// 128 MiB (Postgres's default) and 1 GiB.
fn shared_buffers_mb() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    (total_kib / 1024 / 8).clamp(128, 1024)
}
