//! Traffic recording: appends the capture file (format in `protocol::capture`) for the tenants
//! configured, from a bounded queue drained by its own thread, so a slow disk never blocks a
//! session. When the queue is full an entry is dropped and counted, never waited for.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::capture::{CaptureEntry, CaptureEvent, CaptureHeader, CAPTURE_FORMAT};
use uuid::Uuid;

use crate::auth::SessionIdentity;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// A written line becomes visible in the file at most this long after it was queued.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

enum Line {
    Entry(Vec<u8>),
    /// Flush, close the file and end the writer thread.
    Finish,
}

pub struct Recorder {
    /// Tenants recorded; `None` records every tenant.
    tenants: Option<HashSet<String>>,
    started: Instant,
    queue: SyncSender<Line>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    path: PathBuf,
}

impl Recorder {
    /// Open `path` for appending (a restarted hub adds a new header and goes on) and start the
    /// writer thread. An empty `tenants` list records every tenant.
    pub fn start(path: &Path, tenants: &[String], queue_entries: usize, metrics: Arc<Metrics>) -> Result<Recorder> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Config(format!("cannot open the capture file {}: {e}", path.display())))?;
        let mut out = BufWriter::new(file);
        let started_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let header = CaptureHeader { synchub_capture: CAPTURE_FORMAT, started_at_ms };
        // unwrap: a struct of two numbers always serializes.
        let mut line = serde_json::to_vec(&header).expect("header serializes");
        line.push(b'\n');
        out.write_all(&line)
            .and_then(|_| out.flush())
            .map_err(|e| Error::Config(format!("cannot write the capture file {}: {e}", path.display())))?;
        let (queue, lines) = sync_channel(queue_entries.max(1));
        let shown = path.display().to_string();
        let writer = std::thread::Builder::new()
            .name("synchub-recorder".into())
            .spawn(move || write_lines(out, lines, &shown))
            .map_err(|e| Error::Config(format!("cannot start the recorder thread: {e}")))?;
        tracing::info!(file = %path.display(), "recording device traffic");
        Ok(Recorder {
            tenants: (!tenants.is_empty()).then(|| tenants.iter().cloned().collect()),
            started: Instant::now(),
            queue,
            writer: Mutex::new(Some(writer)),
            metrics,
            path: path.to_path_buf(),
        })
    }

    /// Whether sessions of `tenant` are recorded.
    pub fn records(&self, tenant: &str) -> bool {
        self.tenants.as_ref().map_or(true, |t| t.contains(tenant))
    }

    /// Queue one event of a session; dropped (and counted) when the queue is full.
    pub fn record(&self, session: Uuid, identity: &SessionIdentity, event: CaptureEvent) {
        let entry = CaptureEntry {
            t_us: self.started.elapsed().as_micros() as u64,
            session,
            tenant: identity.tenant.to_string(),
            device: identity.device.to_string(),
            user: identity.user.to_string(),
            role: identity.role.to_string(),
            event,
        };
        let Ok(mut line) = serde_json::to_vec(&entry) else { return };
        line.push(b'\n');
        match self.queue.try_send(Line::Entry(line)) {
            Ok(()) => self.metrics.capture_entries.fetch_add(1, Relaxed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.metrics.capture_dropped.fetch_add(1, Relaxed),
        };
    }

    /// Write what is queued and close the file (at shutdown).
    pub fn finish(&self) {
        // unwrap: the lock is never held across a panic.
        let Some(writer) = self.writer.lock().unwrap().take() else { return };
        if self.queue.send(Line::Finish).is_ok() {
            let _ = writer.join();
        }
        tracing::info!(file = %self.path.display(), "capture file closed");
    }
}

fn write_lines(mut out: BufWriter<File>, lines: std::sync::mpsc::Receiver<Line>, path: &str) {
    // After a write error the thread keeps draining the queue, so sessions never block on it.
    let mut failed = false;
    loop {
        let (result, last) = match lines.recv_timeout(FLUSH_EVERY) {
            Ok(Line::Entry(_)) if failed => continue,
            Ok(Line::Entry(line)) => (out.write_all(&line), false),
            Err(RecvTimeoutError::Timeout) if failed => continue,
            Err(RecvTimeoutError::Timeout) => (out.flush(), false),
            Ok(Line::Finish) | Err(RecvTimeoutError::Disconnected) => (out.flush(), true),
        };
        if let Err(err) = result {
            if !failed {
                tracing::error!(file = path, %err, "writing the capture file failed; recording stops");
            }
            failed = true;
        }
        if last {
            return;
        }
    }
}
