//! Property-driven protocol sessions against a live hub: random sequences of valid and invalid
//! frames (every client frame type, mutated frames, frames in the other encoding, raw junk; JSON
//! and MessagePack sessions), while a well-behaved device of the same tenant pushes alongside.
//! After each sequence:
//! - the hub still answers: every request got its one reply, a final `ping` gets its `pong`
//!   (`not_authenticated` before a welcome), unless the sequence earned a close, whose code must
//!   then be the one the sequence earned; and a fresh session connects and pushes;
//! - every reply decoded with the protocol crate in the session's encoding, answered a request
//!   that was sent (an `error` without id, a frame that did not decode), with a code the spec
//!   lists for that request; acks come in push order with one result per change, in order, whose
//!   statuses follow the device's cursor;
//! - no change is half-applied: the change log holds every committed change exactly once at its
//!   acked seq, and no rejected, refused or unanswered one;
//! - the other device had every change applied and received every committed change of the
//!   tenant, gap-free.
//!
//! CI runs a few sequences; more with `PROTOCOL_CASES=2000 cargo test --test protocol_sessions`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use protocol::{Change, ChangeStatus, Channel, ClientFrame, Condition, Encoding, ErrorCode, FilterOp, Hlc, Object, Op, Position, ServerFrame};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The fuzzed session's device, and the well-behaved one's.
const FUZZ_DEVICE: &str = "fuzz-a";
const STEADY_DEVICE: &str = "steady";
/// Limits of the hub under test: small enough that sequences reach them.
const MAX_BATCH_CHANGES: usize = 8;
const MAX_ERRORS_PER_MINUTE: u32 = 20;
const DEVICE_PUSH_BURST: u32 = 10;
const MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;
/// How long a request may go unanswered before the hub counts as stalled.
const REPLY_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// What a sequence is made of. Values the hub decides (epochs, seqs, the device's counter) are
// named here and resolved while the session runs, so that shrinking keeps their meaning.

#[derive(Debug, Clone)]
struct Sequence {
    encoding: Encoding,
    /// A token sent with the upgrade request (section 1), besides or instead of `hello.token`.
    upgrade: Option<TokenGen>,
    steady_encoding: Encoding,
    steady_batches: usize,
    steps: Vec<Step>,
}

#[derive(Debug, Clone)]
struct Step {
    frame: Gen,
    /// Read the reply before sending the next frame (otherwise frames are pipelined).
    wait: bool,
}

#[derive(Debug, Clone)]
enum Gen {
    Hello { token: TokenGen, device: DeviceGen, versions: Vec<u32>, position: PositionGen, dashboard: bool },
    Push { changes: Vec<ChangeGen>, seqs: SeqPlan, batch: BatchIdGen },
    Auth(TokenGen),
    Resume(PositionGen),
    Snapshot { table: TableGen, after: AfterGen, limit: Option<u32> },
    Subscribe { sub: SubName, target: SubTarget, filter: Vec<CondGen>, snapshot: bool },
    Unsubscribe(SubName),
    Ping,
    /// A frame with one value changed, removed or added, in the session's encoding.
    Mutated(Box<Gen>, Mutation),
    /// A frame in the other encoding than the session's.
    OtherEncoding(Box<Gen>),
    JunkText(JunkText),
    JunkBinary(JunkBinary),
}

#[derive(Debug, Clone, Copy)]
enum TokenGen {
    /// The fuzzed identity; `claim`: the token names the device.
    Good { claim: bool, manager: bool },
    OtherDevice,
    OtherUser,
    OtherTenant,
    WrongSecret,
    Expired,
    NulUser,
    Garbage,
    Empty,
}

#[derive(Debug, Clone, Copy)]
enum DeviceGen {
    None,
    Matching,
    Other,
    Reserved,
    Nul,
    Control,
    Long,
    Empty,
}

#[derive(Debug, Clone, Copy)]
enum PositionGen {
    None,
    Start,
    PastHead,
    OtherEpoch,
    NulEpoch,
}

#[derive(Debug, Clone, Copy)]
enum SeqPlan {
    /// After the highest device_seq sent so far.
    Next,
    /// From the hub's cursor as the acks told it (what a client does after `seq_gap`).
    FromCursor,
    /// Again from a few device_seqs back.
    Replay(u8),
    Gap(u8),
    Zero,
    Huge,
    PastI64,
    /// Not consecutive within the batch.
    Shuffled,
}

#[derive(Debug, Clone, Copy)]
enum BatchIdGen {
    Fresh,
    RepeatLast,
    Nil,
}

#[derive(Debug, Clone)]
struct ChangeGen {
    table: TableGen,
    delete: bool,
    key: KeyGen,
    fields: FieldsGen,
    change_id: ChangeIdGen,
    hlc: HlcGen,
    base: BaseGen,
}

#[derive(Debug, Clone, Copy)]
enum TableGen {
    Products,
    Customers,
    Orders,
    OrderLines,
    Unknown,
    Internal,
    Qualified,
    Empty,
    Nul,
    Upper,
}

#[derive(Debug, Clone, Copy)]
enum KeyGen {
    Pool(u8),
    Fresh,
    Missing,
    WrongType,
    NotUuid,
    Nul,
    ExtraColumn,
    TenantSame,
    TenantOther,
    Huge,
}

#[derive(Debug, Clone, Copy)]
enum FieldsGen {
    Valid,
    Partial,
    Empty,
    UnknownColumn,
    WrongType,
    Constraint,
    NulText,
    Null,
    FloatForInt,
    BigInt,
    Nested,
    TenantSame,
    TenantOther,
    KeyDiffers,
    /// A text value of this many bytes (below, at and above `max_field_bytes`).
    Huge(usize),
    WeirdName,
}

#[derive(Debug, Clone, Copy)]
enum ChangeIdGen {
    Fresh,
    Nil,
    /// One sent earlier in the session (the n-th, modulo), or fresh when none was.
    Earlier(u8),
    PreviousInBatch,
}

#[derive(Debug, Clone, Copy)]
enum HlcGen {
    Now,
    Zero,
    Max,
    Future,
}

#[derive(Debug, Clone, Copy)]
enum BaseGen {
    Zero,
    One,
    LastSeen,
    Max,
    PastI64,
}

#[derive(Debug, Clone, Copy)]
enum AfterGen {
    None,
    Pool(u8),
    WrongType,
    Nul,
    Empty,
    Extra,
}

#[derive(Debug, Clone, Copy)]
enum SubName {
    Named(u8),
    Empty,
    Long,
    Nul,
}

#[derive(Debug, Clone, Copy)]
enum SubTarget {
    Table(TableGen),
    Presence,
    Conflicts,
    Both,
    Neither,
}

#[derive(Debug, Clone, Copy)]
struct CondGen {
    column: ColumnGen,
    op: FilterOp,
    value: ValueGen,
}

#[derive(Debug, Clone, Copy)]
enum ColumnGen {
    Name,
    Price,
    Unknown,
    Nul,
    Empty,
}

#[derive(Debug, Clone, Copy)]
enum ValueGen {
    Number,
    Text,
    NulText,
    Array,
    Object,
    Null,
    Bool,
    Float,
}

#[derive(Debug, Clone, Copy)]
struct Mutation {
    /// Which value of the frame (modulo the number of values).
    at: u16,
    kind: MutationKind,
}

#[derive(Debug, Clone, Copy)]
enum MutationKind {
    Remove,
    Null,
    MinusOne,
    Float,
    Text,
    Bool,
    EmptyArray,
    EmptyObject,
    PastU64,
    AddUnknownField,
    TypeAsIndex,
}

#[derive(Debug, Clone)]
enum JunkText {
    Any(String),
    Template(u8),
}

#[derive(Debug, Clone)]
enum JunkBinary {
    Any(Vec<u8>),
    Template(u8),
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Json), Just(Encoding::MsgPack)]
}

fn token_gen() -> impl Strategy<Value = TokenGen> {
    prop_oneof![
        8 => (any::<bool>(), prop::bool::weighted(0.3)).prop_map(|(claim, manager)| TokenGen::Good { claim, manager }),
        1 => Just(TokenGen::OtherDevice),
        1 => Just(TokenGen::OtherUser),
        1 => Just(TokenGen::OtherTenant),
        1 => Just(TokenGen::WrongSecret),
        1 => Just(TokenGen::Expired),
        1 => Just(TokenGen::NulUser),
        1 => Just(TokenGen::Garbage),
        1 => Just(TokenGen::Empty),
    ]
}

fn device_gen() -> impl Strategy<Value = DeviceGen> {
    prop_oneof![
        6 => Just(DeviceGen::None),
        6 => Just(DeviceGen::Matching),
        1 => Just(DeviceGen::Other),
        1 => Just(DeviceGen::Reserved),
        1 => Just(DeviceGen::Nul),
        1 => Just(DeviceGen::Control),
        1 => Just(DeviceGen::Long),
        1 => Just(DeviceGen::Empty),
    ]
}

fn position_gen() -> impl Strategy<Value = PositionGen> {
    prop_oneof![
        6 => Just(PositionGen::None),
        2 => Just(PositionGen::Start),
        1 => Just(PositionGen::PastHead),
        1 => Just(PositionGen::OtherEpoch),
        1 => Just(PositionGen::NulEpoch),
    ]
}

fn versions() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![8 => Just(vec![1]), 1 => Just(vec![]), 1 => Just(vec![2]), 1 => Just(vec![0, 1, 2]), 1 => Just(vec![u32::MAX])]
}

fn hello() -> BoxedStrategy<Gen> {
    (token_gen(), device_gen(), versions(), position_gen(), prop::bool::weighted(0.15))
        .prop_map(|(token, device, versions, position, dashboard)| Gen::Hello { token, device, versions, position, dashboard }).boxed()
}

/// A hello that works, most of the time: most sequences should reach the welcomed session.
fn opening_hello() -> BoxedStrategy<Gen> {
    prop_oneof![
        6 => (any::<bool>(), prop::bool::weighted(0.3), position_gen(), prop::bool::weighted(0.1)).prop_map(|(claim, manager, position, dashboard)| Gen::Hello {
            token: TokenGen::Good { claim, manager },
            device: if claim { DeviceGen::None } else { DeviceGen::Matching },
            versions: vec![1],
            position,
            dashboard,
        }),
        1 => hello(),
    ].boxed()
}

fn table_gen() -> impl Strategy<Value = TableGen> {
    prop_oneof![
        8 => Just(TableGen::Products),
        3 => Just(TableGen::Customers),
        3 => Just(TableGen::Orders),
        3 => Just(TableGen::OrderLines),
        1 => Just(TableGen::Unknown),
        1 => Just(TableGen::Internal),
        1 => Just(TableGen::Qualified),
        1 => Just(TableGen::Empty),
        1 => Just(TableGen::Nul),
        1 => Just(TableGen::Upper),
    ]
}

fn key_gen() -> impl Strategy<Value = KeyGen> {
    prop_oneof![
        12 => (0u8..4).prop_map(KeyGen::Pool),
        4 => Just(KeyGen::Fresh),
        1 => Just(KeyGen::Missing),
        1 => Just(KeyGen::WrongType),
        1 => Just(KeyGen::NotUuid),
        1 => Just(KeyGen::Nul),
        1 => Just(KeyGen::ExtraColumn),
        1 => Just(KeyGen::TenantSame),
        1 => Just(KeyGen::TenantOther),
        1 => Just(KeyGen::Huge),
    ]
}

fn fields_gen() -> impl Strategy<Value = FieldsGen> {
    prop_oneof![
        24 => Just(FieldsGen::Valid),
        2 => Just(FieldsGen::Partial),
        1 => Just(FieldsGen::Empty),
        1 => Just(FieldsGen::UnknownColumn),
        1 => Just(FieldsGen::WrongType),
        1 => Just(FieldsGen::Constraint),
        1 => Just(FieldsGen::NulText),
        1 => Just(FieldsGen::Null),
        1 => Just(FieldsGen::FloatForInt),
        1 => Just(FieldsGen::BigInt),
        1 => Just(FieldsGen::Nested),
        1 => Just(FieldsGen::TenantSame),
        1 => Just(FieldsGen::TenantOther),
        1 => Just(FieldsGen::KeyDiffers),
        1 => prop_oneof![Just(60_000usize), Just(65_536), Just(70_000), Just(400_000)].prop_map(FieldsGen::Huge),
        1 => Just(FieldsGen::WeirdName),
    ]
}

fn change_gen() -> BoxedStrategy<ChangeGen> {
    let change_id = prop_oneof![
        12 => Just(ChangeIdGen::Fresh),
        1 => Just(ChangeIdGen::Nil),
        2 => any::<u8>().prop_map(ChangeIdGen::Earlier),
        1 => Just(ChangeIdGen::PreviousInBatch),
    ];
    let hlc = prop_oneof![40 => Just(HlcGen::Now), 2 => Just(HlcGen::Zero), 1 => Just(HlcGen::Max), 2 => Just(HlcGen::Future)];
    let base = prop_oneof![
        40 => Just(BaseGen::Zero),
        2 => Just(BaseGen::One),
        15 => Just(BaseGen::LastSeen),
        1 => Just(BaseGen::Max),
        1 => Just(BaseGen::PastI64),
    ];
    (table_gen(), prop::bool::weighted(0.15), key_gen(), fields_gen(), change_id, hlc, base)
        .prop_map(|(table, delete, key, fields, change_id, hlc, base)| ChangeGen { table, delete, key, fields, change_id, hlc, base }).boxed()
}

fn push() -> BoxedStrategy<Gen> {
    let seqs = prop_oneof![
        10 => Just(SeqPlan::Next),
        3 => Just(SeqPlan::FromCursor),
        2 => (1u8..4).prop_map(SeqPlan::Replay),
        1 => (2u8..5).prop_map(SeqPlan::Gap),
        1 => Just(SeqPlan::Zero),
        1 => Just(SeqPlan::Huge),
        1 => Just(SeqPlan::PastI64),
        1 => Just(SeqPlan::Shuffled),
    ];
    let batch = prop_oneof![8 => Just(BatchIdGen::Fresh), 1 => Just(BatchIdGen::RepeatLast), 1 => Just(BatchIdGen::Nil)];
    let changes = prop_oneof![1 => Just(0usize), 12 => 1usize..=4, 2 => 5usize..=MAX_BATCH_CHANGES + 2];
    (changes.prop_flat_map(|n| prop::collection::vec(change_gen(), n)), seqs, batch)
        .prop_map(|(changes, seqs, batch)| Gen::Push { changes, seqs, batch }).boxed()
}

fn after_gen() -> impl Strategy<Value = AfterGen> {
    prop_oneof![
        4 => Just(AfterGen::None),
        2 => (0u8..4).prop_map(AfterGen::Pool),
        1 => Just(AfterGen::WrongType),
        1 => Just(AfterGen::Nul),
        1 => Just(AfterGen::Empty),
        1 => Just(AfterGen::Extra),
    ]
}

fn sub_name() -> impl Strategy<Value = SubName> {
    prop_oneof![8 => (0u8..3).prop_map(SubName::Named), 1 => Just(SubName::Empty), 1 => Just(SubName::Long), 1 => Just(SubName::Nul)]
}

fn condition() -> BoxedStrategy<CondGen> {
    let column = prop_oneof![
        3 => Just(ColumnGen::Name),
        3 => Just(ColumnGen::Price),
        1 => Just(ColumnGen::Unknown),
        1 => Just(ColumnGen::Nul),
        1 => Just(ColumnGen::Empty),
    ];
    let op = prop::sample::select(FilterOp::NAMES.iter().map(|(_, op)| *op).collect::<Vec<_>>());
    let value = prop_oneof![
        Just(ValueGen::Number),
        Just(ValueGen::Text),
        Just(ValueGen::NulText),
        Just(ValueGen::Array),
        Just(ValueGen::Object),
        Just(ValueGen::Null),
        Just(ValueGen::Bool),
        Just(ValueGen::Float),
    ];
    (column, op, value).prop_map(|(column, op, value)| CondGen { column, op, value }).boxed()
}

fn subscribe() -> BoxedStrategy<Gen> {
    let target = prop_oneof![
        6 => table_gen().prop_map(SubTarget::Table),
        2 => Just(SubTarget::Presence),
        1 => Just(SubTarget::Conflicts),
        1 => Just(SubTarget::Both),
        1 => Just(SubTarget::Neither),
    ];
    (sub_name(), target, prop::collection::vec(condition(), 0..3), any::<bool>())
        .prop_map(|(sub, target, filter, snapshot)| Gen::Subscribe { sub, target, filter, snapshot }).boxed()
}

/// Every well-formed client frame type, good and bad within its type.
fn base_frame() -> BoxedStrategy<Gen> {
    let limit = prop_oneof![3 => Just(None), 1 => Just(Some(0u32)), 1 => Just(Some(1)), 1 => Just(Some(1000)), 1 => Just(Some(u32::MAX))];
    prop_oneof![
        2 => hello(),
        14 => push(),
        2 => token_gen().prop_map(Gen::Auth),
        2 => position_gen().prop_map(Gen::Resume),
        3 => (table_gen(), after_gen(), limit).prop_map(|(table, after, limit)| Gen::Snapshot { table, after, limit }),
        4 => subscribe(),
        2 => sub_name().prop_map(Gen::Unsubscribe),
        3 => Just(Gen::Ping),
    ].boxed()
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let kind = prop_oneof![
        Just(MutationKind::Remove),
        Just(MutationKind::Null),
        Just(MutationKind::MinusOne),
        Just(MutationKind::Float),
        Just(MutationKind::Text),
        Just(MutationKind::Bool),
        Just(MutationKind::EmptyArray),
        Just(MutationKind::EmptyObject),
        Just(MutationKind::PastU64),
        Just(MutationKind::AddUnknownField),
        Just(MutationKind::TypeAsIndex),
    ];
    (any::<u16>(), kind).prop_map(|(at, kind)| Mutation { at, kind })
}

fn frame() -> BoxedStrategy<Gen> {
    prop_oneof![
        20 => base_frame(),
        4 => (base_frame(), mutation()).prop_map(|(frame, mutation)| Gen::Mutated(Box::new(frame), mutation)),
        1 => base_frame().prop_map(|frame| Gen::OtherEncoding(Box::new(frame))),
        1 => prop_oneof![".{0,40}".prop_map(JunkText::Any), (0u8..JUNK_TEXT_TEMPLATES).prop_map(JunkText::Template)].prop_map(Gen::JunkText),
        1 => prop_oneof![prop::collection::vec(any::<u8>(), 0..48).prop_map(JunkBinary::Any), (0u8..JUNK_BINARY_TEMPLATES).prop_map(JunkBinary::Template)]
            .prop_map(Gen::JunkBinary),
    ].boxed()
}

fn step() -> BoxedStrategy<Step> {
    (frame(), any::<bool>()).prop_map(|(frame, wait)| Step { frame, wait }).boxed()
}

fn sequence() -> BoxedStrategy<Sequence> {
    let opening = prop_oneof![9 => opening_hello().prop_map(Some), 1 => Just(None)];
    let upgrade = prop_oneof![6 => Just(None), 1 => token_gen().prop_map(|t| Some(if let TokenGen::Empty = t { TokenGen::Garbage } else { t }))];
    (encoding(), upgrade, encoding(), 1usize..=4, opening, prop::collection::vec(step(), 0..30)).prop_map(|(encoding, upgrade, steady_encoding, steady_batches, opening, rest)| {
        let mut steps: Vec<Step> = opening.map(|frame| Step { frame, wait: true }).into_iter().collect();
        steps.extend(rest);
        Sequence { encoding, upgrade, steady_encoding, steady_batches, steps }
    }).boxed()
}

// ---------------------------------------------------------------------------------------------
// Turning generated steps into bytes.

const JUNK_TEXT_TEMPLATES: u8 = 14;
const JUNK_BINARY_TEMPLATES: u8 = 8;

fn junk_text(template: u8, id: u64) -> String {
    match template {
        0 => "{}".into(),
        1 => "[]".into(),
        2 => "null".into(),
        3 => format!(r#"{{"type":"teleport","id":{id}}}"#),
        4 => format!(r#"{{"type":5,"id":{id}}}"#),
        5 => format!(r#"{{"type":"ping","id":"{id}"}}"#),
        6 => r#"{"type":"ping","id":-1}"#.into(),
        7 => format!(r#"{{"type":"ping","id":{id}.5}}"#),
        8 => format!(r#"{{"type":"push","id":{id}}}"#),
        9 => "[".repeat(100_000),
        10 => format!(r#"{{"type":"ping","id":{id}}} trailing"#),
        11 => format!(r#"{{"id":{id},"type":"ping","type":"push"}}"#),
        12 => format!(r#"{{"type":"ping","id":{id},"id":{}}}"#, id + 1),
        _ => format!(r#"{{"type":"hello","id":{id},"versions":[1],"token":"{}"}}"#, "x".repeat(5000)),
    }
}

fn junk_binary(template: u8, id: u64) -> Vec<u8> {
    let msgpack = |value: &Value| protocol::codec::encode(Encoding::MsgPack, value);
    match template {
        0 => vec![0xc1],
        1 => {
            let mut deep = vec![0x91; 100_000];
            deep.push(0xc0);
            deep
        }
        // A map with an integer key, and an ext value.
        2 => vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g', 0x01, 0xd4, 0x01, 0x02],
        3 => msgpack(&json!(["ping", id])),
        4 => msgpack(&json!({"type": "ping", "id": id})).into_iter().take(5).collect(),
        // A map announcing more entries than it holds.
        5 => vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa4, b't', b'y', b'p', b'e'],
        // A string announcing 4 GiB.
        6 => vec![0x81, 0xa4, b't', b'y', b'p', b'e', 0xdb, 0xff, 0xff, 0xff, 0xff],
        _ => json!({"type": "ping", "id": id}).to_string().into_bytes(),
    }
}

/// Fixed row ids: every sequence runs in a fresh tenant, so they collide only within it.
fn pool_uuid(i: u8) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + i as u128)
}

fn table_name(table: TableGen) -> &'static str {
    match table {
        TableGen::Products => "products",
        TableGen::Customers => "customers",
        TableGen::Orders => "orders",
        TableGen::OrderLines => "order_lines",
        TableGen::Unknown => "nope",
        TableGen::Internal => "synchub.change_log",
        TableGen::Qualified => "public.products",
        TableGen::Empty => "",
        TableGen::Nul => "products\u{0}",
        TableGen::Upper => "PRODUCTS",
    }
}

fn obj(v: Value) -> Object {
    v.as_object().cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Running a sequence.

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    /// Order of sending, to tell which request a wait is for.
    serial: usize,
    id: Option<u64>,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Hello,
    Push { batch_id: Uuid, changes: Vec<Change> },
    Auth,
    Resume,
    Snapshot { table: String, limit: Option<u32> },
    Subscribe { sub: String },
    Unsubscribe { sub: String },
    Ping,
    /// A frame that does not decode: answered with an error.
    Bad,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Push { .. } => "push",
            Kind::Auth => "auth",
            Kind::Resume => "resume",
            Kind::Snapshot { .. } => "snapshot",
            Kind::Subscribe { .. } => "subscribe",
            Kind::Unsubscribe { .. } => "unsubscribe",
            Kind::Ping => "ping",
            Kind::Bad => "undecodable frame",
        }
    }

    /// The error codes the spec lists for this request (section 8, "used in").
    fn allowed_errors(&self) -> &'static [ErrorCode] {
        use ErrorCode::*;
        match self {
            Kind::Hello => &[UnsupportedVersion, InvalidToken, TokenExpired, Forbidden, AlreadyAuthenticated, RateLimited],
            Kind::Push { .. } => &[NotAuthenticated, Forbidden, BatchTooLarge, InvalidBatch, RateLimited],
            Kind::Auth => &[NotAuthenticated, InvalidToken, TokenExpired, Forbidden],
            Kind::Resume => &[NotAuthenticated, InvalidBatch],
            // invalid_key: an `after` the table's key columns refuse (tests/poison_input.rs).
            Kind::Snapshot { .. } => &[NotAuthenticated, UnknownTable, Forbidden, InvalidKey],
            Kind::Subscribe { .. } => {
                &[NotAuthenticated, InvalidBatch, UnknownTable, Forbidden, InvalidFilter, TooManySubscriptions, SnapshotTooLarge, RateLimited, UnknownSubscription]
            }
            Kind::Unsubscribe { .. } => &[NotAuthenticated, UnknownSubscription],
            Kind::Ping => &[NotAuthenticated],
            Kind::Bad => &[MalformedFrame, UnknownType],
        }
    }
}

/// The reasons a change may be rejected with (section 8, "used in: rejected").
const REJECTIONS: &[ErrorCode] = &[
    ErrorCode::UnknownTable,
    ErrorCode::UnknownColumn,
    ErrorCode::InvalidValue,
    ErrorCode::InvalidKey,
    ErrorCode::TenantMismatch,
    ErrorCode::SeqGap,
    ErrorCode::RowDeleted,
    ErrorCode::ValueTooLarge,
    ErrorCode::Forbidden,
    ErrorCode::ChangeIdReused,
];

#[derive(Debug)]
enum Outcome {
    Acked(Vec<protocol::ChangeResult>),
    Refused(ErrorCode),
}

#[derive(Debug)]
struct PushRecord {
    id: u64,
    changes: Vec<Change>,
    outcome: Option<Outcome>,
}

/// Who the fuzzed session is once welcomed.
#[derive(Debug, Clone)]
struct Welcomed {
    tenant: String,
    device: String,
    dashboard: bool,
    encoding: Encoding,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Read {
    Frame(Encoding, ServerFrame),
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped(String),
    Timeout,
}

async fn read(ws: &mut Ws, wait: Duration) -> Result<Read, String> {
    loop {
        let msg = match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Ok(Read::Timeout),
            Ok(None) => return Ok(Read::Dropped("stream ended".into())),
            Ok(Some(Err(e))) => return Ok(Read::Dropped(e.to_string())),
            Ok(Some(Ok(msg))) => msg,
        };
        let (encoding, bytes) = match &msg {
            Message::Text(text) => (Encoding::Json, text.as_bytes()),
            Message::Binary(bytes) => (Encoding::MsgPack, bytes.as_slice()),
            Message::Close(frame) => return Ok(Read::Closed(frame.as_ref().map_or(1005, |f| u16::from(f.code)))),
            _ => continue,
        };
        return match protocol::codec::decode_server(encoding, bytes) {
            Ok(frame) => Ok(Read::Frame(encoding, frame)),
            Err(e) => Err(format!("malformed reply ({encoding:?}): {e}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]))),
        };
    }
}

struct Fuzzer {
    ws: Ws,
    /// The token the upgrade request carried, which the hub accepted (empty for none).
    upgrade_token: String,
    tenant: String,
    other_tenant: String,
    /// The tenant's epoch, as the steady device's welcome told it.
    epoch: String,
    encoding: Encoding,
    next_id: u64,
    serial: usize,
    pending: Vec<Pending>,
    pushes: Vec<PushRecord>,
    /// The first hello that decoded, and its encoding: the session's.
    hello_encoding: Option<Encoding>,
    welcomed: Option<Welcomed>,
    /// The identity the last hello asked for, taken when its welcome comes.
    asked: Option<(String, bool)>,
    closed: Option<u16>,
    errors_received: usize,
    hello_refusal: Option<ErrorCode>,
    largest_sent: usize,
    /// The device's cursor as its acks tell it.
    cursor: u64,
    highest_sent: u64,
    last_seen_seq: u64,
    change_ids: Vec<Uuid>,
    last_batch_id: Option<Uuid>,
    subscriptions: HashSet<String>,
    pongs: HashSet<u64>,
    withdrawn_subscribes: usize,
    started: std::time::Instant,
    /// Where the fuzzed session's stream stands, when it is running.
    stream_at: Option<u64>,
    log: Vec<String>,
}

impl Fuzzer {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn token(&self, gen: TokenGen) -> String {
        mint_token(gen, &self.tenant, &self.other_tenant)
    }

    fn position(&self, gen: PositionGen) -> Option<Position> {
        match gen {
            PositionGen::None => None,
            PositionGen::Start => Some(Position { epoch: self.epoch.clone(), seq: 0 }),
            PositionGen::PastHead => Some(Position { epoch: self.epoch.clone(), seq: 1_000_000 }),
            PositionGen::OtherEpoch => Some(Position { epoch: "01JZZZZZZZZZZZZZZZZZZZZZZZ".into(), seq: 3 }),
            PositionGen::NulEpoch => Some(Position { epoch: "ep\u{0}och".into(), seq: u64::MAX }),
        }
    }

    fn key(&self, table: TableGen, gen: KeyGen) -> Object {
        let id = |uuid: Uuid| match table {
            TableGen::OrderLines => json!({"order_id": uuid, "line_no": 1}),
            _ => json!({"id": uuid}),
        };
        obj(match gen {
            KeyGen::Pool(i) => id(pool_uuid(i)),
            KeyGen::Fresh => id(Uuid::now_v7()),
            KeyGen::Missing => json!({}),
            KeyGen::WrongType => json!({"id": 17, "order_id": true, "line_no": "one"}),
            KeyGen::NotUuid => json!({"id": "not-a-uuid", "order_id": "x", "line_no": 1}),
            KeyGen::Nul => json!({"id": "0193\u{0}", "order_id": "\u{0}", "line_no": 1}),
            KeyGen::ExtraColumn => {
                let mut key = id(pool_uuid(0));
                key["name"] = json!("extra");
                key
            }
            KeyGen::TenantSame => {
                let mut key = id(pool_uuid(1));
                key["tenant_id"] = json!(self.tenant);
                key
            }
            KeyGen::TenantOther => {
                let mut key = id(pool_uuid(1));
                key["tenant_id"] = json!(self.other_tenant);
                key
            }
            KeyGen::Huge => json!({"id": "k".repeat(5000), "order_id": "k".repeat(5000), "line_no": 1}),
        })
    }

    fn fields(&self, table: TableGen, gen: FieldsGen) -> Object {
        let valid = match table {
            TableGen::Customers => json!({"name": "Ann", "email": "ann@example.com"}),
            TableGen::Orders => json!({"store_id": "store-7", "status": "open", "total_cents": 710}),
            TableGen::OrderLines => json!({"product_id": pool_uuid(0), "quantity": 1, "unit_price_cents": 420}),
            _ => json!({"sku": "SKU-1", "name": "Tea", "price_cents": 250}),
        };
        // A text column and an integer column of the table.
        let (text, int) = match table {
            TableGen::Customers => ("name", "loyalty_points"),
            TableGen::Orders => ("store_id", "total_cents"),
            TableGen::OrderLines => ("product_id", "quantity"),
            _ => ("name", "price_cents"),
        };
        let with = |column: &str, value: Value| {
            let mut fields = valid.clone();
            fields[column] = value;
            fields
        };
        obj(match gen {
            FieldsGen::Valid => valid.clone(),
            FieldsGen::Partial => json!({ int: 3 }),
            FieldsGen::Empty => json!({}),
            FieldsGen::UnknownColumn => with("colour", json!("red")),
            FieldsGen::WrongType => with(int, json!("abc")),
            FieldsGen::Constraint => match table {
                TableGen::Orders => with("status", json!("bogus")),
                TableGen::OrderLines => with("quantity", json!(0)),
                _ => with(int, json!(-1)),
            },
            FieldsGen::NulText => with(text, json!("a\u{0}b")),
            FieldsGen::Null => with(text, Value::Null),
            FieldsGen::FloatForInt => with(int, json!(1.5)),
            FieldsGen::BigInt => with(int, json!(1u64 << 40)),
            FieldsGen::Nested => with(text, json!({"a": [1, {"b": null}]})),
            FieldsGen::TenantSame => with("tenant_id", json!(self.tenant)),
            FieldsGen::TenantOther => with("tenant_id", json!(self.other_tenant)),
            FieldsGen::KeyDiffers => match table {
                TableGen::OrderLines => with("line_no", json!(99)),
                _ => with("id", json!(Uuid::now_v7())),
            },
            FieldsGen::Huge(bytes) => with(text, json!("h".repeat(bytes))),
            FieldsGen::WeirdName => with("name\"; drop table products; --", json!(1)),
        })
    }

    fn change(&self, gen: &ChangeGen, device_seq: u64, previous: Option<Uuid>) -> Change {
        let change_id = match gen.change_id {
            ChangeIdGen::Fresh => Uuid::now_v7(),
            ChangeIdGen::Nil => Uuid::nil(),
            ChangeIdGen::Earlier(n) if !self.change_ids.is_empty() => self.change_ids[n as usize % self.change_ids.len()],
            ChangeIdGen::Earlier(_) => Uuid::now_v7(),
            ChangeIdGen::PreviousInBatch => previous.unwrap_or_else(Uuid::now_v7),
        };
        let hlc = match gen.hlc {
            HlcGen::Now => Hlc { wall_ms: now_ms(), counter: 0 },
            HlcGen::Zero => Hlc { wall_ms: 0, counter: 0 },
            HlcGen::Max => Hlc { wall_ms: u64::MAX, counter: u32::MAX },
            HlcGen::Future => Hlc { wall_ms: now_ms() + 86_400_000, counter: 7 },
        };
        let base_version = match gen.base {
            BaseGen::Zero => 0,
            BaseGen::One => 1,
            BaseGen::LastSeen => self.last_seen_seq,
            BaseGen::Max => u64::MAX,
            BaseGen::PastI64 => i64::MAX as u64 + 1,
        };
        Change {
            change_id,
            device_seq,
            table: table_name(gen.table).into(),
            op: if gen.delete { Op::Delete } else { Op::Upsert },
            key: self.key(gen.table, gen.key),
            fields: if gen.delete { Object::new() } else { self.fields(gen.table, gen.fields) },
            hlc,
            base_version,
        }
    }

    fn sub_name(gen: SubName) -> String {
        match gen {
            SubName::Named(i) => format!("s{i}"),
            SubName::Empty => String::new(),
            SubName::Long => "s".repeat(65),
            SubName::Nul => "s\u{0}".into(),
        }
    }

    fn condition(gen: CondGen) -> Condition {
        let column = match gen.column {
            ColumnGen::Name => "name",
            ColumnGen::Price => "price_cents",
            ColumnGen::Unknown => "colour",
            ColumnGen::Nul => "na\u{0}me",
            ColumnGen::Empty => "",
        };
        let value = match gen.value {
            ValueGen::Number => json!(250),
            ValueGen::Text => json!("Tea"),
            ValueGen::NulText => json!("T\u{0}ea"),
            ValueGen::Array => json!([250, "Tea", null]),
            ValueGen::Object => json!({"a": 1}),
            ValueGen::Null => Value::Null,
            ValueGen::Bool => json!(true),
            ValueGen::Float => json!(2.5e300),
        };
        Condition { column: column.into(), op: gen.op, value }
    }

    /// The frame a generated step stands for (`None` for raw junk).
    fn client_frame(&mut self, gen: &Gen) -> Option<ClientFrame> {
        let id = self.id();
        Some(match gen {
            Gen::Hello { token, device, versions, position, dashboard } => {
                let device_id = match device {
                    DeviceGen::None => None,
                    DeviceGen::Matching => Some(FUZZ_DEVICE.to_string()),
                    DeviceGen::Other => Some("fuzz-b".to_string()),
                    DeviceGen::Reserved => Some("console:fuzz".to_string()),
                    DeviceGen::Nul => Some("fuzz\u{0}a".to_string()),
                    DeviceGen::Control => Some("fuzz\na".to_string()),
                    DeviceGen::Long => Some("f".repeat(300)),
                    DeviceGen::Empty => Some(String::new()),
                };
                let mode = if *dashboard { protocol::SessionMode::Dashboard } else { protocol::SessionMode::Device };
                ClientFrame::Hello { id, versions: versions.clone(), token: self.token(*token), device_id, position: self.position(*position), mode }
            }
            Gen::Push { changes, seqs, batch } => {
                let start = match seqs {
                    SeqPlan::Next => self.highest_sent + 1,
                    SeqPlan::FromCursor => self.cursor + 1,
                    SeqPlan::Replay(back) => (self.highest_sent + 1).saturating_sub(*back as u64).max(1),
                    SeqPlan::Gap(k) => self.highest_sent + *k as u64,
                    SeqPlan::Zero => 0,
                    SeqPlan::Huge => u64::MAX - changes.len() as u64,
                    SeqPlan::PastI64 => i64::MAX as u64 + 1,
                    SeqPlan::Shuffled => self.highest_sent + 1,
                };
                let mut built: Vec<Change> = Vec::new();
                for (i, change) in changes.iter().enumerate() {
                    let mut device_seq = start.saturating_add(i as u64);
                    if matches!(seqs, SeqPlan::Shuffled) && i == 1 {
                        device_seq += 1;
                    }
                    let previous = built.last().map(|c| c.change_id);
                    built.push(self.change(change, device_seq, previous));
                }
                let batch_id = match batch {
                    BatchIdGen::Fresh => Uuid::now_v7(),
                    BatchIdGen::RepeatLast => self.last_batch_id.unwrap_or_else(Uuid::now_v7),
                    BatchIdGen::Nil => Uuid::nil(),
                };
                ClientFrame::Push { id, batch_id, changes: built }
            }
            Gen::Auth(token) => ClientFrame::Auth { id, token: self.token(*token) },
            Gen::Resume(position) => {
                ClientFrame::Resume { id, position: self.position(*position).unwrap_or(Position { epoch: self.epoch.clone(), seq: 0 }) }
            }
            Gen::Snapshot { table, after, limit } => {
                let after = match after {
                    AfterGen::None => None,
                    AfterGen::Pool(i) => Some(obj(json!({"id": pool_uuid(*i)}))),
                    AfterGen::WrongType => Some(obj(json!({"id": [1, 2]}))),
                    AfterGen::Nul => Some(obj(json!({"id": "\u{0}"}))),
                    AfterGen::Empty => Some(Object::new()),
                    AfterGen::Extra => Some(obj(json!({"id": pool_uuid(0), "colour": "red"}))),
                };
                ClientFrame::Snapshot { id, table: table_name(*table).into(), after, limit: *limit }
            }
            Gen::Subscribe { sub, target, filter, snapshot } => {
                let (table, channel) = match target {
                    SubTarget::Table(t) => (Some(table_name(*t).to_string()), None),
                    SubTarget::Presence => (None, Some(Channel::Presence)),
                    SubTarget::Conflicts => (None, Some(Channel::Conflicts)),
                    SubTarget::Both => (Some("products".to_string()), Some(Channel::Presence)),
                    SubTarget::Neither => (None, None),
                };
                let filter = filter.iter().map(|c| Self::condition(*c)).collect();
                ClientFrame::Subscribe { id, sub: Self::sub_name(*sub), table, filter, snapshot: *snapshot, channel }
            }
            Gen::Unsubscribe(sub) => ClientFrame::Unsubscribe { id, sub: Self::sub_name(*sub) },
            Gen::Ping => ClientFrame::Ping { id },
            Gen::Mutated(..) | Gen::OtherEncoding(_) | Gen::JunkText(_) | Gen::JunkBinary(_) => return None,
        })
    }

    fn session_encoding(&self) -> Encoding {
        self.hello_encoding.unwrap_or(self.encoding)
    }

    fn message(encoding: Encoding, bytes: Vec<u8>) -> Message {
        match encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("JSON frames are UTF-8")),
            Encoding::MsgPack => Message::Binary(bytes),
        }
    }

    /// The message a step sends.
    fn build(&mut self, gen: &Gen) -> Message {
        let encoding = self.session_encoding();
        match gen {
            Gen::Mutated(inner, mutation) => {
                let frame = self.client_frame(inner).expect("base frames are frames");
                let mut value = serde_json::to_value(&frame).expect("frames are JSON values");
                mutate(&mut value, *mutation);
                Self::message(encoding, protocol::codec::encode(encoding, &value))
            }
            Gen::OtherEncoding(inner) => {
                let frame = self.client_frame(inner).expect("base frames are frames");
                let other = if encoding == Encoding::Json { Encoding::MsgPack } else { Encoding::Json };
                Self::message(other, protocol::codec::encode_client(other, &frame))
            }
            Gen::JunkText(JunkText::Any(text)) => Message::Text(text.clone()),
            Gen::JunkText(JunkText::Template(t)) => {
                let id = self.id();
                // Template 12 also names the id after this one.
                self.next_id += 1;
                Message::Text(junk_text(*t, id))
            }
            Gen::JunkBinary(JunkBinary::Any(bytes)) => Message::Binary(bytes.clone()),
            Gen::JunkBinary(JunkBinary::Template(t)) => {
                let id = self.id();
                Message::Binary(junk_binary(*t, id))
            }
            _ => {
                let frame = self.client_frame(gen).expect("base frames are frames");
                Self::message(encoding, protocol::codec::encode_client(encoding, &frame))
            }
        }
    }

    /// Send a message and note what the hub will make of it, by the protocol crate's decoder.
    /// Returns the serial of the request it is, or `None` when the socket is gone.
    async fn send(&mut self, msg: Message) -> Option<usize> {
        let (encoding, bytes): (Encoding, Vec<u8>) = match &msg {
            Message::Text(text) => (Encoding::Json, text.as_bytes().to_vec()),
            Message::Binary(bytes) => (Encoding::MsgPack, bytes.clone()),
            _ => unreachable!("only data messages are sent"),
        };
        self.largest_sent = self.largest_sent.max(bytes.len());
        let (id, kind) = match protocol::codec::decode_client(encoding, &bytes) {
            Err(_) => (protocol::codec::peek_request_id(encoding, &bytes), Kind::Bad),
            Ok(frame) => {
                let id = Some(frame.request_id());
                let kind = match frame {
                    ClientFrame::Hello { mode, token, .. } => {
                        if self.hello_encoding.is_none() {
                            self.hello_encoding = Some(encoding);
                        }
                        if self.asked.is_none() {
                            // hello.token, when not empty, replaces the upgrade's.
                            let claims = decode_claims(if token.is_empty() { &self.upgrade_token } else { &token });
                            let tenant = claims.get("tenant_id").and_then(Value::as_str).unwrap_or_default().to_string();
                            self.asked = Some((tenant, mode == protocol::SessionMode::Dashboard));
                        }
                        Kind::Hello
                    }
                    ClientFrame::Push { batch_id, changes, .. } => {
                        self.last_batch_id = Some(batch_id);
                        for change in &changes {
                            self.highest_sent = self.highest_sent.max(change.device_seq.min(1 << 40));
                            self.change_ids.push(change.change_id);
                        }
                        self.pushes.push(PushRecord { id: id.unwrap_or_default(), changes: changes.clone(), outcome: None });
                        Kind::Push { batch_id, changes }
                    }
                    ClientFrame::Auth { .. } => Kind::Auth,
                    ClientFrame::Resume { .. } => Kind::Resume,
                    ClientFrame::Snapshot { table, limit, .. } => Kind::Snapshot { table, limit },
                    ClientFrame::Subscribe { sub, .. } => Kind::Subscribe { sub },
                    ClientFrame::Unsubscribe { sub, .. } => Kind::Unsubscribe { sub },
                    ClientFrame::Ping { .. } => Kind::Ping,
                };
                (id, kind)
            }
        };
        let summary = match &kind {
            Kind::Push { changes, .. } => format!("push {id:?} ({} changes, device_seqs {:?})", changes.len(), changes.iter().map(|c| c.device_seq).collect::<Vec<_>>()),
            Kind::Bad => format!("undecodable {encoding:?} frame, id {id:?}"),
            other => format!("{} {id:?}", other.name()),
        };
        self.log.push(format!("sent {summary}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(700)])));
        if self.ws.send(msg).await.is_err() {
            self.log.push("(the socket refused the send)".into());
            return None;
        }
        self.serial += 1;
        let serial = self.serial;
        self.pending.push(Pending { serial, id, kind });
        Some(serial)
    }

    fn answered(&self, serial: usize) -> bool {
        !self.pending.iter().any(|p| p.serial == serial)
    }

    /// Take the oldest pending request with this id for which `fits` holds.
    fn take(&mut self, id: Option<u64>, what: &str, fits: impl Fn(&Kind) -> bool) -> Result<Pending, String> {
        match self.pending.iter().position(|p| p.id == id && fits(&p.kind)) {
            Some(i) => Ok(self.pending.remove(i)),
            None => Err(format!("{what} answers id {id:?}, which no pending request has")),
        }
    }

    /// Read frames until `done` holds, the socket closes, or `wait` passes.
    async fn pump(&mut self, wait: Duration, done: impl Fn(&Fuzzer) -> bool) -> Result<bool, String> {
        let deadline = tokio::time::Instant::now() + wait;
        while !done(self) && self.closed.is_none() {
            // With no time left this still takes what has already arrived.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match read(&mut self.ws, left).await? {
                Read::Timeout => return Ok(false),
                Read::Closed(code) => {
                    self.log.push(format!("closed {code}"));
                    self.closed = Some(code);
                }
                Read::Dropped(why) => return Err(format!("the hub dropped the connection without a close frame: {why}")),
                Read::Frame(encoding, frame) => self.on_frame(encoding, frame)?,
            }
        }
        Ok(true)
    }

    fn on_frame(&mut self, encoding: Encoding, frame: ServerFrame) -> Result<(), String> {
        let brief = format!("{frame:?}");
        self.log.push(format!("got {}", &brief[..brief.len().min(200)]));
        if let Some(w) = &self.welcomed {
            if encoding != w.encoding {
                return Err(format!("a {encoding:?} frame in a {:?} session: {brief}", w.encoding));
            }
        }
        let welcomed = |s: &Fuzzer| s.welcomed.clone().ok_or_else(|| format!("before welcome: {brief}"));
        match frame {
            ServerFrame::Welcome { id, device_id, limits, .. } => {
                self.take(Some(id), "welcome", |k| matches!(k, Kind::Hello))?;
                let (tenant, dashboard) = self.asked.clone().unwrap_or_default();
                if dashboard != device_id.starts_with("dashboard:") || device_id.starts_with("console:") {
                    return Err(format!("welcome names device {device_id:?} for a dashboard: {dashboard}"));
                }
                let expected = protocol::Limits {
                    max_frame_bytes: MAX_FRAME_BYTES as u64,
                    max_batch_changes: MAX_BATCH_CHANGES as u32,
                    catch_up_page_changes: limits.catch_up_page_changes,
                    snapshot_page_rows: limits.snapshot_page_rows,
                    // The hub's default, announced so that a client knows how far it may pipeline.
                    session_pushes_in_flight: 64,
                };
                if limits != expected {
                    return Err(format!("welcome limits {limits:?}"));
                }
                self.welcomed = Some(Welcomed { tenant, device: device_id, dashboard, encoding });
            }
            ServerFrame::Ack { id, batch_id, results } => {
                let w = welcomed(self)?;
                let pending = self.take(Some(id), "ack", |k| matches!(k, Kind::Push { .. }))?;
                if let Some(earlier) = self.pending.iter().find(|p| matches!(p.kind, Kind::Push { .. }) && p.serial < pending.serial) {
                    return Err(format!("ack of push {id} came before push {:?} sent earlier was answered", earlier.id));
                }
                let Kind::Push { batch_id: sent_batch, changes } = pending.kind else { unreachable!() };
                if batch_id != sent_batch || results.len() != changes.len() {
                    return Err(format!("ack of push {id}: batch {batch_id} with {} results for batch {sent_batch} of {} changes", results.len(), changes.len()));
                }
                if w.dashboard {
                    return Err("a dashboard's push was acked".into());
                }
                for (result, change) in results.iter().zip(&changes) {
                    self.check_result(id, result, change)?;
                }
                if let Some(record) = self.pushes.iter_mut().find(|p| p.id == id && p.outcome.is_none()) {
                    record.outcome = Some(Outcome::Acked(results));
                }
            }
            ServerFrame::Error { id, code, temporary, retry_after_ms, message } => {
                self.errors_received += 1;
                if temporary != code.is_temporary() || (code == ErrorCode::RateLimited) != retry_after_ms.is_some() {
                    return Err(format!("error {code:?} with temporary {temporary}, retry_after_ms {retry_after_ms:?}"));
                }
                let pending = self.take(id, &format!("error {code:?} ({message})"), |_| true)?;
                if !pending.kind.allowed_errors().contains(&code) {
                    return Err(format!("error {code:?} ({message}) answers a {}, which the spec does not list", pending.kind.name()));
                }
                match pending.kind {
                    Kind::Hello if self.welcomed.is_none() && code != ErrorCode::AlreadyAuthenticated => self.hello_refusal = Some(code),
                    // A batch refused before it reaches the tenant is answered at once, ahead
                    // of acks still owed for earlier pushes.
                    Kind::Push { .. } => {
                        if let Some(record) = self.pushes.iter_mut().find(|p| Some(p.id) == id && p.outcome.is_none()) {
                            record.outcome = Some(Outcome::Refused(code));
                        }
                    }
                    _ => {}
                }
            }
            ServerFrame::Pong { id } => {
                self.take(Some(id), "pong", |k| matches!(k, Kind::Ping))?;
                self.pongs.insert(id);
                welcomed(self)?;
            }
            ServerFrame::AuthOk { id, .. } => {
                self.take(Some(id), "auth_ok", |k| matches!(k, Kind::Auth))?;
                welcomed(self)?;
            }
            ServerFrame::SnapshotPage { id, table, rows, .. } => {
                let pending = self.take(Some(id), "snapshot_page", |k| matches!(k, Kind::Snapshot { .. }))?;
                let Kind::Snapshot { table: asked, limit } = pending.kind else { unreachable!() };
                if table != asked || limit.is_some_and(|l| l > 0 && rows.len() > l as usize) {
                    return Err(format!("snapshot_page of {table:?} with {} rows for {asked:?} limit {limit:?}", rows.len()));
                }
            }
            ServerFrame::Subscribed { id, sub, .. } => {
                let pending = self.take(Some(id), "subscribed", |k| matches!(k, Kind::Subscribe { .. }))?;
                if !matches!(&pending.kind, Kind::Subscribe { sub: asked } if *asked == sub) || !self.subscriptions.insert(sub.clone()) {
                    return Err(format!("subscribed {sub:?} for {:?}", pending.kind));
                }
            }
            ServerFrame::Unsubscribed { id, sub } => {
                let pending = self.take(Some(id), "unsubscribed", |k| matches!(k, Kind::Unsubscribe { .. }))?;
                if !matches!(&pending.kind, Kind::Unsubscribe { sub: asked } if *asked == sub) {
                    return Err(format!("unsubscribed {sub:?} for {:?}", pending.kind));
                }
                if !self.subscriptions.remove(&sub) {
                    // A table subscription ended before its `subscribed`: its subscribe is
                    // answered `unknown_subscription` (protocol 13.1), and nothing else comes
                    // for it.
                    let waiting = |p: &Pending| matches!(&p.kind, Kind::Subscribe { sub: asked } if *asked == sub);
                    if !self.pending.iter().any(waiting) {
                        return Err(format!("unsubscribed {sub:?}, which was never subscribed"));
                    }
                    self.withdrawn_subscribes += 1;
                }
            }
            ServerFrame::SubRows { ref sub, .. }
            | ServerFrame::SubDelta { ref sub, .. }
            | ServerFrame::Presence { ref sub, .. }
            | ServerFrame::PresenceDiff { ref sub, .. }
            | ServerFrame::Conflict { ref sub, .. } => {
                if !self.subscriptions.contains(sub) {
                    return Err(format!("a frame for subscription {sub:?}, which is not in force: {brief}"));
                }
            }
            ServerFrame::CatchUp { deltas, seq, .. } | ServerFrame::Delta { deltas, seq } => {
                self.stream(&brief, &deltas, seq)?;
            }
            ServerFrame::UpToDate { seq } => self.stream(&brief, &[], seq)?,
            ServerFrame::MustResync { reason, .. } => {
                let w = welcomed(self)?;
                if w.dashboard || !matches!(reason, ErrorCode::EpochMismatch | ErrorCode::PositionTooOld) {
                    return Err(format!("must_resync {reason:?} (dashboard: {})", w.dashboard));
                }
                self.stream_at = None;
            }
            ServerFrame::Broadcast { .. } => {
                welcomed(self)?;
            }
        }
        Ok(())
    }

    /// The fuzzed session's own stream is gap-free too: each frame covers the seqs after the
    /// previous one's, its deltas in order within them.
    fn stream(&mut self, brief: &str, deltas: &[protocol::Delta], seq: u64) -> Result<(), String> {
        let w = self.welcomed.clone().ok_or_else(|| format!("before welcome: {brief}"))?;
        if w.dashboard {
            return Err(format!("a stream frame to a dashboard: {brief}"));
        }
        let mut after = self.stream_at.unwrap_or(0);
        let start = after;
        for delta in deltas {
            if delta.seq <= after || delta.seq > seq {
                return Err(format!("stream out of order after seq {start}: {brief}"));
            }
            after = delta.seq;
        }
        if seq < start && self.stream_at.is_some() {
            return Err(format!("stream went back from {start}: {brief}"));
        }
        self.stream_at = Some(seq);
        Ok(())
    }

    /// One result of an ack, against the device's cursor (section 3).
    fn check_result(&mut self, id: u64, result: &protocol::ChangeResult, change: &Change) -> Result<(), String> {
        let fail = |why: &str| Err(format!("push {id}, device_seq {}: {why}: {result:?}", change.device_seq));
        if result.change_id != change.change_id || result.device_seq != change.device_seq {
            return fail("result for another change");
        }
        let ds = change.device_seq;
        use ChangeStatus::*;
        if ds <= self.cursor {
            if result.status != Duplicate {
                return fail(&format!("at or below the cursor {}, not a duplicate", self.cursor));
            }
        } else if ds == self.cursor + 1 {
            if result.status == Duplicate || result.reason == Some(ErrorCode::SeqGap) {
                return fail(&format!("right after the cursor {}", self.cursor));
            }
            self.cursor = ds;
        } else if (result.status, result.reason) != (Rejected, Some(ErrorCode::SeqGap)) {
            return fail(&format!("past the cursor {} + 1, not seq_gap", self.cursor));
        }
        match result.status {
            // A change that writes nothing takes no seq: a delete of a row that does not exist,
            // an upsert of no fields to a row that does.
            Applied | Merged if result.seq.is_none() && change.op == Op::Upsert && !change.fields.is_empty() => {
                return fail("committed without a seq")
            }
            Merged if result.row.is_none() => return fail("merged without the row"),
            Rejected if !result.reason.is_some_and(|r| REJECTIONS.contains(&r)) || result.message.is_none() => {
                return fail("rejected without a listed reason and a message")
            }
            Applied | Merged | Conflict | Duplicate if result.reason.is_some() => return fail("a reason on a result that is not rejected"),
            _ => {}
        }
        if let Some(seq) = result.seq {
            if result.status != Duplicate {
                self.last_seen_seq = self.last_seen_seq.max(seq);
            }
        }
        Ok(())
    }

    /// What the sequence got to, for the progress lines.
    fn summary(&self) -> String {
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        for push in &self.pushes {
            let key = match &push.outcome {
                Some(Outcome::Acked(results)) => results.iter().map(|r| format!("{:?}{}", r.status, r.reason.map(|c| format!("({})", c.as_str())).unwrap_or_default())).collect(),
                Some(Outcome::Refused(code)) => vec![format!("refused({})", code.as_str())],
                None => vec!["unanswered".to_string()],
            };
            for k in key {
                *statuses.entry(k).or_default() += 1;
            }
        }
        let session = match &self.welcomed {
            Some(w) if w.dashboard => "dashboard",
            Some(_) => "device",
            None => "never welcomed",
        };
        let dropped = match self.withdrawn_subscribes {
            0 => String::new(),
            n => format!(", {n} subscribe(s) unsubscribed before their answer"),
        };
        format!("{session}, {} errors, closed {:?}, changes {statuses:?}{dropped}", self.errors_received, self.closed)
    }

    /// Whether the way the socket closed is one the sequence earned (section 8, close codes).
    fn close_is_earned(&self, code: u16) -> bool {
        match code {
            4001 => matches!(self.hello_refusal, Some(ErrorCode::InvalidToken | ErrorCode::TokenExpired | ErrorCode::Forbidden)),
            4003 => self.hello_refusal == Some(ErrorCode::UnsupportedVersion),
            4029 => self.hello_refusal == Some(ErrorCode::RateLimited),
            4009 => self.errors_received > MAX_ERRORS_PER_MINUTE as usize,
            1009 => self.largest_sent > MAX_FRAME_BYTES,
            // The hello timeout (10 s by default) runs from the socket's opening, a little
            // before `started`.
            4000 => self.welcomed.is_none() && self.started.elapsed() >= Duration::from_secs(9),
            _ => false,
        }
    }
}

/// A token of the fuzzed identity, or one a hub must refuse (or refuse to let it replace).
fn mint_token(gen: TokenGen, tenant: &str, other_tenant: &str) -> String {
    let now = synchub::auth::unix_now();
    let mint = |secret: &str, tenant: &str, user: &str, device: Option<&str>, exp: u64, role: &str| {
        let mut claims = json!({"sub": user, "role": role, "tenant_id": tenant, "exp": exp});
        if let Some(d) = device {
            claims["device_id"] = json!(d);
        }
        synchub::auth::mint_hs256(secret, &claims)
    };
    match gen {
        TokenGen::Good { claim, manager } => {
            mint(SECRET, tenant, "user-fuzz", claim.then_some(FUZZ_DEVICE), now + 3600, if manager { "Manager" } else { "Employee" })
        }
        TokenGen::OtherDevice => mint(SECRET, tenant, "user-fuzz", Some("fuzz-z"), now + 3600, "Employee"),
        TokenGen::OtherUser => mint(SECRET, tenant, "user-other", Some(FUZZ_DEVICE), now + 3600, "Employee"),
        TokenGen::OtherTenant => mint(SECRET, other_tenant, "user-fuzz", Some(FUZZ_DEVICE), now + 3600, "Employee"),
        TokenGen::WrongSecret => mint("not-the-secret", tenant, "user-fuzz", Some(FUZZ_DEVICE), now + 3600, "Employee"),
        TokenGen::Expired => mint(SECRET, tenant, "user-fuzz", Some(FUZZ_DEVICE), now - 3600, "Employee"),
        TokenGen::NulUser => mint(SECRET, tenant, "user\u{0}fuzz", Some(FUZZ_DEVICE), now + 3600, "Employee"),
        TokenGen::Garbage => "abc.def.ghi".into(),
        TokenGen::Empty => String::new(),
    }
}

/// The claims of a token, unverified (to know which tenant a hello asked for).
fn decode_claims(token: &str) -> Value {
    use base64_free::decode_url_safe;
    token.split('.').nth(1).and_then(decode_url_safe).and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or(Value::Null)
}

/// Base64url without padding, enough to read a JWT's payload in a test.
mod base64_free {
    pub fn decode_url_safe(text: &str) -> Option<Vec<u8>> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'-' => Some(62),
            b'_' => Some(63),
            _ => None,
        };
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in text.bytes().filter(|c| *c != b'=') {
            acc = (acc << 6) | value(c)? as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Some(out)
    }
}

/// Apply a mutation to one value of a frame (or add a field to one of its objects).
fn mutate(frame: &mut Value, mutation: Mutation) {
    if let MutationKind::TypeAsIndex = mutation.kind {
        frame["type"] = json!(mutation.at % 8);
        return;
    }
    // Every (container path, key) of the frame, depth first.
    fn paths(value: &Value, at: &mut Vec<Vec<PathStep>>, prefix: &mut Vec<PathStep>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    prefix.push(PathStep::Key(key.clone()));
                    at.push(prefix.clone());
                    paths(child, at, prefix);
                    prefix.pop();
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    prefix.push(PathStep::Index(i));
                    at.push(prefix.clone());
                    paths(child, at, prefix);
                    prefix.pop();
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    paths(frame, &mut all, &mut Vec::new());
    if all.is_empty() {
        return;
    }
    let path = &all[mutation.at as usize % all.len()];
    let (last, parents) = path.split_last().expect("paths are not empty");
    let mut parent = &mut *frame;
    for step in parents {
        parent = match step {
            PathStep::Key(k) => &mut parent[k.as_str()],
            PathStep::Index(i) => &mut parent[*i],
        };
    }
    let replacement = match mutation.kind {
        MutationKind::Null => Value::Null,
        MutationKind::MinusOne => json!(-1),
        MutationKind::Float => json!(0.5),
        MutationKind::Text => json!("x"),
        MutationKind::Bool => json!(false),
        MutationKind::EmptyArray => json!([]),
        MutationKind::EmptyObject => json!({}),
        MutationKind::PastU64 => json!(18446744073709551616.0),
        MutationKind::Remove | MutationKind::AddUnknownField | MutationKind::TypeAsIndex => Value::Null,
    };
    match (last, mutation.kind) {
        (_, MutationKind::AddUnknownField) => {
            if let Some(map) = parent.as_object_mut() {
                map.insert("zz_future".into(), json!({"added": [1, 2]}));
            }
        }
        (PathStep::Key(k), MutationKind::Remove) => {
            if let Some(map) = parent.as_object_mut() {
                map.remove(k);
            }
        }
        (PathStep::Index(i), MutationKind::Remove) => {
            if let Some(items) = parent.as_array_mut() {
                items.remove(*i);
            }
        }
        (PathStep::Key(k), _) => parent[k.as_str()] = replacement,
        (PathStep::Index(i), _) => parent[*i] = replacement,
    }
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

// ---------------------------------------------------------------------------------------------
// The well-behaved device.

struct Steady {
    ws: Ws,
    encoding: Encoding,
    next_id: u64,
    /// The stream's position: every seq up to here was delivered or was this device's own.
    at: u64,
    deltas: BTreeMap<u64, protocol::Delta>,
    own: BTreeSet<u64>,
}

impl Steady {
    async fn connect(addr: std::net::SocketAddr, tenant: &str, encoding: Encoding) -> Result<(Steady, String), String> {
        let client = Client::connect(addr, encoding).await;
        let mut steady = Steady { ws: client.ws, encoding, next_id: 0, at: 0, deltas: BTreeMap::new(), own: BTreeSet::new() };
        let id = steady.id();
        let hello = ClientFrame::Hello {
            id,
            versions: vec![1],
            token: token(tenant, "user-steady", "Employee", Some(STEADY_DEVICE)),
            device_id: None,
            position: None,
            mode: Default::default(),
        };
        steady.send(&hello).await?;
        let epoch = match steady.next().await? {
            ServerFrame::Welcome { epoch, .. } => epoch,
            other => return Err(format!("steady device: expected welcome, got {other:?}")),
        };
        Ok((steady, epoch))
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        let bytes = protocol::codec::encode_client(self.encoding, frame);
        self.ws.send(Fuzzer::message(self.encoding, bytes)).await.map_err(|e| format!("steady device: send: {e}"))
    }

    /// The next frame that is not part of the stream; stream frames are checked and kept.
    async fn next(&mut self) -> Result<ServerFrame, String> {
        loop {
            let frame = match read(&mut self.ws, REPLY_WAIT).await? {
                Read::Frame(encoding, _) if encoding != self.encoding => return Err("steady device: a frame in the other encoding".into()),
                Read::Frame(_, frame) => frame,
                Read::Closed(code) => return Err(format!("steady device: closed {code}")),
                Read::Dropped(why) => return Err(format!("steady device: dropped: {why}")),
                Read::Timeout => return Err(format!("steady device: nothing within {REPLY_WAIT:?} at seq {}", self.at)),
            };
            let (deltas, seq) = match frame {
                ServerFrame::CatchUp { deltas, seq, .. } | ServerFrame::Delta { deltas, seq } => (deltas, seq),
                ServerFrame::UpToDate { seq } => (Vec::new(), seq),
                ServerFrame::MustResync { .. } => return Err(format!("steady device: {frame:?}")),
                other => return Ok(other),
            };
            let mut after = self.at;
            for delta in deltas {
                if delta.seq <= after || delta.seq > seq {
                    return Err(format!("steady device: delta {} out of order after {after} in a frame up to {seq}", delta.seq));
                }
                after = delta.seq;
                self.deltas.insert(delta.seq, delta);
            }
            if seq < self.at {
                return Err(format!("steady device: the stream went back from {} to {seq}", self.at));
            }
            self.at = seq;
            self.advance();
        }
    }

    /// An ack's seq counts once every seq before it was applied (section 5, position): live
    /// frames leave the device's own changes out, so the stream may never name them.
    fn advance(&mut self) {
        while self.own.contains(&(self.at + 1)) {
            self.at += 1;
        }
    }

    async fn push_one(&mut self, device_seq: u64) -> Result<(), String> {
        let id = self.id();
        let key = Uuid::now_v7();
        let change = upsert("products", json!({"id": key}), product(key, "Steady tea", 300), device_seq, now_ms(), 0);
        self.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: vec![change] }).await?;
        loop {
            match self.next().await? {
                ServerFrame::Ack { id: got, results, .. } if got == id => {
                    let result = &results[0];
                    if !matches!(result.status, ChangeStatus::Applied | ChangeStatus::Merged) {
                        return Err(format!("steady device: its change came back {result:?}"));
                    }
                    self.own.insert(result.seq.ok_or("steady device: applied without a seq")?);
                    self.advance();
                    return Ok(());
                }
                ServerFrame::Error { code, message, .. } => return Err(format!("steady device: push refused {code:?}: {message}")),
                _ => {}
            }
        }
    }

    /// Read the stream until it reaches `head`.
    async fn until(&mut self, head: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        while self.at < head {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("steady device: the stream stopped at {} of {head}", self.at));
            }
            let id = self.id();
            self.send(&ClientFrame::Ping { id }).await?;
            loop {
                match self.next().await? {
                    ServerFrame::Pong { id: got } if got == id => break,
                    ServerFrame::Error { code, message, .. } => return Err(format!("steady device: {code:?}: {message}")),
                    _ => {}
                }
            }
            if self.at < head {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// One sequence, end to end.

struct Case<'a> {
    hub: &'a HubThread,
    db: &'a sqlx::PgPool,
}

async fn run(case: &Case<'_>, sequence: &Sequence) -> Result<String, String> {
    let tenant = format!("fz-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let other_tenant = format!("{tenant}-other");
    let (mut steady, epoch) = Steady::connect(case.hub.addr, &tenant, sequence.steady_encoding).await?;
    let (ws, upgrade_token) = connect_fuzzed(case, sequence, &tenant, &other_tenant).await?;
    let mut fuzz = Fuzzer {
        ws,
        upgrade_token,
        tenant: tenant.clone(),
        other_tenant,
        epoch,
        encoding: sequence.encoding,
        next_id: 1000,
        serial: 0,
        pending: Vec::new(),
        pushes: Vec::new(),
        hello_encoding: None,
        welcomed: None,
        asked: None,
        closed: None,
        errors_received: 0,
        hello_refusal: None,
        largest_sent: 0,
        cursor: 0,
        highest_sent: 0,
        last_seen_seq: 0,
        change_ids: Vec::new(),
        last_batch_id: None,
        subscriptions: HashSet::new(),
        pongs: HashSet::new(),
        withdrawn_subscribes: 0,
        started: std::time::Instant::now(),
        stream_at: None,
        log: Vec::new(),
    };

    // The fuzzed session and the steady device's pushes, side by side.
    let fuzzed = async {
        let result = drive(&mut fuzz, sequence).await;
        result.map_err(|e| format!("{e}\nsession log:\n  {}", fuzz.log.join("\n  ")))
    };
    let steadied = async {
        for n in 1..=sequence.steady_batches as u64 {
            steady.push_one(n).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<(), String>(())
    };
    let (fuzzed, steadied) = tokio::join!(fuzzed, steadied);
    fuzzed?;
    steadied?;
    let _ = fuzz.ws.close(None).await;

    check_log(case.db, &tenant, &fuzz).await?;
    check_steady(case.db, &tenant, &mut steady).await?;

    // A fresh session connects and pushes.
    let mut fresh = Client::connect(case.hub.addr, Encoding::Json).await;
    let id = fresh.next_id();
    fresh
        .send(&ClientFrame::Hello { id, versions: vec![1], token: token(&tenant, "user-fresh", "Employee", Some("fresh")), device_id: None, position: None, mode: Default::default() })
        .await;
    match fresh.recv().await {
        ServerFrame::Welcome { .. } => {}
        other => return Err(format!("a fresh session: expected welcome, got {other:?}")),
    }
    let key = Uuid::now_v7();
    let results = fresh.push(vec![upsert("products", json!({"id": key}), product(key, "Fresh", 100), 1, now_ms(), 0)]).await;
    if results[0].status != ChangeStatus::Applied {
        return Err(format!("a fresh session's change: {:?}", results[0]));
    }
    let _ = fresh.ws.close(None).await;
    let _ = steady.ws.close(None).await;
    match HUB_PANICS.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Ok(fuzz.summary()),
        n => Err(format!("{n} panics on the hub's threads (their messages are above)\nsession log:\n  {}", fuzz.log.join("\n  "))),
    }
}

/// The fuzzed session's socket, with the sequence's token at the upgrade: a token the hub must
/// accept opens the socket, any other is refused with 401 before one is opened (and the session
/// then goes on without one).
async fn connect_fuzzed(case: &Case<'_>, sequence: &Sequence, tenant: &str, other_tenant: &str) -> Result<(Ws, String), String> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let plain = || async { Client::connect(case.hub.addr, sequence.encoding).await.ws };
    let Some(gen) = sequence.upgrade else { return Ok((plain().await, String::new())) };
    let token = mint_token(gen, tenant, other_tenant);
    let acceptable = matches!(gen, TokenGen::Good { .. } | TokenGen::OtherDevice | TokenGen::OtherUser | TokenGen::OtherTenant);
    let bearer = format!("Bearer {token}");
    match Client::connect_with(case.hub.addr, &[("authorization", bearer.as_str())], "").await {
        Ok(client) if acceptable => Ok((client.ws, token)),
        Ok(_) => Err(format!("a {gen:?} token was accepted at the upgrade")),
        Err(WsError::Http(response)) if !acceptable && response.status() == 401 => Ok((plain().await, String::new())),
        Err(e) => Err(format!("the upgrade with a {gen:?} token: {e}")),
    }
}

async fn drive(fuzz: &mut Fuzzer, sequence: &Sequence) -> Result<(), String> {
    for (n, step) in sequence.steps.iter().enumerate() {
        let msg = fuzz.build(&step.frame);
        let Some(serial) = fuzz.send(msg).await else { break };
        let waits = step.wait && !matches!(fuzz.pending.last().map(|p| &p.kind), Some(Kind::Resume));
        let wait = if waits { REPLY_WAIT } else { Duration::ZERO };
        if !fuzz.pump(wait, |f| f.answered(serial)).await? && waits {
            return Err(format!("step {n}: no reply within {REPLY_WAIT:?}"));
        }
        if fuzz.closed.is_some() {
            break;
        }
    }
    // Every request gets its reply (a resume that worked has none of its own).
    let unanswered = |f: &Fuzzer| f.pending.iter().all(|p| matches!(p.kind, Kind::Resume));
    if !fuzz.pump(REPLY_WAIT, unanswered).await? {
        let left: Vec<String> = fuzz.pending.iter().map(|p| format!("{} {:?}", p.kind.name(), p.id)).collect();
        return Err(format!("requests unanswered after {REPLY_WAIT:?}: {left:?}"));
    }
    // The hub still answers.
    if fuzz.closed.is_none() {
        let id = fuzz.id();
        let encoding = fuzz.session_encoding();
        let ping = Fuzzer::message(encoding, protocol::codec::encode_client(encoding, &ClientFrame::Ping { id }));
        if let Some(serial) = fuzz.send(ping).await {
            if !fuzz.pump(REPLY_WAIT, |f| f.answered(serial)).await? {
                return Err("the final ping got no answer".into());
            }
            if fuzz.welcomed.is_some() && fuzz.closed.is_none() && !fuzz.pongs.contains(&id) {
                return Err("the final ping of a welcomed session got no pong".into());
            }
        }
    }
    match fuzz.closed {
        Some(code) if !fuzz.close_is_earned(code) => {
            Err(format!("closed {code}, which the sequence did not earn ({} errors, hello refused {:?})", fuzz.errors_received, fuzz.hello_refusal))
        }
        _ => Ok(()),
    }
}

type LogRow = (i64, Option<Uuid>, Option<String>, Option<i64>, String);

async fn log_rows(db: &sqlx::PgPool, tenant: &str) -> Result<Vec<LogRow>, String> {
    sqlx::query_as("select seq, change_id, origin_device, device_seq, table_name from synchub.change_log where tenant_id = $1 order by seq")
        .bind(tenant)
        .fetch_all(db)
        .await
        .map_err(|e| e.to_string())
}

/// No change half-applied: the log holds each committed change of the fuzzed device once, at its
/// acked seq, and nothing it did not commit.
async fn check_log(db: &sqlx::PgPool, tenant: &str, fuzz: &Fuzzer) -> Result<(), String> {
    let Some(w) = fuzz.welcomed.clone().filter(|w| !w.dashboard) else {
        // Never a device: nothing of the session may be in either tenant's log.
        for t in [tenant.to_string(), fuzz.other_tenant.clone()] {
            let stray: Vec<LogRow> = log_rows(db, &t).await?.into_iter().filter(|r| r.2.as_deref().is_some_and(|d| d.starts_with("fuzz"))).collect();
            if !stray.is_empty() {
                return Err(format!("log rows of a session that was never a device: {stray:?}"));
            }
        }
        return Ok(());
    };
    let rows: Vec<LogRow> = log_rows(db, &w.tenant).await?.into_iter().filter(|r| r.2.as_deref() == Some(w.device.as_str())).collect();
    let row_of = |change: &Change| rows.iter().filter(|r| r.1 == Some(change.change_id) && r.3 == Some(change.device_seq as i64)).collect::<Vec<_>>();
    let mut committed: HashSet<(Uuid, u64)> = HashSet::new();
    let mut maybe: HashSet<(Uuid, u64)> = HashSet::new();
    for push in &fuzz.pushes {
        match &push.outcome {
            Some(Outcome::Acked(results)) => {
                for (result, change) in results.iter().zip(&push.changes) {
                    let found = row_of(change);
                    match (result.status, result.seq) {
                        (ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Conflict, Some(seq)) => {
                            if found.len() != 1 || found[0].0 != seq as i64 || found[0].4 != change.table {
                                return Err(format!("change {} acked {:?} at seq {seq}; the log holds {found:?}", change.change_id, result.status));
                            }
                            committed.insert((change.change_id, change.device_seq));
                        }
                        (ChangeStatus::Duplicate, _) => {
                            maybe.insert((change.change_id, change.device_seq));
                        }
                        _ => {}
                    }
                }
            }
            // Unanswered because the socket closed: it may have committed, once.
            None if fuzz.closed.is_some() => maybe.extend(push.changes.iter().map(|c| (c.change_id, c.device_seq))),
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    for row in &rows {
        let change = (row.1.unwrap_or_default(), row.3.unwrap_or(-1) as u64);
        // A change is its device's and device_seq's (its id may repeat an earlier change's).
        if !seen.insert(change.1) {
            return Err(format!("device_seq {} (change {}) twice in the log", change.1, change.0));
        }
        if !committed.contains(&change) && !maybe.contains(&change) {
            return Err(format!("log row {row:?} is of no change the hub committed for the session"));
        }
    }
    if fuzz.closed.is_none() {
        let cursor: Option<i64> = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
            .bind(&w.tenant)
            .bind(&w.device)
            .fetch_optional(db)
            .await
            .map_err(|e| e.to_string())?;
        if cursor.unwrap_or(0) as u64 != fuzz.cursor {
            return Err(format!("the device's cursor is {cursor:?} in the database, {} by its acks", fuzz.cursor));
        }
    }
    Ok(())
}

/// The steady device had its changes applied and received every other change of the tenant.
async fn check_steady(db: &sqlx::PgPool, tenant: &str, steady: &mut Steady) -> Result<(), String> {
    let rows = log_rows(db, tenant).await?;
    let head = rows.last().map_or(0, |r| r.0 as u64);
    let seqs: Vec<u64> = rows.iter().map(|r| r.0 as u64).collect();
    if seqs != (1..=head).collect::<Vec<_>>() {
        return Err(format!("the tenant's log has gaps: {seqs:?}"));
    }
    steady.until(head).await?;
    for row in &rows {
        let seq = row.0 as u64;
        let own = steady.own.contains(&seq);
        match steady.deltas.get(&seq) {
            Some(_) if own => return Err(format!("steady device: its own change {seq} came as a live delta")),
            None if !own => return Err(format!("steady device: seq {seq} ({:?} of {:?}) never arrived", row.1, row.2)),
            Some(delta) if delta.change_id != row.1 || delta.origin != row.2 || delta.table != row.4 => {
                return Err(format!("steady device: delta {seq} is {delta:?}, the log holds {row:?}"))
            }
            _ => {}
        }
    }
    if let Some(seq) = steady.deltas.keys().find(|s| **s > head) {
        return Err(format!("steady device: a delta at {seq}, past the head {head}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The hub's limits, small enough that sequences reach them.
fn limits(config: &mut synchub::config::Config) {
    config.max_batch_changes = MAX_BATCH_CHANGES;
    config.max_errors_per_minute = MAX_ERRORS_PER_MINUTE;
    config.max_frame_bytes = MAX_FRAME_BYTES;
    config.device_push_rate = DEVICE_PUSH_BURST;
    config.device_push_burst = DEVICE_PUSH_BURST;
}

/// Panics on any thread but the test's own: the hub's (the hub runs in this process).
static HUB_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_hub_panics() {
    let test_thread = std::thread::current().id();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != test_thread {
            HUB_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        report(info)
    }));
}

fn cases() -> u32 {
    std::env::var("PROTOCOL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64)
}

#[test]
fn random_sessions_leave_the_hub_answering_and_the_log_whole() {
    count_hub_panics();
    let hub = HubThread::start(limits);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(sqlx::PgPool::connect(&hub.database_url)).unwrap();
    let case = Case { hub: &hub, db: &db };
    let config = ProptestConfig { cases: cases(), max_shrink_iters: 5000, max_shrink_time: 180_000, source_file: Some(file!()), ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config);
    let n = std::cell::Cell::new(0);
    let result = runner.run(&sequence(), |sequence| {
        n.set(n.get() + 1);
        let n = n.get();
        let started = std::time::Instant::now();
        let outcome = rt.block_on(Box::pin(run(&case, &sequence)));
        // Shown with --nocapture: which run is slow or failing, while proptest shrinks.
        let line = match &outcome {
            Ok(summary) => summary.as_str(),
            Err(why) => why.lines().next().unwrap_or_default(),
        };
        eprintln!("sequence {n}: {} steps, {:?}: {line}", sequence.steps.len(), started.elapsed());
        outcome.map(|_| ()).map_err(TestCaseError::fail)
    });
    rt.block_on(db.close());
    drop(hub);
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, sequence)) => panic!("{why}\nminimal failing sequence: {sequence:#?}"),
        Err(e) => panic!("{e}"),
    }
}

/// Frames nested a thousand arrays deep, about 1 KB each: a ping with such an unknown field, a
/// subscribe with such a filter value, and an array that is no frame.
fn nested_frames(encoding: Encoding, id: u64) -> [Message; 3] {
    const DEPTH: usize = 1000;
    match encoding {
        Encoding::Json => {
            let nested = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
            [
                Message::Text(format!(r#"{{"type":"ping","id":{id},"x":{nested}}}"#)),
                Message::Text(format!(r#"{{"type":"subscribe","id":{id},"sub":"s","table":"products","filter":[{{"column":"a","op":"eq","value":{nested}}}]}}"#)),
                Message::Text(nested),
            ]
        }
        Encoding::MsgPack => {
            let nested = |mut head: Vec<u8>| {
                head.extend(std::iter::repeat(0x91).take(DEPTH));
                head.push(0xc0);
                head
            };
            // Each map is written with one entry fewer than it gets: the nested value, last.
            let mut ping = protocol::codec::encode(Encoding::MsgPack, &json!({"type": "ping", "id": id}));
            ping[0] += 1;
            ping.extend([0xa1, b'x']);
            let mut subscribe = protocol::codec::encode(
                Encoding::MsgPack,
                &json!({"type": "subscribe", "id": id, "sub": "s", "table": "products", "filter": [{"column": "a", "op": "eq"}]}),
            );
            let condition = subscribe.iter().rposition(|b| *b == 0x82).expect("the condition is a map of two");
            subscribe[condition] += 1;
            subscribe.extend([0xa5, b'v', b'a', b'l', b'u', b'e']);
            [Message::Binary(nested(ping)), Message::Binary(nested(subscribe)), Message::Binary(nested(Vec::new()))]
        }
    }
}

/// Found by the sequences above: a MessagePack frame nested a thousand deep (about 1 KB)
/// overflowed the stack of the hub's thread that read it (in a debug build), which aborts the
/// whole process. MessagePack now nests as deep as JSON, 128 levels; a frame nested deeper is
/// malformed. (A JSON reader skips an unknown field without reading it, at any depth.)
#[actix_web::test]
async fn frames_nested_a_thousand_deep_are_malformed_and_the_hub_goes_on() {
    let hub = TestHub::start().await;
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let mut c = Client::connect(hub.addr, encoding).await;
        c.hello(&token("store-1", "user-1", "Employee", Some("pos-1")), None, None).await;
        c.until_up_to_date().await;
        let [ping, subscribe, array] = nested_frames(encoding, 7);
        c.send_raw(ping).await;
        let reply = c.recv().await;
        match encoding {
            Encoding::Json => assert_eq!(reply, ServerFrame::Pong { id: 7 }),
            Encoding::MsgPack => assert!(matches!(reply, ServerFrame::Error { id: None, code: ErrorCode::MalformedFrame, .. }), "{reply:?}"),
        }
        for frame in [subscribe, array] {
            c.send_raw(frame).await;
            let reply = c.recv().await;
            assert!(matches!(reply, ServerFrame::Error { id: None, code: ErrorCode::MalformedFrame, .. }), "{encoding:?}: {reply:?}");
        }
        let id = c.next_id();
        c.send(&ClientFrame::Ping { id }).await;
        assert_eq!(c.recv().await, ServerFrame::Pong { id }, "{encoding:?}");
    }
    hub.shutdown().await;
}


