//! Conflicts as CSV, for a spreadsheet: one line per conflict under a header, RFC 4180 quoting,
//! and cells that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, a tab
//! or a carriage return) prefixed with `'`, since the values come from devices.

use protocol::ConflictRecord;
use serde_json::Value;

use crate::storage::conflicts::status_str;

/// The header line's columns, in order.
pub const COLUMNS: [&str; 21] = [
    "id",
    "created_at",
    "status",
    "table",
    "key",
    "field",
    "kept",
    "policy",
    "stored_value",
    "stored_device",
    "stored_user",
    "pushed_value",
    "pushed_device",
    "pushed_user",
    "base_version",
    "seq",
    "reviewed_by",
    "reviewed_at",
    "resolution",
    "resolved_value",
    "row_label",
];

/// The header line, with its line end.
pub fn header() -> String {
    let mut line = COLUMNS.join(",");
    line.push_str("\r\n");
    line
}

/// One conflict's line, with its line end.
pub fn line(c: &ConflictRecord) -> String {
    let kept = if c.winner == "server" { "stored" } else { "pushed" };
    let cells: [String; 21] = [
        c.id.to_string(),
        c.created_at.clone(),
        status_str(c.status).to_string(),
        c.table.clone(),
        Value::Object(c.key.clone()).to_string(),
        c.field.clone(),
        kept.to_string(),
        c.policy.clone(),
        value_text(&c.server.value),
        c.server.device.clone(),
        c.server.user.clone().unwrap_or_default(),
        value_text(&c.incoming.value),
        c.incoming.device.clone(),
        c.incoming.user.clone().unwrap_or_default(),
        c.base_version.to_string(),
        c.seq.map(|s| s.to_string()).unwrap_or_default(),
        c.reviewed_by.clone().unwrap_or_default(),
        c.reviewed_at.clone().unwrap_or_default(),
        c.resolution.clone().unwrap_or_default(),
        c.resolved_value.as_ref().map(value_text).unwrap_or_default(),
        c.row_label.clone().unwrap_or_default(),
    ];
    let mut out = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_cell(&mut out, cell);
    }
    out.push_str("\r\n");
    out
}

/// A field's value as a cell: text as it is, other JSON as JSON (`null` for none).
fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Append `cell`, defused and quoted as needed.
fn push_cell(out: &mut String, cell: &str) {
    let defused = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    // A negative number is data, not a formula: left as it is.
    let defused = defused && cell.parse::<f64>().is_err();
    let quoted = defused || cell.contains([',', '"', '\n', '\r']) || cell.starts_with(' ') || cell.ends_with(' ');
    if quoted {
        out.push('"');
    }
    if defused {
        out.push('\'');
    }
    for ch in cell.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    if quoted {
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ConflictSide, Hlc, ReviewStatus};
    use serde_json::json;

    fn cell(text: &str) -> String {
        let mut out = String::new();
        push_cell(&mut out, text);
        out
    }

    #[test]
    fn cells_are_quoted_only_when_needed() {
        assert_eq!(cell("Oat milk"), "Oat milk");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(cell(""), "");
    }

    #[test]
    fn formulas_from_devices_are_defused_but_numbers_are_not() {
        assert_eq!(cell("=HYPERLINK(\"http://x\")"), "\"'=HYPERLINK(\"\"http://x\"\")\"");
        assert_eq!(cell("+1+1"), "\"'+1+1\"");
        assert_eq!(cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(cell("-12"), "-12");
        assert_eq!(cell("-1.5"), "-1.5");
        assert_eq!(cell("-x"), "\"'-x\"");
    }

    #[test]
    fn a_conflict_is_one_line_under_the_header() {
        let side = |value: Value, device: &str| ConflictSide { value, hlc: Hlc { wall_ms: 1, counter: 0 }, device: device.into(), user: None, version: None };
        let c = ConflictRecord {
            id: 7,
            table: "products".into(),
            key: json!({"id": "p1"}).as_object().unwrap().clone(),
            field: "name".into(),
            status: ReviewStatus::Resolved,
            winner: "incoming".into(),
            policy: "lww".into(),
            base_version: 3,
            seq: Some(12),
            server: side(json!("Tea, green"), "pos-1"),
            incoming: side(json!(250), "pos-2"),
            change_id: uuid::Uuid::nil(),
            batch_id: uuid::Uuid::nil(),
            created_at: "2026-12-07T10:00:00Z".into(),
            reviewed_by: Some("mia".into()),
            reviewed_at: Some("2026-12-07T11:00:00Z".into()),
            resolution: Some("value".into()),
            resolution_seq: Some(13),
            resolved_value: Some(json!(null)),
            row_label: Some("Oat milk".into()),
        };
        assert_eq!(header().trim_end().split(',').count(), COLUMNS.len());
        assert_eq!(
            line(&c),
            "7,2026-12-07T10:00:00Z,resolved,products,\"{\"\"id\"\":\"\"p1\"\"}\",name,pushed,lww,\"Tea, green\",pos-1,,250,pos-2,,3,12,mia,2026-12-07T11:00:00Z,value,null,Oat milk\r\n"
        );
    }
}
