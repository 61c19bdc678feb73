//! A nats-server of the test's own (Debian's `nats-server` package) on a free loopback port, in a
//! process of its own, killed when dropped; `stop` and `restart` (same port) make a NATS outage.
//! Never the NATS that may already run on 4222.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's package puts the server.
const DEBIAN_BINARY: &str = "/usr/sbin/nats-server";
/// Time a started server has to answer on its port.
const READY_LIMIT: Duration = Duration::from_secs(20);

pub struct NatsServer {
    pub port: u16,
    binary: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Times started, for the log files' names.
    starts: usize,
}

impl NatsServer {
    /// Start a server on a free loopback port; its output goes to `log_dir/nats-N.log`.
    pub fn start(log_dir: &Path) -> NatsServer {
        std::fs::create_dir_all(log_dir).unwrap();
        let binary = binary();
        let port = free_port();
        let mut server = NatsServer { port, binary, log: log_dir.to_path_buf(), child: None, starts: 0 };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the server (SIGKILL: every client's connection drops at once) and wait until it is
    /// gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port (after `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the NATS server is running; stop it first");
        self.spawn();
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = self.log.join(format!("nats-{}.log", self.starts));
        let deadline = Instant::now() + READY_LIMIT;
        // The port of a server just killed may take a moment to be free again.
        loop {
            let out = std::fs::File::create(&log).unwrap();
            let err = out.try_clone().unwrap();
            let mut child = Command::new(&self.binary)
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap_or_else(|e| panic!("{} does not start: {e}", self.binary.display()));
            match wait_ready(self.port, &mut child, deadline) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        Instant::now() < deadline,
                        "nats-server on 127.0.0.1:{} is not ready within {READY_LIMIT:?}: {why}; its log {}:\n{text}",
                        self.port,
                        log.display()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ready once a client connecting to the port reads the server's `INFO` line.
fn wait_ready(port: u16, child: &mut Child, deadline: Instant) -> Result<(), String> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited ({status})"));
        }
        if let Ok(stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) {
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err("no INFO line on its port".into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The nats-server binary; installed with apt-get when missing (fails the test if it cannot be).
fn binary() -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = find() {
        return found;
    }
    eprintln!("nats-server is missing; installing it with apt-get");
    let install = || Command::new("apt-get").args(["install", "-y", "nats-server"]).env("DEBIAN_FRONTEND", "noninteractive").status();
    let mut status = install();
    if !matches!(&status, Ok(s) if s.success()) {
        let _ = Command::new("apt-get").arg("update").status();
        status = install();
    }
    match (status, find()) {
        (_, Some(found)) => found,
        (status, None) => panic!(
            "nats-server is not installed and `apt-get install -y nats-server` failed ({status:?}); \
             install Debian's nats-server package (binary {DEBIAN_BINARY}) to run the cluster tests"
        ),
    }
}

fn find() -> Option<PathBuf> {
    if Path::new(DEBIAN_BINARY).exists() {
        return Some(DEBIAN_BINARY.into());
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("nats-server")).find(|p| p.exists()))
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
