//! CPU time and memory of the hub process (and of all `postgres` processes beside it), and the
//! CPU time the hypervisor took from this machine, read from /proc, so a report can say where
//! the machine's time went during a run.

use std::collections::HashMap;
use std::path::Path;

/// Linux reports /proc CPU times in USER_HZ ticks, 100 per second on every architecture we run.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// CPU seconds (user + system) used so far by the hub.
    pub hub_cpu_s: f64,
    /// Resident set size of the hub, KiB.
    pub hub_rss_kib: u64,
    /// CPU seconds stolen so far from this (virtual) machine's CPUs by the hypervisor, summed over
    /// the CPUs: time the machine's processes were ready to run but another guest ran instead.
    pub machine_steal_s: f64,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_times_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).map(|t| t.own_s)
}

/// A process's CPU times, from /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    parent: u32,
    /// utime + stime, seconds.
    own_s: f64,
    /// cutime + cstime: the children it waited for, seconds.
    ended_children_s: f64,
}

fn cpu_times_of(stat: &str) -> Option<CpuTimes> {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // ppid is field 4 of the full line; utime, stime, cutime and cstime are fields 14 to 17
    // (2, and 12 to 15, after the name).
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some(CpuTimes {
        parent: fields.get(1)?.parse().ok()?,
        own_s: (field(11)? + field(12)?) / TICKS_PER_SEC,
        ended_children_s: (field(13)? + field(14)?) / TICKS_PER_SEC,
    })
}

/// The CPU times of every process named `postgres` at one moment, by pid.
#[derive(Debug, Clone, Default)]
pub struct PostgresCpu(HashMap<u32, CpuTimes>);

/// The postmaster whose cluster alone counts as Postgres (`--postgres-pid`), when set.
static POSTMASTER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Count only the cluster of this postmaster (it and its children) as Postgres, not every
/// `postgres` process of the machine (other clusters may run beside the measured one). Once
/// per process.
pub fn postgres_only(postmaster: u32) {
    let _ = POSTMASTER.set(postmaster);
}

impl PostgresCpu {
    pub fn read() -> PostgresCpu {
        let Ok(entries) = std::fs::read_dir("/proc") else { return PostgresCpu::default() };
        let all = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm")).is_ok_and(|c| c.trim() == "postgres"))
            .filter_map(|pid| Some((pid, cpu_times_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?)));
        PostgresCpu(all.filter(|(pid, t)| of_cluster(POSTMASTER.get().copied(), *pid, t)).collect())
    }

    /// CPU seconds Postgres used from `start` to this reading: what each process used since
    /// (all of it, for one started since), with its children that ended. A process that ended
    /// in between is in its parent's children time, so what it had used before `start` is taken
    /// off; when its parent ended too (a cluster stopped in between), neither is this run's.
    pub fn since(&self, start: &PostgresCpu) -> f64 {
        let total = |t: &CpuTimes| t.own_s + t.ended_children_s;
        let grown: f64 = self.0.iter().map(|(pid, now)| (total(now) - start.0.get(pid).map_or(0.0, total)).max(0.0)).sum();
        let before_start_of_ended: f64 =
            start.0.iter().filter(|(pid, was)| !self.0.contains_key(pid) && self.0.contains_key(&was.parent)).map(|(_, was)| total(was)).sum();
        (grown - before_start_of_ended).max(0.0)
    }
}

/// Whether a `postgres` process counts: every one, or with a postmaster named, it and its
/// children.
fn of_cluster(postmaster: Option<u32>, pid: u32, times: &CpuTimes) -> bool {
    postmaster.is_none_or(|pm| pid == pm || times.parent == pm)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Steal time of the machine, CPU seconds, from the text of /proc/stat: the eighth value of the
/// `cpu` line (user, nice, system, idle, iowait, irq, softirq, steal).
fn steal_seconds_of(proc_stat: &str) -> Option<f64> {
    let line = proc_stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let steal: f64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(steal / TICKS_PER_SEC)
}

fn machine_steal() -> f64 {
    std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(steal_seconds_of).unwrap_or(0.0)
}

/// Processes measured beside the hub, set once for the whole run by the command line
/// (`--hub-pid` with several pids, `--side-pid`): the other nodes of a cluster, whose CPU time
/// and memory count as the hub's, and named processes such as nats-server, counted apart.
#[derive(Debug, Clone, Default)]
struct Watched {
    /// Every hub node's pid, the one the scenario is given first.
    hubs: Vec<u32>,
    others: Vec<(String, u32)>,
}

static WATCHED: std::sync::OnceLock<Watched> = std::sync::OnceLock::new();

/// Measure `hubs` (every node; the first is the pid the scenarios are given) as one hub, and
/// `others` apart, by name. Once per process; later calls change nothing.
pub fn watch(hubs: Vec<u32>, others: Vec<(String, u32)>) {
    let _ = WATCHED.set(Watched { hubs, others });
}

/// The pids that count as the hub's with `hub_pid`: it and the other nodes being watched.
fn hub_pids(hub_pid: Option<u32>) -> Vec<u32> {
    hub_pids_in(WATCHED.get(), hub_pid)
}

fn hub_pids_in(watched: Option<&Watched>, hub_pid: Option<u32>) -> Vec<u32> {
    let mut pids: Vec<u32> = hub_pid.into_iter().collect();
    if hub_pid.is_some() {
        pids.extend(watched.map_or(&[][..], |w| &w.hubs[..]).iter().filter(|p| Some(**p) != hub_pid));
    }
    pids
}

/// CPU seconds so far of each process watched apart, by name: each hub node when there are
/// several (`hub node 1 (pid …)`), then the named others. Empty unless [`watch`] was called.
pub fn others_cpu() -> Vec<(String, f64)> {
    let Some(w) = WATCHED.get() else { return Vec::new() };
    let nodes = if w.hubs.len() > 1 { w.hubs.iter().enumerate().map(|(i, pid)| (format!("hub node {} (pid {pid})", i + 1), *pid)).collect() } else { Vec::new() };
    nodes.into_iter().chain(w.others.iter().cloned()).map(|(name, pid)| (name, cpu_seconds(pid).unwrap_or(0.0))).collect()
}

/// Samples the hub (with the other nodes being watched, summed); `None` pid samples nothing of
/// the hub (Postgres is still read).
pub fn sample(hub_pid: Option<u32>) -> Sample {
    let pids = hub_pids(hub_pid);
    Sample {
        hub_cpu_s: pids.iter().filter_map(|p| cpu_seconds(*p)).sum(),
        hub_rss_kib: pids.iter().filter_map(|p| rss_kib(*p)).sum(),
        machine_steal_s: machine_steal(),
    }
}

/// CPU seconds used by this load generator itself.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::{cpu_times_of, hub_pids_in, of_cluster, steal_seconds_of, CpuTimes, PostgresCpu, Watched};

    #[test]
    fn a_named_postmaster_counts_its_own_cluster_only() {
        let backend = CpuTimes { parent: 10, own_s: 1.0, ended_children_s: 0.0 };
        let other = CpuTimes { parent: 20, own_s: 1.0, ended_children_s: 0.0 };
        let postmaster = CpuTimes { parent: 1, own_s: 1.0, ended_children_s: 0.0 };
        assert!(of_cluster(Some(10), 10, &postmaster));
        assert!(of_cluster(Some(10), 11, &backend));
        assert!(!of_cluster(Some(10), 21, &other));
        assert!(!of_cluster(Some(10), 20, &postmaster));
        assert!(of_cluster(None, 21, &other));
    }

    #[test]
    fn the_nodes_of_a_cluster_count_as_the_hub_once_each() {
        let cluster = Watched { hubs: vec![10, 20, 30], others: vec![("nats-server".into(), 40)] };
        assert_eq!(hub_pids_in(Some(&cluster), Some(10)), [10, 20, 30]);
        // The scenario's pid is counted once even when it is not listed first.
        assert_eq!(hub_pids_in(Some(&cluster), Some(20)), [20, 10, 30]);
        // Without a hub pid nothing is the hub's; with nothing watched, the one pid as before.
        assert!(hub_pids_in(Some(&cluster), None).is_empty());
        assert_eq!(hub_pids_in(None, Some(7)), [7]);
    }

    #[test]
    fn cpu_times_with_the_parent_and_ended_children() {
        // pid (comm with spaces) state ppid … utime stime cutime cstime …, in ticks of 10 ms.
        let stat = "42 (postgres: a b) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 700 300 20 0 1 0 100 1000 10";
        assert_eq!(cpu_times_of(stat), Some(CpuTimes { parent: 7, own_s: 3.0, ended_children_s: 10.0 }));
        assert_eq!(cpu_times_of("42 (short) S 1"), None);
    }

    #[test]
    fn postgres_cpu_counts_ended_backends_once_and_stopped_clusters_not_at_all() {
        let times = |parent, own_s, ended_children_s| CpuTimes { parent, own_s, ended_children_s };
        // Cluster A (postmaster 10) runs on; its backend 11 ends (4 s before the start, 6 s in
        // all) and backend 12 starts (2 s). Cluster B (postmaster 20, 30 s) stops.
        let start = PostgresCpu([(10, times(1, 1.0, 5.0)), (11, times(10, 4.0, 0.0)), (20, times(1, 2.0, 28.0))].into());
        let end = PostgresCpu([(10, times(1, 1.5, 11.0)), (12, times(10, 2.0, 0.0))].into());
        // A's postmaster: 0.5 s of its own and 6 s of the ended backend, less its 4 s before the
        // start; the new backend's 2 s; nothing of B.
        assert_eq!(end.since(&start), 4.5);
        assert_eq!(start.since(&start), 0.0);
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_all_cpus_line() {
        let stat = "cpu  4705 150 1120 16250 520 0 33 250 0 0\ncpu0 2000 50 500 8000 260 0 20 200 0 0\nintr 1 2 3\n";
        assert_eq!(steal_seconds_of(stat), Some(2.5));
        // Kernels without the steal column, or no `cpu` line: nothing to report.
        assert_eq!(steal_seconds_of("cpu  4705 150 1120 16250 520 0 33\n"), None);
        assert_eq!(steal_seconds_of("cpu0 1 2 3 4 5 6 7 8\n"), None);
    }
}
