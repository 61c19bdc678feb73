//! What must hold for any capture file line (protocol/src/capture.rs): no panic, and a line
//! that reads as a header or an entry is written back as a line that reads the same, with any
//! token emptied by `without_token`.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use protocol::capture::{CaptureEntry, CaptureEvent, CaptureHeader};
use protocol::ClientFrame;
use serde_json::{json, Value};

/// Body of the `capture` target: the bytes are a capture file.
pub fn capture(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    for line in text.lines() {
        if let Ok(header) = serde_json::from_str::<CaptureHeader>(line) {
            let again = serde_json::to_string(&header).expect("a header encodes");
            assert_eq!(serde_json::from_str::<CaptureHeader>(&again).ok(), Some(header));
        }
        if let Ok(entry) = serde_json::from_str::<CaptureEntry>(line) {
            let again = serde_json::to_string(&entry).expect("an entry encodes");
            assert!(!again.contains('\n'), "an entry is one line: {again}");
            assert_eq!(serde_json::from_str::<CaptureEntry>(&again).as_ref().ok(), Some(&entry), "{line}");
            if let CaptureEvent::Frame { frame, .. } = &entry.event {
                let emptied = frame.clone().without_token();
                match (frame, &emptied) {
                    (ClientFrame::Hello { .. }, ClientFrame::Hello { token, .. }) | (ClientFrame::Auth { .. }, ClientFrame::Auth { token, .. }) => {
                        assert!(token.is_empty(), "a token is kept: {emptied:?}")
                    }
                    _ => assert_eq!(&emptied, frame, "only tokens are emptied"),
                }
            }
        }
    }
}

/// Seeds: a capture file of every golden client frame (JSON) as recorded frames of two
/// sessions, with an ack, a close and a second header (a hub restart); and one file per frame.
pub fn seeds(testdata: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let header = |ms: u64| json!({"synchub_capture": 1, "started_at_ms": ms}).to_string();
    let entry = |t_us: u64, session: u128, event: Value| {
        let mut line = json!({"t_us": t_us, "session": uuid::Uuid::from_u128(session), "tenant": "acme", "device": "pos-1", "user": "u1", "role": "Employee"});
        line.as_object_mut().expect("an object").extend(event.as_object().expect("an event object").clone());
        line.to_string()
    };
    let frames: Vec<(String, Value)> = super::frames::seeds(testdata, protocol::Encoding::Json)
        .into_iter()
        .filter(|(name, _)| name.starts_with("client_"))
        .map(|(name, bytes)| (name, serde_json::from_slice(&bytes).expect("a golden vector is JSON")))
        .collect();
    let mut all = vec![header(1_700_000_000_000)];
    let mut seeds = Vec::new();
    for (n, (name, frame)) in frames.iter().enumerate() {
        let line = entry(10 * n as u64, 1 + (n % 2) as u128, json!({"event": "frame", "msgpack": n % 2 == 1, "frame": frame}));
        seeds.push((format!("capture-{name}"), format!("{}\n{line}\n", header(1_700_000_000_000)).into_bytes()));
        all.push(line);
    }
    all.push(entry(1_000, 1, json!({"event": "ack", "batch_id": uuid::Uuid::from_u128(9), "results": [{"device_seq": 18, "status": "applied", "seq": 1042}, {"device_seq": 19, "status": "rejected"}]})));
    all.push(entry(1_100, 1, json!({"event": "close"})));
    all.push(header(1_700_000_005_000));
    all.push(entry(20, 3, json!({"event": "frame", "msgpack": false, "frame": {"type": "ping", "id": 1}})));
    seeds.push(("capture-all".into(), all.join("\n").into_bytes()));
    seeds
}
