//! Golden vectors of protocol v1 (`protocol/testdata/`).
//!
//! Every vector is a frame built here in Rust plus two files: `NAME.json` (the exact bytes of
//! `codec::encode(Encoding::Json, &frame)`, compact, no trailing newline) and `NAME.msgpack`
//! (the exact bytes of `codec::encode(Encoding::MsgPack, &frame)`). The tests check that
//! encoding gives exactly the stored bytes, that decoding the stored bytes gives the frame
//! back, that the two encodings agree, and that `README.md` shows exactly these examples.
//!
//! Regenerate the files after an intended wire change with
//! `SYNCHUB_BLESS_GOLDEN=1 cargo test -p synchub-protocol --test golden`, then review the diff.

// The decoder's own lists of frame types: the vectors must cover exactly these, and the
// exhaustive matches of frame types tie them to the frame enums.
use protocol::codec::{CLIENT_TYPES, SERVER_TYPES};
use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use proptest::prelude::*;
use protocol::codec::{self, DecodeError, Encoding};
use protocol::{
    Change, ChangeResult, ChangeStatus, Channel, ClientFrame, CloseCode, Condition, ConflictEvent, ConflictRecord, ConflictSide,
    Delta, ErrorCode, FilterOp, Hlc, Limits, Object, Op, Position, PresenceEntry, ReviewStatus, ServerFrame, SessionMode,
    SnapshotRow,
};
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Sample data: the demo café that `synchub dev` loads (its schema in `src/demo.rs` of the hub:
// products, orders and order_lines, each keyed by the tenant and the columns a change sends),
// with its two tills and a manager, as its printed tokens name them.

const TENANT: &str = "demo-store";
const TILL_1: &str = "pos-1";
const TILL_2: &str = "pos-2";
const ANA: &str = "employee-ana";
const BEN: &str = "employee-ben";
const MIA: &str = "manager-mia";
const STORE: &str = "store-1";
const EPOCH: &str = "01JCQ5Z8T1M4W6X9Y2B3C4D5E6";
const NEW_EPOCH: &str = "01JCRB0K2N7P3Q8S5T1V4W6X9Y";
// HS256 tokens with the demo's claims (`sub`, `role`, `tenant_id`, `device_id`, `exp`); the
// signatures are placeholders.
const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJlbXBsb3llZS1hbmEiLCJyb2xlIjoiRW1wbG95ZWUiLCJ0ZW5hbnRfaWQiOiJkZW1vLXN0b3JlIiwiZGV2aWNlX2lkIjoicG9zLTEiLCJleHAiOjE3MzE2NjQ4MDB9.Qm9ndXNTaWduYXR1cmVGb3JEb2NzT25seQ";
const FRESH_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJlbXBsb3llZS1hbmEiLCJyb2xlIjoiRW1wbG95ZWUiLCJ0ZW5hbnRfaWQiOiJkZW1vLXN0b3JlIiwiZGV2aWNlX2lkIjoicG9zLTEiLCJleHAiOjE3MzE2Njg0MDB9.QW5vdGhlckJvZ3VzU2lnbmF0dXJlRm9yRG9jcw";
const MANAGER_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJtYW5hZ2VyLW1pYSIsInJvbGUiOiJNYW5hZ2VyIiwidGVuYW50X2lkIjoiZGVtby1zdG9yZSIsImV4cCI6MTczMTY2NDgwMH0.TWFuYWdlckJvZ3VzU2lnbmF0dXJlRm9yRG9jcw";

// The demo's seeded products (`synchub dev` inserts them with stock 50).
const ESPRESSO: &str = "00000000-0000-4000-8000-000000000001";
const FLAT_WHITE: &str = "00000000-0000-4000-8000-000000000002";
const CROISSANT: &str = "00000000-0000-4000-8000-000000000003";
const SEEDED_AT: &str = "2024-11-14T17:02:09.318254+00:00";
const ORDER_41: &str = "0193304e-8a10-7d2e-b6f4-2c9a1e5d7f41";
const ORDER_42: &str = "0193304f-1b22-7a90-8c3d-4e6f8a0b2c42";
const ORDER_43: &str = "01933051-0c35-7f18-9a2b-6d4e8f1a3c43";

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).expect("valid uuid literal")
}

/// A JSON object with its keys (recursively) inserted in sorted order, so that the encoded key
/// order is the same whether or not serde_json's `preserve_order` feature gets unified in.
fn obj(v: Value) -> Object {
    match sorted(v) {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn key(id: &str) -> Object {
    obj(json!({ "id": id }))
}

/// An order line's key: its order and line number.
fn line_key(order_id: &str, line_no: u32) -> Object {
    obj(json!({ "order_id": order_id, "line_no": line_no }))
}

fn hlc(wall_ms: u64, counter: u32) -> Hlc {
    Hlc { wall_ms, counter }
}

fn result(change_id: &str, device_seq: u64, status: ChangeStatus, seq: Option<u64>) -> ChangeResult {
    ChangeResult {
        change_id: uuid(change_id),
        device_seq,
        status,
        seq,
        lost_fields: vec![],
        reason: None,
        message: None,
        row: None,
    }
}

fn rejected(change_id: &str, device_seq: u64, reason: ErrorCode, message: &str) -> ChangeResult {
    ChangeResult {
        reason: Some(reason),
        message: Some(message.to_string()),
        ..result(change_id, device_seq, ChangeStatus::Rejected, None)
    }
}

/// A product row as the hub sends it: every column, `updated_at` as Postgres filled it in.
fn product_row(id: &str, name: &str, sku: &str, price_cents: u64, stock: u64, active: bool) -> Object {
    obj(json!({
        "id": id, "tenant_id": TENANT, "name": name, "sku": sku,
        "price_cents": price_cents, "stock": stock, "active": active, "updated_at": SEEDED_AT,
    }))
}

// ---------------------------------------------------------------------------------------------
// The vectors.

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Client(ClientFrame),
    Server(ServerFrame),
}

impl Frame {
    fn encode(&self, enc: Encoding) -> Vec<u8> {
        match self {
            Frame::Client(f) => codec::encode(enc, f),
            Frame::Server(f) => codec::encode(enc, f),
        }
    }

    fn decode_like(&self, enc: Encoding, bytes: &[u8]) -> Result<Frame, DecodeError> {
        match self {
            Frame::Client(_) => codec::decode_client(enc, bytes).map(Frame::Client),
            Frame::Server(_) => codec::decode_server(enc, bytes).map(Frame::Server),
        }
    }
}

struct Golden {
    name: &'static str,
    frame: Frame,
}

fn c(name: &'static str, frame: ClientFrame) -> Golden {
    Golden { name, frame: Frame::Client(frame) }
}

fn s(name: &'static str, frame: ServerFrame) -> Golden {
    Golden { name, frame: Frame::Server(frame) }
}

fn goldens() -> Vec<Golden> {
    vec![

        // ---- subscriptions, presence, conflicts, broadcasts ----
        c(
            "client_hello_dashboard",
            ClientFrame::Hello {
                mode: SessionMode::Dashboard,
                id: 1,
                versions: vec![1],
                token: MANAGER_TOKEN.into(),
                device_id: None,
                position: None,
            },
        ),
        c(
            "client_subscribe",
            ClientFrame::Subscribe {
                id: 20,
                sub: "low-stock".into(),
                table: Some("products".into()),
                filter: vec![
                    Condition { column: "stock".into(), op: FilterOp::Lt, value: json!(10) },
                    Condition { column: "active".into(), op: FilterOp::Eq, value: json!(true) },
                ],
                snapshot: true,
                channel: None,
            },
        ),
        c(
            "client_subscribe_orders_today",
            ClientFrame::Subscribe {
                id: 21,
                sub: "orders-today".into(),
                table: Some("orders".into()),
                filter: vec![
                    Condition { column: "store_id".into(), op: FilterOp::In, value: json!([STORE, "store-2"]) },
                    Condition { column: "created_at".into(), op: FilterOp::Gte, value: json!("2024-11-15") },
                    Condition { column: "status".into(), op: FilterOp::Neq, value: json!("void") },
                ],
                snapshot: false,
                channel: None,
            },
        ),
        c(
            "client_subscribe_conflicts",
            ClientFrame::Subscribe { id: 22, sub: "conflicts".into(), table: None, filter: vec![], snapshot: false, channel: Some(Channel::Conflicts) },
        ),
        c(
            "client_subscribe_presence",
            ClientFrame::Subscribe { id: 23, sub: "who".into(), table: None, filter: vec![], snapshot: false, channel: Some(Channel::Presence) },
        ),
        c("client_unsubscribe", ClientFrame::Unsubscribe { id: 24, sub: "low-stock".into() }),
        s("server_subscribed", ServerFrame::Subscribed { id: 20, sub: "low-stock".into(), seq: 1045 }),
        s(
            "server_sub_rows",
            ServerFrame::SubRows {
                sub: "low-stock".into(),
                rows: vec![SnapshotRow {
                    row: product_row(CROISSANT, "Croissant", "CRS-01", 310, 4, true),
                    version: 1042,
                }],
                seq: 1045,
                last: true,
            },
        ),
        s(
            "server_sub_delta",
            ServerFrame::SubDelta {
                sub: "low-stock".into(),
                deltas: vec![
                    Delta {
                        seq: 1047,
                        table: "products".into(),
                        op: Op::Upsert,
                        key: key(FLAT_WHITE),
                        row: Some(product_row(FLAT_WHITE, "Flat white", "FLW-01", 380, 9, true)),
                        old: Some(obj(json!({"stock": 10}))),
                        origin: Some(TILL_2.into()),
                        change_id: Some(uuid("01933052-1d40-7a11-8b22-c3d4e5f6a7b8")),
                        left: false,
                    },
                    Delta {
                        seq: 1049,
                        table: "products".into(),
                        op: Op::Delete,
                        key: key(CROISSANT),
                        row: None,
                        old: Some(product_row(CROISSANT, "Croissant", "CRS-01", 310, 4, true)),
                        origin: None,
                        change_id: None,
                        left: false,
                    },
                ],
                seq: 1049,
            },
        ),
        s(
            "server_presence",
            ServerFrame::Presence {
                sub: "who".into(),
                online: vec![
                    PresenceEntry {
                        session_id: uuid("0193304f-8c00-7e5a-b1c2-d3e4f5a6b7c8"),
                        device_id: TILL_1.into(),
                        user_id: ANA.into(),
                        role: "Employee".into(),
                        mode: SessionMode::Device,
                        since_ms: 1_731_661_300_000,
                    },
                    PresenceEntry {
                        session_id: uuid("01933050-0a00-7b11-8c22-d3e4f5a6b7c9"),
                        device_id: "dashboard:01933050-0a00-7b11-8c22-d3e4f5a6b7c9".into(),
                        user_id: MIA.into(),
                        role: "Manager".into(),
                        mode: SessionMode::Dashboard,
                        since_ms: 1_731_661_320_500,
                    },
                ],
            },
        ),
        s(
            "server_presence_diff",
            ServerFrame::PresenceDiff {
                sub: "who".into(),
                joins: vec![PresenceEntry {
                    session_id: uuid("01933052-77aa-7c01-9d12-e3f4a5b6c7d8"),
                    device_id: TILL_2.into(),
                    user_id: BEN.into(),
                    role: "Employee".into(),
                    mode: SessionMode::Device,
                    since_ms: 1_731_661_402_250,
                }],
                leaves: vec![],
            },
        ),
        s(
            "server_conflict",
            ServerFrame::Conflict {
                sub: "conflicts".into(),
                event: ConflictEvent::Opened,
                conflict: Box::new(ConflictRecord {
                    id: 17,
                    table: "products".into(),
                    key: key(ESPRESSO),
                    field: "price_cents".into(),
                    status: ReviewStatus::Open,
                    winner: "incoming".into(),
                    policy: "lww".into(),
                    base_version: 1040,
                    seq: Some(1050),
                    server: ConflictSide {
                        value: json!(260),
                        hlc: hlc(1_731_661_380_000, 0),
                        device: TILL_1.into(),
                        user: Some(ANA.into()),
                        version: Some(1046),
                    },
                    incoming: ConflictSide {
                        value: json!(240),
                        hlc: hlc(1_731_661_390_120, 2),
                        device: TILL_2.into(),
                        user: Some(BEN.into()),
                        version: None,
                    },
                    change_id: uuid("01933053-0b10-7e21-8f32-a4b5c6d7e8f9"),
                    batch_id: uuid("01933053-0b0f-7d20-9e31-f3a4b5c6d7e8"),
                    created_at: "2024-11-15T09:03:11.204Z".into(),
                    reviewed_by: None,
                    reviewed_at: None,
                    resolution: None,
                    resolution_seq: None,
                    resolved_value: None,
                    row_label: None,
                }),
                open: 3,
            },
        ),
        s("server_unsubscribed", ServerFrame::Unsubscribed { id: 24, sub: "low-stock".into() }),
        s(
            "server_broadcast",
            ServerFrame::Broadcast {
                channel: "alerts".into(),
                event: None,
                payload: json!({"text": "Card terminals are offline: take cash only", "level": "warning"}),
            },
        ),
        // ---- client frames ----
        c(
            "client_hello",
            ClientFrame::Hello {
                mode: Default::default(),
                id: 1,
                versions: vec![1],
                token: TOKEN.into(),
                device_id: Some(TILL_1.into()),
                position: Some(Position { epoch: EPOCH.into(), seq: 1041 }),
            },
        ),
        c(
            "client_hello_first_start",
            ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![1], token: TOKEN.into(), device_id: None, position: None },
        ),
        c(
            "client_hello_token_at_upgrade",
            ClientFrame::Hello {
                mode: Default::default(),
                id: 1,
                versions: vec![1],
                token: String::new(),
                device_id: Some(TILL_1.into()),
                position: Some(Position { epoch: EPOCH.into(), seq: 1041 }),
            },
        ),
        c(
            "client_push",
            ClientFrame::Push {
                id: 2,
                batch_id: uuid("0193304f-a001-7b3c-9d2e-1f0a2b3c4d01"),
                changes: vec![Change {
                    change_id: uuid("0193304f-9e4b-7c61-a2d8-5b7c9e1f3b01"),
                    device_seq: 18,
                    table: "order_lines".into(),
                    op: Op::Upsert,
                    key: line_key(ORDER_41, 1),
                    fields: obj(json!({ "product_id": FLAT_WHITE, "quantity": 2, "unit_price_cents": 380 })),
                    hlc: hlc(1_731_661_331_512, 0),
                    base_version: 0,
                }],
            },
        ),
        c(
            "client_push_batch",
            ClientFrame::Push {
                id: 3,
                batch_id: uuid("01933051-0d00-7a11-8b22-3c44d55e6602"),
                changes: vec![
                    Change {
                        change_id: uuid("01933051-0c35-7f18-9a2b-6d4e8f1a3b13"),
                        device_seq: 19,
                        table: "orders".into(),
                        op: Op::Upsert,
                        key: key(ORDER_43),
                        fields: obj(json!({
                            "store_id": STORE, "employee_id": ANA, "created_at": "2024-11-15T09:14:02.118Z",
                            "status": "open", "total_cents": 670,
                        })),
                        hlc: hlc(1_731_662_042_118, 0),
                        base_version: 0,
                    },
                    Change {
                        change_id: uuid("01933051-0c36-7e02-b4c6-8d0e2f4a6b14"),
                        device_seq: 20,
                        table: "order_lines".into(),
                        op: Op::Upsert,
                        key: line_key(ORDER_43, 1),
                        fields: obj(json!({ "product_id": FLAT_WHITE, "quantity": 1, "unit_price_cents": 380 })),
                        hlc: hlc(1_731_662_042_118, 1),
                        base_version: 0,
                    },
                    Change {
                        change_id: uuid("01933051-0c37-7b45-8e1f-0a2c4e6f8d15"),
                        device_seq: 21,
                        table: "order_lines".into(),
                        op: Op::Upsert,
                        key: line_key(ORDER_43, 2),
                        fields: obj(json!({ "product_id": CROISSANT, "quantity": 1, "unit_price_cents": 290 })),
                        hlc: hlc(1_731_662_042_118, 2),
                        base_version: 0,
                    },
                    Change {
                        change_id: uuid("01933051-2f90-7c3d-a4e5-b6c7d8e9fa16"),
                        device_seq: 22,
                        table: "orders".into(),
                        op: Op::Upsert,
                        key: key(ORDER_43),
                        fields: obj(json!({ "status": "paid" })),
                        hlc: hlc(1_731_662_051_056, 0),
                        base_version: 0,
                    },
                ],
            },
        ),
        c(
            "client_push_delete",
            ClientFrame::Push {
                id: 4,
                batch_id: uuid("01933052-4a10-7e21-9c32-d4e5f6a7b803"),
                changes: vec![Change {
                    change_id: uuid("01933052-49f7-7d08-8b19-c2d3e4f5a617"),
                    device_seq: 23,
                    table: "order_lines".into(),
                    op: Op::Delete,
                    key: line_key(ORDER_43, 2),
                    fields: Object::new(),
                    hlc: hlc(1_731_662_120_903, 0),
                    base_version: 1048,
                }],
            },
        ),
        c("client_auth", ClientFrame::Auth { id: 6, token: FRESH_TOKEN.into() }),
        c("client_resume", ClientFrame::Resume { id: 9, position: Position { epoch: NEW_EPOCH.into(), seq: 2210 } }),
        c("client_snapshot", ClientFrame::Snapshot { id: 7, table: "products".into(), after: None, limit: Some(2) }),
        c(
            "client_snapshot_next_page",
            ClientFrame::Snapshot { id: 8, table: "products".into(), after: Some(key(FLAT_WHITE)), limit: Some(2) },
        ),
        c("client_ping", ClientFrame::Ping { id: 10 }),
        // ---- server frames ----
        s(
            "server_welcome",
            ServerFrame::Welcome {
                id: 1,
                version: 1,
                session_id: uuid("0193304f-8c00-7e5a-b1c2-d3e4f5a6b7c8"),
                device_id: TILL_1.into(),
                epoch: EPOCH.into(),
                head_seq: 1043,
                limits: Limits {
                    max_frame_bytes: 2_097_152,
                    max_batch_changes: 500,
                    catch_up_page_changes: 500,
                    snapshot_page_rows: 1000,
                    session_pushes_in_flight: 64,
                },
            },
        ),
        s(
            "server_catch_up",
            ServerFrame::CatchUp {
                deltas: vec![
                    // A price change made directly in Postgres by the back office: no origin.
                    Delta {
                        seq: 1042,
                        table: "products".into(),
                        op: Op::Upsert,
                        key: key(CROISSANT),
                        row: Some(product_row(CROISSANT, "Croissant", "CRS-01", 310, 50, true)),
                        old: Some(obj(json!({ "price_cents": 290 }))),
                        origin: None,
                        change_id: None,
                        left: false,
                    },
                    Delta {
                        seq: 1043,
                        table: "orders".into(),
                        op: Op::Upsert,
                        key: key(ORDER_42),
                        row: Some(obj(json!({
                            "id": ORDER_42, "tenant_id": TENANT, "store_id": STORE, "customer_id": null,
                            "status": "paid", "total_cents": 960, "employee_id": BEN, "created_at": "2024-11-15T08:58:40.311Z",
                        }))),
                        old: Some(obj(json!({ "status": "open" }))),
                        origin: Some(TILL_2.into()),
                        change_id: Some(uuid("0193304f-0a7c-7d31-8e42-f5a6b7c8d9e0")),
                        left: false,
                    },
                ],
                seq: 1043,
                head_seq: 1043,
            },
        ),
        s("server_up_to_date", ServerFrame::UpToDate { seq: 1043 }),
        s(
            "server_ack",
            ServerFrame::Ack {
                id: 2,
                batch_id: uuid("0193304f-a001-7b3c-9d2e-1f0a2b3c4d01"),
                results: vec![result("0193304f-9e4b-7c61-a2d8-5b7c9e1f3b01", 18, ChangeStatus::Applied, Some(1044))],
            },
        ),
        s(
            "server_ack_all_statuses",
            ServerFrame::Ack {
                id: 5,
                batch_id: uuid("01933055-1e20-7a31-8b42-c5d6e7f8a905"),
                results: vec![
                    result("01933052-49f7-7d08-8b19-c2d3e4f5a617", 23, ChangeStatus::Duplicate, Some(1050)),
                    result("01933054-7b01-7c12-9d23-e4f5a6b7c818", 24, ChangeStatus::Applied, Some(1052)),
                    // The till put the espresso back on sale while the back office changed its price.
                    ChangeResult {
                        row: Some(product_row(ESPRESSO, "Espresso", "ESP-01", 270, 40, true)),
                        ..result("01933054-7b02-7c13-9d24-e4f5a6b7c819", 25, ChangeStatus::Merged, Some(1053))
                    },
                    // The till set the flat white to 400 offline; till 2's later 390 won (lww).
                    ChangeResult {
                        lost_fields: vec!["price_cents".into()],
                        row: Some(product_row(FLAT_WHITE, "Flat white", "FLW-01", 390, 42, true)),
                        ..result("01933054-7b03-7c14-9d25-e4f5a6b7c81a", 26, ChangeStatus::Conflict, Some(1054))
                    },
                    rejected(
                        "01933054-7b04-7c15-9d26-e4f5a6b7c81b",
                        27,
                        ErrorCode::UnknownColumn,
                        "products has no column `colour`",
                    ),
                ],
            },
        ),
        s(
            "server_ack_seq_gap",
            ServerFrame::Ack {
                id: 11,
                batch_id: uuid("01933058-0001-7f00-8a00-b00000000006"),
                results: vec![
                    rejected(
                        "01933057-ff01-7e10-9a20-b30000000031",
                        31,
                        ErrorCode::SeqGap,
                        "expected device_seq 28, got 31",
                    ),
                    rejected(
                        "01933057-ff02-7e10-9a20-b30000000032",
                        32,
                        ErrorCode::SeqGap,
                        "expected device_seq 28, got 32",
                    ),
                ],
            },
        ),
        s(
            "server_delta",
            ServerFrame::Delta {
                deltas: vec![Delta {
                    seq: 1045,
                    table: "products".into(),
                    op: Op::Upsert,
                    key: key(ESPRESSO),
                    row: Some(product_row(ESPRESSO, "Espresso", "ESP-01", 250, 0, false)),
                    old: Some(obj(json!({ "active": true }))),
                    origin: Some(TILL_2.into()),
                    change_id: Some(uuid("0193304f-b7e1-7a02-9c13-d4e5f6a7b8c9")),
                    left: false,
                }],
                seq: 1045,
            },
        ),
        s(
            "server_delta_delete",
            ServerFrame::Delta {
                deltas: vec![Delta {
                    seq: 1050,
                    table: "order_lines".into(),
                    op: Op::Delete,
                    key: line_key(ORDER_43, 2),
                    row: None,
                    old: Some(obj(json!({
                        "tenant_id": TENANT, "order_id": ORDER_43, "line_no": 2, "product_id": CROISSANT,
                        "quantity": 1, "unit_price_cents": 290,
                    }))),
                    origin: Some(TILL_1.into()),
                    change_id: Some(uuid("01933052-49f7-7d08-8b19-c2d3e4f5a617")),
                    left: false,
                }],
                seq: 1050,
            },
        ),
        s(
            "server_must_resync",
            ServerFrame::MustResync { epoch: NEW_EPOCH.into(), head_seq: 2210, reason: ErrorCode::EpochMismatch },
        ),
        s(
            "server_snapshot_page",
            ServerFrame::SnapshotPage {
                id: 7,
                table: "products".into(),
                rows: vec![
                    SnapshotRow { row: product_row(ESPRESSO, "Espresso", "ESP-01", 270, 36, true), version: 1874 },
                    SnapshotRow { row: product_row(FLAT_WHITE, "Flat white", "FLW-01", 390, 41, true), version: 2196 },
                ],
                seq: 2210,
                epoch: NEW_EPOCH.into(),
                next_after: Some(key(FLAT_WHITE)),
            },
        ),
        s(
            "server_snapshot_page_last",
            ServerFrame::SnapshotPage {
                id: 8,
                table: "products".into(),
                rows: vec![SnapshotRow {
                    row: product_row(CROISSANT, "Croissant", "CRS-01", 310, 0, false),
                    version: 2203,
                }],
                seq: 2211,
                epoch: NEW_EPOCH.into(),
                next_after: None,
            },
        ),
        s("server_auth_ok", ServerFrame::AuthOk { id: 6, expires_at: 1_731_668_400 }),
        s("server_pong", ServerFrame::Pong { id: 10 }),
        s(
            "server_error",
            ServerFrame::Error {
                id: Some(12),
                code: ErrorCode::BatchTooLarge,
                message: "batch has 742 changes; the limit is 500".into(),
                temporary: false,
                retry_after_ms: None,
            },
        ),
        s(
            "server_error_busy",
            ServerFrame::Error {
                id: Some(13),
                code: ErrorCode::Busy,
                message: "tenant write queue is full; retry the same batch later".into(),
                temporary: true,
                retry_after_ms: None,
            },
        ),
        s(
            "server_error_rate_limited",
            ServerFrame::Error {
                id: Some(14),
                code: ErrorCode::RateLimited,
                message: "too many pushes; retry in 250 ms".into(),
                temporary: true,
                retry_after_ms: Some(250),
            },
        ),
        s(
            "server_error_malformed",
            ServerFrame::Error {
                id: None,
                code: ErrorCode::MalformedFrame,
                message: "expected value at line 1 column 1".into(),
                temporary: false,
                retry_after_ms: None,
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn blessing() -> bool {
    std::env::var("SYNCHUB_BLESS_GOLDEN").is_ok_and(|v| v == "1")
}

fn read(name: &str, ext: &str) -> Vec<u8> {
    let path = testdata().join(format!("{name}.{ext}"));
    fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (run with SYNCHUB_BLESS_GOLDEN=1 to generate)", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn msgpack_to_value(bytes: &[u8]) -> Value {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
    serde::Deserialize::deserialize(&mut de).expect("msgpack decodes to a generic value")
}


/// Exhaustive on purpose: a new variant fails to compile here until it gets a golden vector.
fn client_type(f: &ClientFrame) -> &'static str {
    match f {
        ClientFrame::Hello { .. } => "hello",
        ClientFrame::Push { .. } => "push",
        ClientFrame::Auth { .. } => "auth",
        ClientFrame::Resume { .. } => "resume",
        ClientFrame::Snapshot { .. } => "snapshot",
        ClientFrame::Ping { .. } => "ping",
        ClientFrame::Subscribe { .. } => "subscribe",
        ClientFrame::Unsubscribe { .. } => "unsubscribe",
    }
}

fn server_type(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Welcome { .. } => "welcome",
        ServerFrame::Ack { .. } => "ack",
        ServerFrame::CatchUp { .. } => "catch_up",
        ServerFrame::UpToDate { .. } => "up_to_date",
        ServerFrame::Delta { .. } => "delta",
        ServerFrame::MustResync { .. } => "must_resync",
        ServerFrame::SnapshotPage { .. } => "snapshot_page",
        ServerFrame::AuthOk { .. } => "auth_ok",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Error { .. } => "error",
        ServerFrame::Subscribed { .. } => "subscribed",
        ServerFrame::SubRows { .. } => "sub_rows",
        ServerFrame::SubDelta { .. } => "sub_delta",
        ServerFrame::Presence { .. } => "presence",
        ServerFrame::PresenceDiff { .. } => "presence_diff",
        ServerFrame::Conflict { .. } => "conflict",
        ServerFrame::Unsubscribed { .. } => "unsubscribed",
        ServerFrame::Broadcast { .. } => "broadcast",
    }
}

/// Every ErrorCode; `error_code_index` is exhaustive so a new code fails to compile here.
const ALL_ERROR_CODES: [ErrorCode; 33] = [
    ErrorCode::MalformedFrame,
    ErrorCode::UnknownType,
    ErrorCode::UnsupportedVersion,
    ErrorCode::NotAuthenticated,
    ErrorCode::AlreadyAuthenticated,
    ErrorCode::InvalidToken,
    ErrorCode::TokenExpired,
    ErrorCode::Forbidden,
    ErrorCode::BatchTooLarge,
    ErrorCode::InvalidBatch,
    ErrorCode::UnknownTable,
    ErrorCode::UnknownColumn,
    ErrorCode::InvalidValue,
    ErrorCode::InvalidKey,
    ErrorCode::TenantMismatch,
    ErrorCode::SeqGap,
    ErrorCode::RowDeleted,
    ErrorCode::ValueTooLarge,
    ErrorCode::EpochMismatch,
    ErrorCode::PositionTooOld,
    ErrorCode::Busy,
    ErrorCode::Unavailable,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::TooManySubscriptions,
    ErrorCode::SnapshotTooLarge,
    ErrorCode::UnknownSubscription,
    ErrorCode::InvalidFilter,
    ErrorCode::NotFound,
    ErrorCode::ConflictNotOpen,
    ErrorCode::ChangeIdReused,
    ErrorCode::RateLimited,
    ErrorCode::StaleConflict,
];

fn error_code_index(c: ErrorCode) -> usize {
    use ErrorCode::*;
    match c {
        MalformedFrame => 0,
        UnknownType => 1,
        UnsupportedVersion => 2,
        NotAuthenticated => 3,
        AlreadyAuthenticated => 4,
        InvalidToken => 5,
        TokenExpired => 6,
        Forbidden => 7,
        BatchTooLarge => 8,
        InvalidBatch => 9,
        UnknownTable => 10,
        UnknownColumn => 11,
        InvalidValue => 12,
        InvalidKey => 13,
        TenantMismatch => 14,
        SeqGap => 15,
        RowDeleted => 16,
        ValueTooLarge => 17,
        EpochMismatch => 18,
        PositionTooOld => 19,
        Busy => 20,
        Unavailable => 21,
        ShuttingDown => 22,
        Internal => 23,
        TooManySubscriptions => 24,
        SnapshotTooLarge => 25,
        UnknownSubscription => 26,
        InvalidFilter => 27,
        NotFound => 28,
        ConflictNotOpen => 29,
        ChangeIdReused => 30,
        RateLimited => 31,
        StaleConflict => 32,
    }
}

fn all_close_codes() -> Vec<CloseCode> {
    (1000..=4999).filter_map(CloseCode::from_code).collect()
}

fn readme() -> String {
    fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("protocol/README.md")
}

// ---------------------------------------------------------------------------------------------
// Golden-vector tests.

#[test]
fn golden_vectors_match_stored_bytes() {
    let dir = testdata();
    if blessing() {
        fs::create_dir_all(&dir).unwrap();
    }
    let mut failures = Vec::new();
    for g in goldens() {
        let json = g.frame.encode(Encoding::Json);
        let msgpack = g.frame.encode(Encoding::MsgPack);
        if blessing() {
            fs::write(dir.join(format!("{}.json", g.name)), &json).unwrap();
            fs::write(dir.join(format!("{}.msgpack", g.name)), &msgpack).unwrap();
            continue;
        }
        let stored_json = read(g.name, "json");
        let stored_msgpack = read(g.name, "msgpack");
        if stored_json != json {
            failures.push(format!(
                "{}.json differs\n  stored:  {}\n  encoded: {}",
                g.name,
                String::from_utf8_lossy(&stored_json),
                String::from_utf8_lossy(&json)
            ));
        }
        if stored_msgpack != msgpack {
            failures.push(format!(
                "{}.msgpack differs\n  stored:  {}\n  encoded: {}",
                g.name,
                hex(&stored_msgpack),
                hex(&msgpack)
            ));
        }
        for (enc, bytes) in [(Encoding::Json, &stored_json), (Encoding::MsgPack, &stored_msgpack)] {
            match g.frame.decode_like(enc, bytes) {
                Ok(f) if f == g.frame => {}
                Ok(f) => failures.push(format!("{} ({enc:?}) decodes to a different frame: {f:?}", g.name)),
                Err(e) => failures.push(format!("{} ({enc:?}) does not decode: {e}", g.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden vectors out of date (if intended, re-run with SYNCHUB_BLESS_GOLDEN=1):\n{}",
        failures.join("\n")
    );
}

#[test]
fn json_and_msgpack_vectors_agree() {
    if blessing() {
        return;
    }
    for g in goldens() {
        let json = read(g.name, "json");
        let msgpack = read(g.name, "msgpack");
        // JSON -> frame -> MsgPack, and MsgPack -> frame -> JSON.
        let from_json = g.frame.decode_like(Encoding::Json, &json).unwrap();
        assert_eq!(from_json.encode(Encoding::MsgPack), msgpack, "{}: JSON -> MsgPack", g.name);
        let from_msgpack = g.frame.decode_like(Encoding::MsgPack, &msgpack).unwrap();
        assert_eq!(from_msgpack.encode(Encoding::Json), json, "{}: MsgPack -> JSON", g.name);
        assert_eq!(from_json, from_msgpack, "{}", g.name);
        // Same document, field for field: MsgPack carries named fields and string UUIDs.
        let json_value: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(msgpack_to_value(&msgpack), json_value, "{}: MsgPack and JSON documents differ", g.name);
    }
}

#[test]
fn msgpack_vectors_are_named_field_maps() {
    if blessing() {
        return;
    }
    for g in goldens() {
        let bytes = read(g.name, "msgpack");
        let first = bytes[0];
        assert!(
            (0x80..=0x8f).contains(&first) || first == 0xde,
            "{}.msgpack starts with 0x{first:02x}, not a fixmap/map16",
            g.name
        );
        // Top-level map: the first key is the tag, written as a string.
        let value = msgpack_to_value(&bytes);
        assert!(value.get("type").is_some_and(Value::is_string), "{}: no string `type` key", g.name);
    }
}

/// The expected frame type of a vector file: the longest known type that its name (after the
/// `client_` / `server_` prefix) equals or starts with followed by `_`.
fn type_from_name<'a>(rest: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().copied().filter(|t| rest == *t || rest.starts_with(&format!("{t}_"))).max_by_key(|t| t.len())
}

#[test]
fn every_vector_file_decodes_as_the_type_its_name_says() {
    if blessing() {
        return;
    }
    let known: BTreeSet<&str> = goldens().iter().map(|g| g.name).collect();
    let mut seen = 0;
    for entry in fs::read_dir(testdata()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let (stem, enc) = if let Some(stem) = file.strip_suffix(".json") {
            (stem, Encoding::Json)
        } else if let Some(stem) = file.strip_suffix(".msgpack") {
            (stem, Encoding::MsgPack)
        } else {
            continue;
        };
        assert!(known.contains(stem), "{file} has no vector in tests/golden.rs (stale file?)");
        let bytes = fs::read(&path).unwrap();
        if let Some(rest) = stem.strip_prefix("client_") {
            let want = type_from_name(rest, CLIENT_TYPES).unwrap_or_else(|| panic!("{file}: no client type in name"));
            let frame = codec::decode_client(enc, &bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(client_type(&frame), want, "{file}");
            assert!(
                matches!(codec::decode_server(enc, &bytes), Err(DecodeError::UnknownType(_))),
                "{file} must not decode as a server frame"
            );
        } else if let Some(rest) = stem.strip_prefix("server_") {
            let want = type_from_name(rest, SERVER_TYPES).unwrap_or_else(|| panic!("{file}: no server type in name"));
            let frame = codec::decode_server(enc, &bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(server_type(&frame), want, "{file}");
            assert!(
                matches!(codec::decode_client(enc, &bytes), Err(DecodeError::UnknownType(_))),
                "{file} must not decode as a client frame"
            );
        } else {
            panic!("{file}: name must start with client_ or server_");
        }
        seen += 1;
    }
    assert_eq!(seen, 2 * known.len(), "every vector has a .json and a .msgpack file");
}

#[test]
fn vectors_cover_every_variant_and_status() {
    let gs = goldens();
    let mut client = BTreeSet::new();
    let mut server = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    let mut ops = BTreeSet::new();
    for g in &gs {
        match &g.frame {
            Frame::Client(f) => {
                client.insert(client_type(f));
                assert!(g.name.starts_with("client_"), "{}", g.name);
                if let ClientFrame::Push { changes, .. } = f {
                    ops.extend(changes.iter().map(|c| format!("{:?}", c.op)));
                }
            }
            Frame::Server(f) => {
                server.insert(server_type(f));
                assert!(g.name.starts_with("server_"), "{}", g.name);
                if let ServerFrame::Ack { results, .. } = f {
                    statuses.extend(results.iter().map(|r| format!("{:?}", r.status)));
                }
            }
        }
    }
    assert_eq!(client, CLIENT_TYPES.iter().copied().collect());
    assert_eq!(server, SERVER_TYPES.iter().copied().collect());
    assert_eq!(ops, ["Delete", "Upsert"].map(String::from).into_iter().collect());
    // One ack carries every status.
    let all = gs
        .iter()
        .find(|g| g.name == "server_ack_all_statuses")
        .and_then(|g| match &g.frame {
            Frame::Server(ServerFrame::Ack { results, .. }) => Some(results.clone()),
            _ => None,
        })
        .unwrap();
    let got: BTreeSet<String> = all.iter().map(|r| format!("{:?}", r.status)).collect();
    let want: BTreeSet<String> = [
        ChangeStatus::Applied,
        ChangeStatus::Merged,
        ChangeStatus::Conflict,
        ChangeStatus::Rejected,
        ChangeStatus::Duplicate,
    ]
    .iter()
    .map(|s| {
        // Exhaustive: a new status fails to compile here until the ack vector shows it.
        match s {
            ChangeStatus::Applied
            | ChangeStatus::Merged
            | ChangeStatus::Conflict
            | ChangeStatus::Rejected
            | ChangeStatus::Duplicate => format!("{s:?}"),
        }
    })
    .collect();
    assert_eq!(got, want);
    // Type names used here are the tags the codec itself writes.
    for g in &gs {
        let v: Value = serde_json::from_slice(&g.frame.encode(Encoding::Json)).unwrap();
        let tag = v["type"].as_str().unwrap();
        let expected = match &g.frame {
            Frame::Client(f) => client_type(f),
            Frame::Server(f) => server_type(f),
        };
        assert_eq!(tag, expected, "{}", g.name);
    }
}

// ---------------------------------------------------------------------------------------------
// README consistency: its examples are the golden vectors, its tables list every code.

/// `<!-- golden: NAME -->` followed by a ```json block.
fn readme_examples(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- golden: ").and_then(|r| r.strip_suffix(" -->")) else {
            continue;
        };
        let fence = lines.by_ref().find(|l| !l.trim().is_empty()).unwrap_or_default();
        assert_eq!(fence.trim(), "```json", "README: example {name} must be a ```json block right after its marker");
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push((name.to_string(), body.join("\n")));
    }
    out
}

#[test]
fn readme_examples_are_the_golden_vectors() {
    let text = readme();
    let examples = readme_examples(&text);
    let gs = goldens();
    for (name, body) in &examples {
        let g = gs.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("README names unknown vector {name}"));
        let shown: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("README example {name}: {e}"));
        let golden: Value = serde_json::from_slice(&g.frame.encode(Encoding::Json)).unwrap();
        assert_eq!(shown, golden, "README example {name} differs from the golden vector");
        // And it decodes to the same frame.
        let frame = g.frame.decode_like(Encoding::Json, body.as_bytes()).unwrap();
        assert_eq!(frame, g.frame, "README example {name}");
    }
    let shown: BTreeSet<&str> = examples.iter().map(|(n, _)| n.as_str()).collect();
    for g in &gs {
        assert!(shown.contains(g.name), "README shows no example for vector {}", g.name);
    }
    // Transcript lines (`C→H` / `H→C` followed by compact JSON) must be golden bytes verbatim.
    let encoded: Vec<String> = gs.iter().map(|g| String::from_utf8(g.frame.encode(Encoding::Json)).unwrap()).collect();
    let mut transcript_lines = 0;
    for line in text.lines() {
        let Some(json) = line.strip_prefix("C→H ").or_else(|| line.strip_prefix("H→C ")) else { continue };
        assert!(encoded.iter().any(|e| e == json), "README transcript line is not a golden vector: {json}");
        transcript_lines += 1;
    }
    assert!(transcript_lines >= 7, "README transcript missing");
}

/// The lines of the README section under `heading`, up to the next heading of any level.
fn readme_section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "README has no `{heading}` section");
    lines.take_while(|l| !l.starts_with('#')).collect()
}

#[test]
fn readme_lists_every_error_code_and_close_code() {
    let text = readme();
    let errors = readme_section(&text, "### Error codes");
    let close = readme_section(&text, "### Close codes");
    for (i, code) in ALL_ERROR_CODES.iter().enumerate() {
        assert_eq!(error_code_index(*code), i);
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        let prefix = format!("| `{}` |", code.as_str());
        let row = errors
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("README error-code table lacks {}", code.as_str()));
        let temporary = row.split('|').nth(2).unwrap().trim();
        let want = if code.is_temporary() { "yes" } else { "no" };
        assert_eq!(temporary, want, "README: temporary column of {}", code.as_str());
    }
    let closes = all_close_codes();
    assert_eq!(closes.len(), 13);
    for c in closes {
        let prefix = format!("| {} |", c.code());
        assert!(close.iter().any(|l| l.starts_with(&prefix)), "README close-code table lacks {}", c.code());
    }
}

// ---------------------------------------------------------------------------------------------
// Property test: arbitrary changes survive both encodings, alone and inside a push frame.

fn arb_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Any finite float (JSON has no NaN/Infinity), read back exactly by both encodings.
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    arb_scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Object> {
    prop::collection::btree_map(any::<String>(), arb_value(), 0..6).prop_map(|m| m.into_iter().collect())
}

fn arb_change() -> impl Strategy<Value = Change> {
    (
        any::<u128>(),
        any::<u64>(),
        any::<String>(),
        prop_oneof![Just(Op::Upsert), Just(Op::Delete)],
        arb_object(),
        arb_object(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(id, device_seq, table, op, key, fields, wall_ms, counter, base_version)| Change {
            change_id: Uuid::from_u128(id),
            device_seq,
            table,
            op,
            key,
            fields,
            hlc: Hlc { wall_ms, counter },
            base_version,
        })
}

proptest! {
    // No failure persistence: the regressions file would land outside testdata/.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_changes_round_trip(change in arb_change(), id in any::<u64>(), batch in any::<u128>()) {
        // The bare Change.
        let json = codec::encode(Encoding::Json, &change);
        prop_assert_eq!(&serde_json::from_slice::<Change>(&json).unwrap(), &change);
        let msgpack = codec::encode(Encoding::MsgPack, &change);
        let mut de = rmp_serde::Deserializer::from_read_ref(&msgpack).with_human_readable();
        let back: Change = serde::Deserialize::deserialize(&mut de).unwrap();
        prop_assert_eq!(&back, &change);

        // Inside a push frame (internally tagged: decoded through serde's buffering).
        let frame = ClientFrame::Push { id, batch_id: Uuid::from_u128(batch), changes: vec![change] };
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = codec::encode(enc, &frame);
            prop_assert_eq!(&codec::decode_client(enc, &bytes).unwrap(), &frame);
        }
        // JSON -> frame -> MsgPack agrees with encoding the frame directly, and back.
        let via_json = codec::decode_client(Encoding::Json, &codec::encode(Encoding::Json, &frame)).unwrap();
        let mp = codec::encode(Encoding::MsgPack, &via_json);
        prop_assert_eq!(&mp, &codec::encode(Encoding::MsgPack, &frame));
        let via_mp = codec::decode_client(Encoding::MsgPack, &mp).unwrap();
        prop_assert_eq!(codec::encode(Encoding::Json, &via_mp), codec::encode(Encoding::Json, &frame));
    }
}

/// The JSON codec reads a double back to the same bits, as MessagePack carries it: serde_json
/// is built with `float_roundtrip` (without it this 17-digit double came back one ulp off, and
/// a frame's JSON and MessagePack encodings decoded to different values).
#[test]
fn json_floats_round_trip_exactly() {
    let x = 1.8331630503030794e163_f64;
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let back: f64 = codec::decode_value(encoding, &codec::encode(encoding, &x)).unwrap();
        assert_eq!(back.to_bits(), x.to_bits(), "{encoding:?}");
    }
}
