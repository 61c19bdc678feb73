//! Capture files: device traffic recorded by the hub (when configured to) and replayed by
//! the load tester. JSON Lines: a [`CaptureHeader`] line, then one [`CaptureEntry`] per event.
//! Tokens are never written: `hello.token` and `auth.token` are emptied before recording.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ChangeStatus, ClientFrame};

/// Version of the capture format, in the header line.
pub const CAPTURE_FORMAT: u32 = 1;

/// First line of a capture file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureHeader {
    /// Always [`CAPTURE_FORMAT`] for files this crate writes.
    pub synchub_capture: u32,
    /// Wall time the recording started, ms since the Unix epoch; `t_us` counts from here.
    pub started_at_ms: u64,
}

/// One recorded event of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureEntry {
    /// Microseconds since the recording started.
    pub t_us: u64,
    /// The hub's id of the session (one socket).
    pub session: Uuid,
    pub tenant: String,
    pub device: String,
    pub user: String,
    pub role: String,
    #[serde(flatten)]
    pub event: CaptureEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CaptureEvent {
    /// A frame the device sent, after a successful `hello` (which is recorded too). `msgpack`
    /// tells whether it came in a binary frame.
    Frame { msgpack: bool, frame: ClientFrame },
    /// The hub acked a push: the tenant seq each change got (absent when it wrote nothing).
    /// A replay uses these to translate `base_version`s into the replayed tenant's seqs.
    Ack { batch_id: Uuid, results: Vec<AckedChange> },
    /// The session ended.
    Close,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckedChange {
    pub device_seq: u64,
    pub status: ChangeStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl ClientFrame {
    /// The frame with any token it carries emptied, fit for a capture file.
    pub fn without_token(mut self) -> ClientFrame {
        match &mut self {
            ClientFrame::Hello { token, .. } | ClientFrame::Auth { token, .. } => token.clear(),
            _ => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Position;

    #[test]
    fn entries_round_trip_as_json_lines_without_tokens() {
        let hello = ClientFrame::Hello {
            mode: Default::default(),
            id: 1,
            versions: vec![1],
            token: "eyJsecret".into(),
            device_id: Some("pos-1".into()),
            position: Some(Position { epoch: "e".into(), seq: 4 }),
        };
        let entry = CaptureEntry {
            t_us: 12,
            session: Uuid::nil(),
            tenant: "acme".into(),
            device: "pos-1".into(),
            user: "u".into(),
            role: "Employee".into(),
            event: CaptureEvent::Frame { msgpack: false, frame: hello.without_token() },
        };
        let line = serde_json::to_string(&entry).unwrap();
        assert!(!line.contains("eyJsecret") && !line.contains('\n'));
        assert!(line.contains(r#""event":"frame""#), "{line}");
        assert_eq!(serde_json::from_str::<CaptureEntry>(&line).unwrap(), entry);

        let auth = ClientFrame::Auth { id: 2, token: "eyJfresh".into() }.without_token();
        assert_eq!(auth, ClientFrame::Auth { id: 2, token: String::new() });
        let ping = ClientFrame::Ping { id: 3 };
        assert_eq!(ping.clone().without_token(), ping);

        let ack = CaptureEntry {
            event: CaptureEvent::Ack {
                batch_id: Uuid::nil(),
                results: vec![AckedChange { device_seq: 1, status: ChangeStatus::Applied, seq: Some(9) }],
            },
            ..entry
        };
        let line = serde_json::to_string(&ack).unwrap();
        assert_eq!(serde_json::from_str::<CaptureEntry>(&line).unwrap(), ack);
    }
}
