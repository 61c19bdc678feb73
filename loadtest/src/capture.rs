//! Reading a hub's capture file into devices and their sessions, and remapping recorded ids so
//! that one capture can be played as many fresh tenants and devices (pure code, unit-tested).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use protocol::capture::{CaptureEntry, CaptureEvent, CaptureHeader};
use protocol::{Change, ClientFrame, Object};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{LoadError, Result};

/// One socket of a recorded device, with its times in µs from the start of the capture.
#[derive(Debug, Clone, Default)]
pub struct RecordedSession {
    pub start_us: u64,
    /// When the session closed; `None` when the capture ends first.
    pub end_us: Option<u64>,
    pub msgpack: bool,
    /// Frames after `hello`, in the order sent.
    pub frames: Vec<(u64, ClientFrame)>,
}

/// A recorded device: every session it opened, in order.
#[derive(Debug, Clone)]
pub struct RecordedDevice {
    pub tenant: String,
    pub device: String,
    pub user: String,
    pub role: String,
    pub sessions: Vec<RecordedSession>,
    /// Smallest `device_seq` the device pushed in the capture (replays renumber from 1).
    pub first_device_seq: u64,
}

#[derive(Debug, Default)]
pub struct Capture {
    pub devices: Vec<RecordedDevice>,
    /// Per recorded tenant, the tenant seq each (device, device_seq) got, from recorded acks.
    pub seqs: HashMap<String, HashMap<(String, u64), u64>>,
    /// Every string value used in a recorded change's key: the values a replay remaps.
    pub key_values: HashSet<String>,
    pub frames: usize,
    pub span_us: u64,
}

impl Capture {
    pub fn read(path: &Path, tenants: &[String]) -> Result<Capture> {
        let text = std::fs::read_to_string(path)?;
        Capture::parse(&text, tenants).map_err(|e| LoadError::Usage(format!("{}: {e}", path.display())))
    }

    /// Parse a capture's JSON Lines. A hub that restarts appends a new header; its entries are
    /// moved onto the first header's clock. `tenants` keeps only those (empty: all).
    pub fn parse(text: &str, tenants: &[String]) -> std::result::Result<Capture, String> {
        let mut first_start_ms = None;
        let mut offset_us = 0u64;
        let mut capture = Capture::default();
        let mut devices: BTreeMap<(String, String), RecordedDevice> = BTreeMap::new();
        let mut sessions: HashMap<Uuid, (String, String, usize)> = HashMap::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if line.contains("\"synchub_capture\"") {
                let header: CaptureHeader = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
                if header.synchub_capture != protocol::capture::CAPTURE_FORMAT {
                    return Err(format!("line {}: capture format {} is not supported", n + 1, header.synchub_capture));
                }
                let first = *first_start_ms.get_or_insert(header.started_at_ms);
                offset_us = header.started_at_ms.saturating_sub(first).saturating_mul(1000);
                continue;
            }
            if first_start_ms.is_none() {
                return Err("the file does not start with a capture header".into());
            }
            let entry: CaptureEntry = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            if !tenants.is_empty() && !tenants.contains(&entry.tenant) {
                continue;
            }
            let t = entry.t_us.saturating_add(offset_us);
            capture.span_us = capture.span_us.max(t);
            let device = devices.entry((entry.tenant.clone(), entry.device.clone())).or_insert_with(|| RecordedDevice {
                tenant: entry.tenant.clone(),
                device: entry.device.clone(),
                user: entry.user.clone(),
                role: entry.role.clone(),
                sessions: Vec::new(),
                first_device_seq: u64::MAX,
            });
            let index = match sessions.get(&entry.session) {
                Some((tenant, device, i)) if *tenant == entry.tenant && *device == entry.device => *i,
                // A session is one device's socket: a file that says otherwise is not a capture.
                Some((tenant, device, _)) => {
                    return Err(format!(
                        "line {}: session {} is device `{device}` of `{tenant}`, not `{}` of `{}`",
                        n + 1,
                        entry.session,
                        entry.device,
                        entry.tenant
                    ))
                }
                None => {
                    let msgpack = matches!(entry.event, CaptureEvent::Frame { msgpack: true, .. });
                    device.sessions.push(RecordedSession { start_us: t, msgpack, ..RecordedSession::default() });
                    let i = device.sessions.len() - 1;
                    sessions.insert(entry.session, (entry.tenant.clone(), entry.device.clone(), i));
                    i
                }
            };
            match entry.event {
                CaptureEvent::Frame { frame: ClientFrame::Hello { .. }, .. } => {}
                CaptureEvent::Frame { frame, .. } => {
                    if let ClientFrame::Push { changes, .. } = &frame {
                        for change in changes {
                            device.first_device_seq = device.first_device_seq.min(change.device_seq);
                            capture.key_values.extend(change.key.values().filter_map(|v| v.as_str().map(String::from)));
                        }
                    }
                    capture.frames += 1;
                    device.sessions[index].frames.push((t, frame));
                }
                CaptureEvent::Ack { results, .. } => {
                    let seqs = capture.seqs.entry(entry.tenant.clone()).or_default();
                    for r in results {
                        if let Some(seq) = r.seq {
                            seqs.insert((entry.device.clone(), r.device_seq), seq);
                        }
                    }
                }
                CaptureEvent::Close => device.sessions[index].end_us = Some(t),
            }
        }
        capture.devices = devices.into_values().collect();
        for device in &mut capture.devices {
            if device.first_device_seq == u64::MAX {
                device.first_device_seq = 1;
            }
        }
        Ok(capture)
    }
}

/// How one copy of the capture renames what it plays: tenants and devices get the copy's
/// prefix; UUID key values become name-based UUIDs (v5) in the copy's namespace, so different
/// copies never share a key (XOR-style salts collide: ids that differ in few bits meet other
/// ids that do), and other string key values get a
/// suffix (so copies never write each other's rows, and foreign keys stay consistent because
/// every occurrence of a key value is renamed alike); the tenant's id is replaced wherever a
/// field holds it. Integer keys are kept as they are.
#[derive(Debug, Clone)]
pub struct Remap {
    pub tag: String,
    namespace: Uuid,
}

impl Remap {
    pub fn new(prefix: &str, copy: usize) -> Remap {
        let tag = format!("{prefix}-{copy}");
        Remap { namespace: Uuid::new_v5(&Uuid::NAMESPACE_OID, tag.as_bytes()), tag }
    }

    pub fn tenant(&self, tenant: &str) -> String {
        format!("{}-{tenant}", self.tag)
    }

    pub fn device(&self, device: &str) -> String {
        format!("{}-{device}", self.tag)
    }

    pub fn uuid(&self, id: Uuid) -> Uuid {
        Uuid::new_v5(&self.namespace, id.as_bytes())
    }

    fn value(&self, value: &Value, tenant: &str, keys: &HashSet<String>) -> Value {
        match value {
            Value::String(s) if s == tenant => Value::String(self.tenant(tenant)),
            Value::String(s) if keys.contains(s) => match s.parse::<Uuid>() {
                Ok(id) => Value::String(self.uuid(id).hyphenated().to_string()),
                Err(_) => Value::String(format!("{s}~{}", self.tag)),
            },
            other => other.clone(),
        }
    }

    pub fn object(&self, object: &Object, tenant: &str, keys: &HashSet<String>) -> Object {
        object.iter().map(|(k, v)| (k.clone(), self.value(v, tenant, keys))).collect()
    }

    /// A recorded change as this copy plays it; `base_version` is translated by the caller.
    pub fn change(&self, change: &Change, tenant: &str, keys: &HashSet<String>, device_seq_offset: u64) -> Change {
        Change {
            change_id: self.uuid(change.change_id),
            device_seq: change.device_seq - device_seq_offset,
            table: change.table.clone(),
            op: change.op,
            key: self.object(&change.key, tenant, keys),
            fields: self.object(&change.fields, tenant, keys),
            hlc: change.hlc,
            base_version: change.base_version,
        }
    }
}

/// Recorded tenant seqs and the seqs the same changes got in one replayed tenant, to translate
/// a recorded `base_version` (a recorded seq) into the replayed tenant's seqs.
#[derive(Debug, Default)]
pub struct SeqTranslation {
    replayed: BTreeMap<u64, u64>,
}

impl SeqTranslation {
    pub fn learn(&mut self, recorded: u64, replayed: u64) {
        self.replayed.insert(recorded, replayed);
    }

    /// The replayed seq of the newest recorded change at or before `recorded` that has been
    /// replayed (0 when none has): what the device had seen, as far as the replay knows.
    pub fn translate(&self, recorded: u64) -> u64 {
        if recorded == 0 {
            return 0;
        }
        self.replayed.range(..=recorded).next_back().map_or(0, |(_, r)| *r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::capture::{AckedChange, CAPTURE_FORMAT};
    use protocol::{ChangeStatus, Hlc, Op};
    use serde_json::json;

    fn entry(t_us: u64, session: u128, device: &str, event: CaptureEvent) -> String {
        let e = CaptureEntry {
            t_us,
            session: Uuid::from_u128(session),
            tenant: "acme".into(),
            device: device.into(),
            user: "u1".into(),
            role: "Employee".into(),
            event,
        };
        serde_json::to_string(&e).unwrap()
    }

    fn push(device_seq: u64, id: &str) -> ClientFrame {
        ClientFrame::Push {
            id: 5,
            batch_id: Uuid::nil(),
            changes: vec![Change {
                change_id: Uuid::from_u128(7),
                device_seq,
                table: "orders".into(),
                op: Op::Upsert,
                key: json!({ "id": id }).as_object().unwrap().clone(),
                fields: json!({ "tenant_id": "acme", "customer_id": "c-9", "note": "acme" }).as_object().unwrap().clone(),
                hlc: Hlc { wall_ms: 1, counter: 0 },
                base_version: 3,
            }],
        }
    }

    fn hello() -> CaptureEvent {
        let frame = ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![1], token: String::new(), device_id: None, position: None };
        CaptureEvent::Frame { msgpack: true, frame }
    }

    #[test]
    fn groups_sessions_per_device_across_a_hub_restart() {
        let header = |ms: u64| serde_json::to_string(&CaptureHeader { synchub_capture: CAPTURE_FORMAT, started_at_ms: ms }).unwrap();
        let key = "0190a1b2-0000-7000-8000-000000000001";
        let lines = [
            header(1_000),
            entry(10, 1, "pos-1", hello()),
            entry(20, 1, "pos-1", CaptureEvent::Frame { msgpack: true, frame: push(41, key) }),
            entry(30, 1, "pos-1", CaptureEvent::Ack { batch_id: Uuid::nil(), results: vec![AckedChange { device_seq: 41, status: ChangeStatus::Applied, seq: Some(12) }] }),
            entry(40, 2, "pos-2", hello()),
            entry(50, 1, "pos-1", CaptureEvent::Close),
            // The hub restarted 5 s later; its clock starts again at 0.
            header(6_000),
            entry(100, 3, "pos-1", hello()),
            entry(200, 3, "pos-1", CaptureEvent::Frame { msgpack: true, frame: push(42, key) }),
        ]
        .join("\n");
        let capture = Capture::parse(&lines, &[]).unwrap();
        assert_eq!(capture.devices.len(), 2);
        let pos1 = &capture.devices[0];
        assert_eq!((pos1.device.as_str(), pos1.sessions.len(), pos1.first_device_seq), ("pos-1", 2, 41));
        assert_eq!((pos1.sessions[0].start_us, pos1.sessions[0].end_us, pos1.sessions[0].msgpack), (10, Some(50), true));
        assert_eq!(pos1.sessions[1].start_us, 5_000_100);
        assert_eq!(pos1.sessions[1].frames[0].0, 5_000_200);
        assert_eq!(pos1.sessions[1].end_us, None);
        assert_eq!(capture.devices[1].sessions[0].frames.len(), 0);
        assert_eq!(capture.frames, 2);
        assert_eq!(capture.span_us, 5_000_200);
        assert_eq!(capture.seqs["acme"][&("pos-1".to_string(), 41)], 12);
        assert!(capture.key_values.contains(key));

        assert!(Capture::parse(&lines, &["other".to_string()]).unwrap().devices.is_empty());
        assert!(Capture::parse(&entry(1, 1, "x", CaptureEvent::Close), &[]).is_err(), "no header");
    }

    #[test]
    fn remapping_renames_tenants_keys_and_foreign_keys_alike_per_copy() {
        let key = "0190a1b2-0000-7000-8000-000000000001";
        let keys: HashSet<String> = [key.to_string(), "c-9".to_string()].into();
        let ClientFrame::Push { changes, .. } = push(41, key) else { unreachable!() };
        let (a, b) = (Remap::new("run", 0), Remap::new("run", 1));
        let ca = a.change(&changes[0], "acme", &keys, 40);
        let cb = b.change(&changes[0], "acme", &keys, 40);
        assert_eq!(ca.device_seq, 1);
        assert_eq!(ca.fields["tenant_id"], json!("run-0-acme"));
        // A string that merely equals the tenant id elsewhere is replaced too: documented.
        assert_eq!(ca.fields["note"], json!("run-0-acme"));
        assert_eq!(ca.fields["customer_id"], json!("c-9~run-0"));
        let ka: Uuid = ca.key["id"].as_str().unwrap().parse().unwrap();
        let kb: Uuid = cb.key["id"].as_str().unwrap().parse().unwrap();
        assert_ne!(ka, kb);
        assert_ne!(ka.to_string(), key);
        // The same recorded key maps to the same replayed key within a copy (foreign keys hold).
        assert_eq!(a.uuid(key.parse().unwrap()), ka);
        assert_eq!(Remap::new("run", 0).uuid(key.parse().unwrap()), ka);
        assert_eq!(a.change(&changes[0], "acme", &keys, 40).key, ca.key);
        assert_ne!(ca.change_id, cb.change_id);
        assert_eq!(a.device("pos-1"), "run-0-pos-1");
    }

    #[test]
    fn base_versions_translate_to_the_newest_replayed_seq_at_or_before() {
        let mut t = SeqTranslation::default();
        assert_eq!(t.translate(5), 0);
        t.learn(3, 101);
        t.learn(7, 140);
        assert_eq!(t.translate(0), 0);
        assert_eq!(t.translate(2), 0);
        assert_eq!(t.translate(3), 101);
        assert_eq!(t.translate(6), 101);
        assert_eq!(t.translate(9), 140);
    }
}
