//! The examples of the protocol's specification (`protocol/README.md`) hold for the demo schema
//! that `synchub dev` loads (`synchub::demo`), so that a reader can copy them against a dev hub.
//!
//! Every example frame is read from the spec: the ```json blocks whose object has a `type`, and
//! the `C→H` / `H→C` lines of the example session. Then:
//!
//! - every table, key, column and value they show is checked against the demo tables as
//!   Postgres describes them (the key a change sends is the primary key without the tenant
//!   column; a `row` is a whole row; values fit their column's type and nullability);
//! - every client frame is sent, as written, to a real hub with the demo schema and seeded
//!   tenant, and must be taken: `hello` (with a token signed for the test but carrying the
//!   example token's claims), `push` (no change refused for its table, columns, key or values),
//!   `snapshot`, `subscribe`, `unsubscribe`, `auth` and `ping`. Only the request ids, the
//!   pushes' device_seqs (renumbered to follow the test device's cursor) and the tokens' `exp`
//!   and signatures are changed. `resume` is not sent: it only follows a `must_resync`, and it
//!   names no table.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use protocol::{ErrorCode, ServerFrame};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

const CLIENT_TYPES: [&str; 8] = ["hello", "push", "auth", "resume", "snapshot", "ping", "subscribe", "unsubscribe"];

/// Refusals that say an example does not fit the schema.
const SCHEMA_REFUSALS: [ErrorCode; 6] = [
    ErrorCode::UnknownTable,
    ErrorCode::UnknownColumn,
    ErrorCode::InvalidValue,
    ErrorCode::InvalidKey,
    ErrorCode::TenantMismatch,
    ErrorCode::ValueTooLarge,
];

/// The spec's example frames, in the order they appear, each once.
fn spec_frames() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/README.md");
    let text = std::fs::read_to_string(&path).expect("protocol/README.md");
    let mut frames: Vec<Value> = Vec::new();
    let mut keep = |value: Value| {
        if value.get("type").is_some_and(Value::is_string) && !frames.contains(&value) {
            frames.push(value);
        }
    };
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```json" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            // Blocks that are not one JSON document (JSON Lines with elisions) are prose.
            if let Ok(value) = serde_json::from_str::<Value>(&body.join("\n")) {
                keep(value);
            }
        } else if let Some(json) = line.strip_prefix("C→H ").or_else(|| line.strip_prefix("H→C ")) {
            keep(serde_json::from_str(json).unwrap_or_else(|e| panic!("session line is not JSON ({e}): {json}")));
        }
    }
    frames
}

fn frame_type(frame: &Value) -> &str {
    frame["type"].as_str().unwrap_or_default()
}

fn is_client(frame: &Value) -> bool {
    CLIENT_TYPES.contains(&frame_type(frame))
}

fn short(frame: &Value) -> String {
    let text = frame.to_string();
    if text.len() > 160 {
        format!("{}…", &text[..text.char_indices().nth(160).map_or(text.len(), |(i, _)| i)])
    } else {
        text
    }
}

// ---------------------------------------------------------------------------------------------
// The demo tables as Postgres describes them.

struct Column {
    data_type: String,
    nullable: bool,
}

struct Table {
    tenant: String,
    columns: BTreeMap<String, Column>,
    /// The primary key without the tenant column: what a change's `key` holds.
    key: BTreeSet<String>,
}

struct Schema(BTreeMap<String, Table>);

impl Schema {
    async fn load(db: &sqlx::PgPool) -> Schema {
        let mut tables = BTreeMap::new();
        for config in synchub::demo::tables() {
            let columns: Vec<(String, String, String)> = sqlx::query_as(
                "select column_name::text, data_type::text, is_nullable::text from information_schema.columns \
                 where table_schema = 'public' and table_name = $1",
            )
            .bind(&config.name)
            .fetch_all(db)
            .await
            .unwrap();
            let key: Vec<String> = sqlx::query_scalar(
                "select a.attname::text from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) \
                 where i.indrelid = ('public.' || $1)::regclass and i.indisprimary",
            )
            .bind(&config.name)
            .fetch_all(db)
            .await
            .unwrap();
            assert!(!columns.is_empty(), "demo table {} exists", config.name);
            tables.insert(
                config.name.clone(),
                Table {
                    key: key.into_iter().filter(|k| *k != config.tenant_column).collect(),
                    columns: columns.into_iter().map(|(name, data_type, nullable)| (name, Column { data_type, nullable: nullable == "YES" })).collect(),
                    tenant: config.tenant_column,
                },
            );
        }
        Schema(tables)
    }

    fn table<'a>(&'a self, name: &Value, problems: &mut Vec<String>, at: &str) -> Option<&'a Table> {
        let table = name.as_str().and_then(|n| self.0.get(n));
        if table.is_none() {
            problems.push(format!("{at}: table {name} is not a demo table ({:?})", self.0.keys().collect::<Vec<_>>()));
        }
        table
    }

    /// The table whose columns are exactly the row's (for rows shown without their table).
    fn table_of_row(&self, row: &Map<String, Value>) -> Option<&Table> {
        self.0.values().find(|t| t.columns.len() == row.len() && row.keys().all(|c| t.columns.contains_key(c)))
    }
}

/// Whether `value` fits a column of Postgres type `data_type`.
fn fits(data_type: &str, value: &Value) -> bool {
    match data_type {
        "uuid" => value.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()),
        "integer" => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        "bigint" => value.is_i64(),
        "boolean" => value.is_boolean(),
        "text" | "timestamp with time zone" => value.is_string(),
        _ => true,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Image {
    /// Every column of the table (a `row`, a delete's `old`).
    Whole,
    /// Some columns (written `fields`, an upsert's `old`).
    Part,
    /// Exactly the key a change sends.
    Key,
}

fn check_object(table: &Table, value: &Value, image: Image, problems: &mut Vec<String>, at: &str) {
    let Some(object) = value.as_object() else {
        return problems.push(format!("{at}: not an object: {value}"));
    };
    for (column, v) in object {
        match table.columns.get(column) {
            None => problems.push(format!("{at}: no column `{column}` (columns: {:?})", table.columns.keys().collect::<Vec<_>>())),
            Some(c) if v.is_null() && !c.nullable && image != Image::Part => problems.push(format!("{at}: `{column}` is null but not nullable")),
            Some(c) if !v.is_null() && !fits(&c.data_type, v) => {
                problems.push(format!("{at}: `{column}` = {v} does not fit its type {}", c.data_type))
            }
            Some(_) => {}
        }
    }
    let shown: BTreeSet<&String> = object.keys().collect();
    match image {
        Image::Whole => {
            let missing: Vec<&String> = table.columns.keys().filter(|c| !shown.contains(c)).collect();
            if !missing.is_empty() {
                problems.push(format!("{at}: a whole row lacks {missing:?}"));
            }
        }
        Image::Key => {
            if shown != table.key.iter().collect() {
                problems.push(format!("{at}: key {value} is not the table's key {:?}", table.key));
            }
        }
        Image::Part => {}
    }
}

fn check_delta(schema: &Schema, delta: &Value, problems: &mut Vec<String>, at: &str) {
    let Some(table) = schema.table(&delta["table"], problems, at) else { return };
    check_object(table, &delta["key"], Image::Key, problems, &format!("{at} key"));
    if let Some(row) = delta.get("row") {
        check_object(table, row, Image::Whole, problems, &format!("{at} row"));
    }
    if let Some(old) = delta.get("old") {
        // A delete's old image is the whole row, unless the row only left the reader's view.
        let whole = delta["op"] == "delete" && delta.get("left") != Some(&json!(true));
        check_object(table, old, if whole { Image::Whole } else { Image::Part }, problems, &format!("{at} old"));
    }
}

fn check_shown_row(schema: &Schema, row: &Value, problems: &mut Vec<String>, at: &str) {
    match row.as_object().and_then(|r| schema.table_of_row(r)) {
        Some(table) => check_object(table, row, Image::Whole, problems, at),
        None => problems.push(format!("{at}: {row} is not a whole row of any demo table")),
    }
}

/// Every table, key, column and value an example shows, against the schema.
fn check_against_schema(schema: &Schema, frame: &Value, problems: &mut Vec<String>) {
    let at = format!("{} example {}", frame_type(frame), short(frame));
    let each = |field: &str| frame.get(field).and_then(Value::as_array).cloned().unwrap_or_default();
    match frame_type(frame) {
        "push" => {
            for (i, change) in each("changes").iter().enumerate() {
                let at = format!("{at} change {i}");
                let Some(table) = schema.table(&change["table"], problems, &at) else { continue };
                check_object(table, &change["key"], Image::Key, problems, &format!("{at} key"));
                if let Some(fields) = change.get("fields") {
                    check_object(table, fields, Image::Part, problems, &format!("{at} fields"));
                    if fields.get(&table.tenant).is_some() {
                        problems.push(format!("{at}: writes the tenant column, which comes from the token"));
                    }
                }
            }
        }
        "snapshot" => {
            if let (Some(table), Some(after)) = (schema.table(&frame["table"], problems, &at), frame.get("after")) {
                check_object(table, after, Image::Key, problems, &format!("{at} after"));
            }
        }
        "subscribe" if frame.get("table").is_some() => {
            let Some(table) = schema.table(&frame["table"], problems, &at) else { return };
            for condition in each("filter") {
                let column = condition["column"].as_str().unwrap_or_default();
                let Some(c) = table.columns.get(column) else {
                    problems.push(format!("{at}: filter on `{column}`, not a column of {}", frame["table"]));
                    continue;
                };
                let values = match &condition["value"] {
                    Value::Array(values) if condition["op"] == "in" => values.clone(),
                    value => vec![value.clone()],
                };
                for v in values.iter().filter(|v| !v.is_null() && !fits(&c.data_type, v)) {
                    problems.push(format!("{at}: filter value {v} cannot compare with `{column}` ({})", c.data_type));
                }
            }
        }
        "catch_up" | "delta" | "sub_delta" => {
            for (i, delta) in each("deltas").iter().enumerate() {
                check_delta(schema, delta, problems, &format!("{at} delta {i}"));
            }
        }
        "snapshot_page" => {
            let Some(table) = schema.table(&frame["table"], problems, &at) else { return };
            for (i, row) in each("rows").iter().enumerate() {
                check_object(table, &row["row"], Image::Whole, problems, &format!("{at} row {i}"));
            }
            if let Some(after) = frame.get("next_after") {
                check_object(table, after, Image::Key, problems, &format!("{at} next_after"));
            }
        }
        "sub_rows" => {
            for (i, row) in each("rows").iter().enumerate() {
                check_shown_row(schema, &row["row"], problems, &format!("{at} row {i}"));
            }
        }
        "ack" => {
            for (i, result) in each("results").iter().enumerate() {
                if let Some(row) = result.get("row") {
                    check_shown_row(schema, row, problems, &format!("{at} result {i} row"));
                }
            }
        }
        "conflict" => {
            let record = &frame["conflict"];
            let Some(table) = schema.table(&record["table"], problems, &at) else { return };
            check_object(table, &record["key"], Image::Key, problems, &format!("{at} key"));
            let field = record["field"].as_str().unwrap_or_default();
            match table.columns.get(field) {
                None => problems.push(format!("{at}: field `{field}` is not a column of {}", record["table"])),
                Some(c) => {
                    for side in ["server", "incoming"] {
                        let v = &record[side]["value"];
                        if !v.is_null() && !fits(&c.data_type, v) {
                            problems.push(format!("{at}: {side} value {v} does not fit `{field}` ({})", c.data_type));
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Sending the client examples to a hub.

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in text.trim_end_matches('=').bytes() {
        bits = (bits << 6) | u32::from(digit(c)?);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

/// A token the test hub accepts, with the example token's claims and a fresh `exp`.
fn signed_like(example_token: &str) -> Result<String, String> {
    let payload = example_token.split('.').nth(1).ok_or("the example token is not a JWT")?;
    let bytes = base64url_decode(payload).ok_or("the example token's claims are not base64url")?;
    let mut claims: Value = serde_json::from_slice(&bytes).map_err(|e| format!("the example token's claims are not JSON: {e}"))?;
    if !claims["exp"].is_number() {
        return Err(format!("the example token has no numeric `exp`: {claims}"));
    }
    claims["exp"] = json!(synchub::auth::unix_now() + 3600);
    Ok(synchub::auth::mint_hs256(SECRET, &claims))
}

/// Send `frame` as JSON text with the request id `id`, and return the hub's answer to it.
async fn ask(client: &mut Client, mut frame: Value, id: u64) -> ServerFrame {
    frame["id"] = json!(id);
    client.send_raw(Message::Text(frame.to_string())).await;
    client
        .expect(|f| {
            let answer = match f {
                ServerFrame::Ack { id, .. }
                | ServerFrame::SnapshotPage { id, .. }
                | ServerFrame::Subscribed { id, .. }
                | ServerFrame::Unsubscribed { id, .. }
                | ServerFrame::AuthOk { id, .. }
                | ServerFrame::Pong { id }
                | ServerFrame::Welcome { id, .. }
                | ServerFrame::Error { id: Some(id), .. } => Some(*id),
                _ => None,
            };
            (answer == Some(frame["id"].as_u64().unwrap())).then(|| f.clone())
        })
        .await
}

fn refusal(answer: &ServerFrame) -> Option<String> {
    match answer {
        ServerFrame::Error { code, message, .. } => Some(format!("refused {}: {message}", code.as_str())),
        _ => None,
    }
}

#[actix_web::test]
async fn the_specs_examples_fit_the_demo_schema() {
    let frames = spec_frames();
    let count = |kind: &str| frames.iter().filter(|f| frame_type(f) == kind).count();
    assert!(count("push") >= 3 && count("subscribe") >= 2 && count("snapshot") >= 2 && count("catch_up") >= 1, "examples found: {}", frames.len());

    let hub = TestHub::start().await;
    synchub::demo::seed(&hub.db).await.unwrap();
    let tenant = synchub::demo::DEMO_TENANT;
    let schema = Schema::load(&hub.db).await;
    let mut problems = Vec::new();
    for frame in &frames {
        check_against_schema(&schema, frame, &mut problems);
    }

    // Each hello on a socket of its own; a hello without a token sends the previous example's
    // at the upgrade.
    let mut device_token: Option<String> = None;
    let mut dashboard_token: Option<String> = None;
    for hello in frames.iter().filter(|f| frame_type(f) == "hello") {
        let at = format!("hello example {}", short(hello));
        let mut hello = hello.clone();
        let example_token = hello.get("token").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_owned);
        let signed = match example_token.as_deref().map(signed_like) {
            Some(Ok(token)) => token,
            Some(Err(problem)) => {
                problems.push(format!("{at}: {problem}"));
                continue;
            }
            None => match &device_token {
                Some(token) => token.clone(),
                None => {
                    problems.push(format!("{at}: no token, and no earlier example's to send at the upgrade"));
                    continue;
                }
            },
        };
        let mut client = if example_token.is_some() {
            hello["token"] = json!(signed);
            hub.client().await
        } else {
            let bearer = format!("Bearer {signed}");
            match Client::connect_with(hub.addr, &[("Authorization", bearer.as_str())], "").await {
                Ok(client) => client,
                Err(err) => {
                    problems.push(format!("{at}: the upgrade with the earlier example's token is refused: {err}"));
                    continue;
                }
            }
        };
        match ask(&mut client, hello.clone(), 1).await {
            ServerFrame::Welcome { .. } if hello["mode"] == "dashboard" => {
                dashboard_token.get_or_insert(signed);
            }
            ServerFrame::Welcome { .. } => {
                device_token.get_or_insert(signed);
            }
            other => problems.push(format!("{at}: {}", refusal(&other).unwrap_or_else(|| format!("answered {other:?}")))),
        }
    }
    // Without a usable example token, the rest goes on with tokens like those `synchub dev` prints.
    let device_token = device_token.unwrap_or_else(|| token(tenant, "employee-ana", "Employee", Some("pos-1")));
    let dashboard_token = dashboard_token.unwrap_or_else(|| token(tenant, "manager-mia", "Manager", None));

    // The device's requests, on one session that starts as the first-start example does.
    let mut device = hub.client().await;
    let welcome = ask(&mut device, json!({"type": "hello", "versions": [1], "token": device_token}), 1).await;
    assert!(matches!(welcome, ServerFrame::Welcome { .. }), "the device is welcomed: {welcome:?}");
    device.until_up_to_date().await;
    let mut next_device_seq = 1;
    let mut id = 100;
    for frame in frames.iter().filter(|f| is_client(f) && !["hello", "resume", "subscribe", "unsubscribe"].contains(&frame_type(f))) {
        id += 1;
        let at = format!("{} example {}", frame_type(frame), short(frame));
        let mut frame = frame.clone();
        if frame_type(&frame) == "auth" {
            match signed_like(frame["token"].as_str().unwrap_or_default()) {
                Ok(token) => frame["token"] = json!(token),
                Err(problem) => {
                    problems.push(format!("{at}: {problem}"));
                    continue;
                }
            }
        }
        if let Some(changes) = frame.get_mut("changes").and_then(Value::as_array_mut) {
            for change in changes.iter_mut() {
                change["device_seq"] = json!(next_device_seq);
                next_device_seq += 1;
            }
        }
        let answer = ask(&mut device, frame.clone(), id).await;
        if let Some(refused) = refusal(&answer) {
            problems.push(format!("{at}: {refused}"));
            continue;
        }
        match (frame_type(&frame), &answer) {
            ("push", ServerFrame::Ack { results, .. }) => {
                for r in results.iter().filter(|r| r.reason.is_some_and(|reason| SCHEMA_REFUSALS.contains(&reason))) {
                    problems.push(format!(
                        "{at}: change {} rejected {}: {}",
                        r.change_id,
                        r.reason.unwrap().as_str(),
                        r.message.as_deref().unwrap_or_default()
                    ));
                }
            }
            ("snapshot", ServerFrame::SnapshotPage { table, rows, .. }) => {
                let demo_rows = rows.iter().filter(|r| r.row["tenant_id"] == json!(tenant)).count();
                assert_eq!(demo_rows, rows.len(), "{at}: {table} rows of the demo tenant");
            }
            ("auth", ServerFrame::AuthOk { .. }) | ("ping", ServerFrame::Pong { .. }) => {}
            (_, other) => problems.push(format!("{at}: answered {other:?}")),
        }
    }

    // Subscriptions, on the dashboard the examples open.
    let mut dashboard = hub.client().await;
    let welcome = ask(&mut dashboard, json!({"type": "hello", "versions": [1], "token": dashboard_token, "mode": "dashboard"}), 1).await;
    assert!(matches!(welcome, ServerFrame::Welcome { .. }), "the dashboard is welcomed: {welcome:?}");
    for frame in frames.iter().filter(|f| ["subscribe", "unsubscribe"].contains(&frame_type(f))) {
        id += 1;
        let at = format!("{} example {}", frame_type(frame), short(frame));
        match ask(&mut dashboard, frame.clone(), id).await {
            ServerFrame::Subscribed { .. } | ServerFrame::Unsubscribed { .. } => {}
            answer => problems.push(format!("{at}: {}", refusal(&answer).unwrap_or_else(|| format!("answered {answer:?}")))),
        }
    }

    assert!(problems.is_empty(), "{} problems with the spec's examples:\n{}", problems.len(), problems.join("\n"));
    hub.shutdown().await;
}
