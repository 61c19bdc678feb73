//! Flow control and session lifecycle against a real hub, real Postgres and real sockets: a
//! stalled reader cut off within its outbound budget while others keep receiving, must_resync
//! (stale epoch, trimmed log) with snapshot paging and resume, token expiry and refresh,
//! a MessagePack session next to a JSON one, replacement of a device's older session,
//! graceful shutdown with a push in flight, and the heartbeat timeout.
//!
//! Devices made by `Client::device` have the user `user-<device>` (see `user_of`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, Delta, Encoding, ErrorCode, Object, Op, Position, ServerFrame};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const TENANT: &str = "store-1";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A token for `user` on `device` of `tenant`, expiring at `exp` (Unix seconds).
fn device_token(tenant: &str, user: &str, device: &str, exp: u64) -> String {
    let claims = json!({"sub": user, "role": "Employee", "tenant_id": tenant, "device_id": device, "exp": exp});
    synchub::auth::mint_hs256(SECRET, &claims)
}

fn user_of(device: &str) -> String {
    format!("user-{device}")
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// `count` new products as consecutive changes from `first_seq`, with a padded name.
fn new_products(count: usize, first_seq: u64, pad: usize) -> (Vec<Uuid>, Vec<Change>) {
    let filler = "x".repeat(pad);
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let changes = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            upsert("products", json!({"id": id}), product(*id, &format!("item {i} {filler}"), 100 + i as i64), first_seq + i as u64, now_ms(), 0)
        })
        .collect();
    (ids, changes)
}

/// Push and check every change was applied at consecutive seqs; returns the results.
async fn push_applied(c: &mut Client, changes: Vec<Change>) -> Vec<ChangeResult> {
    let n = changes.len();
    let results = c.push(changes).await;
    assert_eq!(results.len(), n);
    for r in &results {
        assert_eq!(r.status, ChangeStatus::Applied, "{r:?}");
    }
    let seqs: Vec<u64> = results.iter().map(|r| r.seq.expect("applied at a seq")).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "one batch commits at consecutive seqs");
    }
    results
}

/// Assert `deltas` are exactly the seqs `from..=to`, in order.
fn assert_seqs(deltas: &[Delta], from: u64, to: u64, what: &str) {
    let got: Vec<u64> = deltas.iter().map(|d| d.seq).collect();
    let want: Vec<u64> = (from..=to).collect();
    assert_eq!(got, want, "{what}: every seq {from}..={to} exactly once, in order");
}

/// The tenant's (epoch, head_seq) in Postgres.
async fn tenant_state(db: &sqlx::PgPool) -> (String, u64) {
    let (epoch, head): (String, i64) =
        sqlx::query_as("select epoch, head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(db).await.unwrap();
    (epoch, head as u64)
}

/// Products of the tenant after `after` in key order (at most `limit`), each as
/// (row as `to_jsonb`, version from the hub's row versions).
async fn pg_products(db: &sqlx::PgPool, after: Option<Uuid>, limit: i64) -> Vec<(Value, u64)> {
    let rows: Vec<(Value, Option<i64>)> = sqlx::query_as(
        "select to_jsonb(p), v.version from products p \
         left join synchub.row_versions v on v.tenant_id = p.tenant_id and v.table_name = 'products' \
              and v.pk = jsonb_build_object('id', p.id) \
         where p.tenant_id = $1 and ($2::uuid is null or p.id > $2) order by p.id limit $3",
    )
    .bind(TENANT)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter().map(|(row, v)| (row, v.expect("every synced row has a version") as u64)).collect()
}

/// Next data frame of a MessagePack session: it must be a binary message holding a
/// MessagePack map (named fields). WebSocket pings and pongs are skipped.
async fn recv_binary(c: &mut Client) -> ServerFrame {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, c.ws.next())
            .await
            .expect("a frame in time")
            .expect("socket still open")
            .expect("no transport error");
        match msg {
            Message::Binary(bytes) => {
                let first = *bytes.first().expect("non-empty frame");
                assert!(matches!(first, 0x80..=0x8f | 0xde | 0xdf), "a MessagePack map, not an array: first byte {first:#x}");
                return protocol::codec::decode_server(Encoding::MsgPack, &bytes).expect("valid MessagePack frame");
            }
            Message::Text(text) => panic!("text frame on a MessagePack session: {text}"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message on a MessagePack session: {other:?}"),
        }
    }
}

/// Next data frame of a JSON session, checked to be a text message.
async fn recv_text(c: &mut Client) -> ServerFrame {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, c.ws.next())
            .await
            .expect("a frame in time")
            .expect("socket still open")
            .expect("no transport error");
        match msg {
            Message::Text(text) => return protocol::codec::decode_server(Encoding::Json, text.as_bytes()).expect("valid JSON frame"),
            Message::Binary(_) => panic!("binary frame on a JSON session"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message on a JSON session: {other:?}"),
        }
    }
}

/// What a socket delivered from now until it closed.
struct Drained {
    /// Payload bytes of text and binary messages.
    bytes: usize,
    /// Payload bytes of the largest data message.
    largest: usize,
    frames: Vec<ServerFrame>,
    close: Option<u16>,
    /// How the socket ended when it did not end with a close frame.
    ended: Option<String>,
}

/// Read the raw socket (not the client's inbox) until it closes, counting payload bytes.
async fn drain_raw(c: &mut Client, wait: Duration) -> Drained {
    assert!(c.inbox.is_empty(), "no frame left unread in the inbox: {:?}", c.inbox);
    let mut out = Drained { bytes: 0, largest: 0, frames: Vec::new(), close: None, ended: None };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, c.ws.next()).await else {
            out.ended = Some(format!("nothing more within {wait:?}"));
            break;
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                out.bytes += text.len();
                out.largest = out.largest.max(text.len());
                out.frames.push(protocol::codec::decode_server(Encoding::Json, text.as_bytes()).expect("valid JSON frame"));
            }
            Some(Ok(Message::Binary(bytes))) => {
                out.bytes += bytes.len();
                out.largest = out.largest.max(bytes.len());
                out.frames.push(protocol::codec::decode_server(Encoding::MsgPack, &bytes).expect("valid MessagePack frame"));
            }
            Some(Ok(Message::Close(frame))) => {
                out.close = Some(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                out.ended = Some(format!("error after {} bytes: {err}", out.bytes));
                break;
            }
            None => {
                out.ended = Some(format!("end of stream after {} bytes", out.bytes));
                break;
            }
        }
    }
    out
}

/// Frames until the socket closes (through the client, so the inbox comes first).
async fn frames_until_close(c: &mut Client) -> (Vec<ServerFrame>, Option<u16>) {
    let mut frames = Vec::new();
    while let Some(f) = c.recv_timeout(WAIT).await {
        frames.push(f);
    }
    (frames, c.closed.as_ref().map(|(code, _)| *code))
}

async fn must_resync(c: &mut Client) -> (String, u64, ErrorCode) {
    match c.recv().await {
        ServerFrame::MustResync { epoch, head_seq, reason } => (epoch, head_seq, reason),
        other => panic!("expected must_resync, got {other:?}"),
    }
}

async fn send_resume(c: &mut Client, epoch: &str, seq: u64) -> u64 {
    let id = c.next_id();
    c.send(&ClientFrame::Resume { id, position: Position { epoch: epoch.into(), seq } }).await;
    id
}

/// One snapshot page: (rows, seq, epoch, next_after).
async fn snapshot_page(
    c: &mut Client,
    table: &str,
    after: Option<Object>,
    limit: Option<u32>,
) -> (Vec<protocol::SnapshotRow>, u64, String, Option<Object>) {
    let id = c.next_id();
    c.send(&ClientFrame::Snapshot { id, table: table.into(), after, limit }).await;
    c.expect(|f| match f {
        ServerFrame::SnapshotPage { id: got, table: t, rows, seq, epoch, next_after } if *got == id => {
            assert_eq!(t, table);
            Some((rows.clone(), *seq, epoch.clone(), next_after.clone()))
        }
        ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("snapshot refused: {code:?} {message}"),
        _ => None,
    })
    .await
}

fn id_of(row: &Object) -> Uuid {
    row["id"].as_str().expect("uuid id").parse().expect("uuid")
}

// ---------------------------------------------------------------------------------------------
// 1. Flow control: a stalled reader
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn stalled_reader_is_cut_off_within_its_budget_while_others_keep_receiving() {
    const BUDGET: usize = 64 * 1024;
    const PING_EVERY: usize = 8 * 1024;
    const BATCHES: usize = 60;
    const PER_BATCH: usize = 20;
    let hub = TestHub::start_with(|c| {
        c.session_outbound_budget_bytes = BUDGET;
        c.ping_every_bytes = PING_EVERY;
    })
    .await;
    let (mut s, epoch, s_start) = Client::device(&hub, TENANT, "pos-stalled").await;
    let (mut c, _, c_start) = Client::device(&hub, TENANT, "pos-reader").await;
    let (mut w, _, _) = Client::device(&hub, TENANT, "pos-writer").await;
    assert_eq!((s_start, c_start), (0, 0));
    // From here on S's socket is not polled until the writes are done: it neither reads
    // frames nor answers the hub's pings (tungstenite only answers while reading).

    let mut c_deltas: Vec<Delta> = Vec::new();
    let mut c_bytes = 0usize;
    let mut head = 0;
    for b in 0..BATCHES {
        let (_, changes) = new_products(PER_BATCH, (b * PER_BATCH) as u64 + 1, 300);
        let results = push_applied(&mut w, changes).await;
        head = results.last().unwrap().seq.unwrap();
        // The live reader receives this batch before the next one is written.
        let mut c_pos = c_deltas.last().map_or(c_start, |d| d.seq);
        while c_pos < head {
            let (deltas, seq) = c.next_deltas().await;
            c_bytes += protocol::codec::encode_server(Encoding::Json, &ServerFrame::Delta { deltas: deltas.clone(), seq }).len();
            assert_seqs(&deltas, c_pos + 1, seq, "live frame to the reading device");
            c_deltas.extend(deltas);
            c_pos = seq;
        }
    }
    assert_eq!(head, (BATCHES * PER_BATCH) as u64);
    assert_seqs(&c_deltas, 1, head, "reading device");
    assert!(c.closed.is_none() && c.inbox.is_empty(), "the reading device was not cut off: {:?}", c.closed);
    assert!(c_bytes >= 10 * BUDGET, "the writes exceed the stalled reader's budget many times over ({c_bytes} bytes)");

    // Now read what S was sent: some deltas, then the slow-consumer close.
    let drained = drain_raw(&mut s, WAIT).await;
    assert_eq!(drained.close, Some(4008), "the stalled reader is closed with slow_consumer (socket ended: {:?})", drained.ended);
    let mut s_deltas = Vec::new();
    for f in &drained.frames {
        match f {
            ServerFrame::Delta { deltas, .. } => s_deltas.extend(deltas.iter().cloned()),
            other => panic!("only live deltas before the close, got {other:?}"),
        }
    }
    let s_last = s_deltas.last().map_or(s_start, |d| d.seq);
    assert_seqs(&s_deltas, s_start + 1, s_last, "stalled reader before the close");
    assert!(s_last < head, "the hub stopped sending to the stalled reader (it got up to {s_last} of {head})");
    // The hub wrote at most the budget plus the one frame that crossed it: it stopped writing
    // instead of buffering everything for the stalled socket.
    assert!(
        drained.bytes <= BUDGET + drained.largest,
        "stalled reader received {} bytes; budget {BUDGET} + largest frame {}",
        drained.bytes,
        drained.largest
    );
    assert!(drained.bytes > BUDGET - 2048, "it was cut off for exceeding the budget, not earlier ({} bytes)", drained.bytes);
    assert!(c.closed.is_none() && w.closed.is_none(), "only the stalled reader was cut off");

    // S reconnects with its last position and gets the rest exactly once, in order.
    let mut s2 = hub.client().await;
    let (_, welcome_head) =
        s2.hello(&token(TENANT, &user_of("pos-stalled"), "Employee", Some("pos-stalled")), None, Some(Position { epoch: epoch.clone(), seq: s_last })).await;
    assert_eq!(welcome_head, head);
    let (rest, upto) = s2.until_up_to_date().await;
    assert_eq!(upto, head);
    assert_seqs(&rest, s_last + 1, head, "resumed catch-up");
    s_deltas.extend(rest);
    let seen = |ds: &[Delta]| ds.iter().map(|d| (d.seq, d.change_id, d.row.clone())).collect::<Vec<_>>();
    assert_eq!(seen(&s_deltas), seen(&c_deltas), "the resumed device has exactly what the live reader got");

    // And it is live again.
    let (_, changes) = new_products(1, head + 1, 0);
    let results = push_applied(&mut w, changes).await;
    let (deltas, seq) = s2.next_deltas().await;
    assert_eq!(seq, results[0].seq.unwrap());
    assert_seqs(&deltas, head + 1, head + 1, "live after resume");
    hub.shutdown().await;
}

#[actix_web::test]
async fn catch_up_larger_than_the_budget_goes_live_without_cutting_off_the_reader() {
    const BUDGET: usize = 64 * 1024;
    let hub = TestHub::start_with(|c| {
        c.session_outbound_budget_bytes = BUDGET;
        c.ping_every_bytes = 8 * 1024;
        c.catch_up_page_changes = 150;
    })
    .await;
    let (mut w, _, _) = Client::device(&hub, TENANT, "pos-writer").await;
    // Two catch-up pages (150 and 100 deltas of ~750 bytes), each larger than the budget.
    let (_, changes) = new_products(250, 1, 400);
    push_applied(&mut w, changes).await;

    let mut r = hub.client().await;
    r.hello(&token(TENANT, &user_of("pos-r"), "Employee", Some("pos-r")), None, None).await;
    let mut pages = Vec::new();
    let upto = loop {
        match r.recv().await {
            ServerFrame::CatchUp { deltas, seq, head_seq } => pages.push((deltas, seq, head_seq)),
            ServerFrame::UpToDate { seq } => break seq,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(upto, 250);
    let last = pages.last().expect("catch-up pages");
    let last_bytes = protocol::codec::encode_server(Encoding::Json, &ServerFrame::CatchUp { deltas: last.0.clone(), seq: last.1, head_seq: last.2 }).len();
    assert!(last_bytes > BUDGET, "the last page alone exceeds the budget ({last_bytes} bytes)");
    let all: Vec<Delta> = pages.into_iter().flat_map(|p| p.0).collect();
    assert_seqs(&all, 1, 250, "catch-up");

    // The device read everything; a live write right after reaches it.
    let (_, changes) = new_products(1, 251, 0);
    push_applied(&mut w, changes).await;
    let (deltas, _) = r.next_deltas().await;
    assert_seqs(&deltas, 251, 251, "live after a large catch-up");
    assert!(r.closed.is_none() && r.inbox.is_empty(), "the reader is still connected: {:?}", r.closed);
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. must_resync: stale epoch, trimmed log
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn stale_epoch_must_resync_then_snapshot_pages_and_resume() {
    let hub = TestHub::start().await;
    let (mut w, epoch, _) = Client::device(&hub, TENANT, "pos-w").await;
    let (ids, changes) = new_products(7, 1, 0);
    push_applied(&mut w, changes).await;
    let mut w_seq = 7;
    let (db_epoch, db_head) = tenant_state(&hub.db).await;
    assert_eq!((db_epoch.as_str(), db_head), (epoch.as_str(), 7));

    let r_token = token(TENANT, &user_of("pos-r"), "Employee", Some("pos-r"));
    let mut r = hub.client().await;
    let (welcome_epoch, welcome_head) =
        r.hello(&r_token, None, Some(Position { epoch: "epoch-from-before-a-reset".into(), seq: 5 })).await;
    assert_eq!((welcome_epoch.as_str(), welcome_head), (db_epoch.as_str(), 7));
    assert_eq!(must_resync(&mut r).await, (db_epoch.clone(), 7, ErrorCode::EpochMismatch));

    // Until resume nothing of the stream arrives, even while another device writes.
    w_seq += 1;
    let results = push_applied(&mut w, vec![upsert("products", json!({"id": ids[0]}), json!({"price_cents": 999}), w_seq, now_ms(), 1)]).await;
    assert_eq!(results[0].seq, Some(8));
    assert!(r.recv_timeout(Duration::from_millis(500)).await.is_none(), "no catch_up or delta before resume");

    // Page the snapshot, 3 rows a page; other writes happen between pages.
    let mut local: BTreeMap<Uuid, (Object, u64)> = BTreeMap::new();
    let mut page_seqs = Vec::new();
    let mut after: Option<Object> = None;
    let mut after_id: Option<Uuid> = None;
    let mut extra = Vec::new();
    loop {
        let (rows, seq, page_epoch, next_after) = snapshot_page(&mut r, "products", after.clone(), Some(3)).await;
        let (now_epoch, now_head) = tenant_state(&hub.db).await;
        assert_eq!(page_epoch, now_epoch);
        assert_eq!(seq, now_head, "a page is read at the tenant's head");
        let expected = pg_products(&hub.db, after_id, 3).await;
        let got: Vec<(Value, u64)> = rows.iter().map(|r| (Value::Object(r.row.clone()), r.version)).collect();
        assert_eq!(got, expected, "page rows and versions are Postgres's, in key order");
        for row in &rows {
            assert!(local.insert(id_of(&row.row), (row.row.clone(), row.version)).is_none(), "no row twice across pages");
        }
        page_seqs.push(seq);
        if page_seqs.len() == 1 {
            // Between pages: an update of a row already read, and a new row.
            let first = id_of(&rows[0].row);
            let (new_ids, mut changes) = new_products(1, w_seq + 2, 0);
            changes.insert(0, upsert("products", json!({"id": first}), json!({"name": "renamed mid-snapshot"}), w_seq + 1, now_ms(), rows[0].version));
            w_seq += 2;
            push_applied(&mut w, changes).await;
            extra.extend(new_ids);
        }
        match next_after {
            Some(next) => {
                assert_eq!(rows.len(), 3, "only a full page has a next page");
                let last = rows.last().unwrap();
                assert_eq!(next, obj(json!({"id": last.row["id"]})), "next_after is the last row's key");
                after_id = Some(id_of(&last.row));
                after = Some(next);
            }
            None => {
                assert!(rows.len() < 3, "the last page is not full");
                break;
            }
        }
    }
    assert!(page_seqs.len() >= 3, "7+ rows in pages of 3");
    assert!(page_seqs.windows(2).all(|w| w[0] <= w[1]));
    assert!(page_seqs[0] < *page_seqs.last().unwrap(), "the writes between pages moved the head");

    // Resume from another epoch is refused like a hello from it.
    send_resume(&mut r, "still-not-the-epoch", page_seqs[0]).await;
    let (_, head_now) = tenant_state(&hub.db).await;
    assert_eq!(must_resync(&mut r).await, (db_epoch.clone(), head_now, ErrorCode::EpochMismatch));

    // Resume from the smallest page seq: catch-up covers everything after it.
    let min_seq = *page_seqs.iter().min().unwrap();
    send_resume(&mut r, &db_epoch, min_seq).await;
    let (deltas, upto) = r.until_up_to_date().await;
    let (_, head_now) = tenant_state(&hub.db).await;
    assert_eq!(upto, head_now);
    assert_seqs(&deltas, min_seq + 1, head_now, "catch-up after resume");
    for d in &deltas {
        let id = id_of(&d.key);
        if local.get(&id).is_some_and(|(_, v)| *v >= d.seq) {
            continue; // the snapshot row already has it
        }
        match d.op {
            Op::Upsert => {
                local.insert(id, (d.row.clone().expect("row"), d.seq));
            }
            Op::Delete => {
                local.remove(&id);
            }
        }
    }
    let expected = pg_products(&hub.db, None, 1000).await;
    let got: Vec<(Value, u64)> = local.values().map(|(row, v)| (Value::Object(row.clone()), *v)).collect();
    assert_eq!(got, expected, "snapshot + catch-up = Postgres, rows and versions");
    assert_eq!(got.len(), 8);
    assert!(local.contains_key(&extra[0]));

    // Live deltas follow.
    let (_, changes) = new_products(1, w_seq + 1, 0);
    let results = push_applied(&mut w, changes).await;
    let (deltas, seq) = r.next_deltas().await;
    assert_eq!(seq, results[0].seq.unwrap());
    assert_seqs(&deltas, head_now + 1, head_now + 1, "live after resume");
    hub.shutdown().await;
}

#[actix_web::test]
async fn trimmed_log_makes_older_positions_resync() {
    let hub = TestHub::start().await;
    let (mut w, epoch, _) = Client::device(&hub, TENANT, "pos-w").await;
    let (_, changes) = new_products(10, 1, 0);
    push_applied(&mut w, changes).await;
    let removed: i64 = sqlx::query_scalar("select synchub.trim_log($1, 6)").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert_eq!(removed, 6);

    // Older than the floor: must_resync position_too_old, once the hub has read trim_log's
    // notification (hellos are answered from the tenant actor's memory of the floor).
    let old_position = Position { epoch: epoch.clone(), seq: 4 };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut old = loop {
        let mut old = hub.client().await;
        old.hello(&token(TENANT, &user_of("pos-old"), "Employee", Some("pos-old")), None, Some(old_position.clone())).await;
        match old.recv().await {
            ServerFrame::MustResync { epoch: e, head_seq, reason } => {
                assert_eq!((e, head_seq, reason), (epoch.clone(), 10, ErrorCode::PositionTooOld));
                break old;
            }
            // Not yet: the memory still served entries 5 and 6, as they were before the trim.
            ServerFrame::CatchUp { deltas, .. } => assert_eq!(deltas.first().map(|d| d.seq), Some(5)),
            other => panic!("expected must_resync or catch_up, got {other:?}"),
        }
        assert!(Instant::now() < deadline, "the hub never learned the trimmed floor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // At the floor: everything after it is still in the log.
    let mut at = hub.client().await;
    at.hello(&token(TENANT, &user_of("pos-at"), "Employee", Some("pos-at")), None, Some(Position { epoch: epoch.clone(), seq: 6 })).await;
    let (deltas, upto) = at.until_up_to_date().await;
    assert_eq!(upto, 10);
    assert_seqs(&deltas, 7, 10, "catch-up from the floor");

    // First start (no position) is a position at seq 0, which the log no longer has.
    let mut fresh = hub.client().await;
    fresh.hello(&token(TENANT, &user_of("pos-new"), "Employee", Some("pos-new")), None, None).await;
    assert_eq!(must_resync(&mut fresh).await, (epoch.clone(), 10, ErrorCode::PositionTooOld));
    assert!(fresh.recv_timeout(Duration::from_millis(300)).await.is_none(), "no catch-up of a partial log");

    // Resume proceeds exactly as hello: a position below the floor is refused again.
    send_resume(&mut old, &epoch, 5).await;
    assert_eq!(must_resync(&mut old).await, (epoch.clone(), 10, ErrorCode::PositionTooOld));

    // Snapshot, then resume at the page's seq.
    let (rows, seq, page_epoch, next_after) = snapshot_page(&mut old, "products", None, None).await;
    assert_eq!((rows.len(), seq, page_epoch.as_str(), next_after), (10, 10, epoch.as_str(), None));
    send_resume(&mut old, &epoch, seq).await;
    let (deltas, upto) = old.until_up_to_date().await;
    assert!(deltas.is_empty());
    assert_eq!(upto, 10);
    let (_, changes) = new_products(1, 11, 0);
    push_applied(&mut w, changes).await;
    let (deltas, _) = old.next_deltas().await;
    assert_seqs(&deltas, 11, 11, "live after resume");
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Token expiry and refresh
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn token_expiry_closes_the_session_unless_refreshed() {
    let hub = TestHub::start_with(|c| c.jwt_leeway_secs = 0).await;
    let exp = synchub::auth::unix_now() + 3;

    let mut a = hub.client().await;
    a.hello(&device_token(TENANT, &user_of("pos-a"), "pos-a", exp), None, None).await;
    a.until_up_to_date().await;
    let mut b = hub.client().await;
    b.hello(&device_token(TENANT, &user_of("pos-b"), "pos-b", exp), None, None).await;
    b.until_up_to_date().await;

    async fn auth(c: &mut Client, token: String) -> ServerFrame {
        let id = c.next_id();
        c.send(&ClientFrame::Auth { id, token }).await;
        c.expect(|f| match f {
            ServerFrame::AuthOk { id: got, .. } | ServerFrame::Error { id: Some(got), .. } if *got == id => Some(f.clone()),
            _ => None,
        })
        .await
    }
    let refused = |f: ServerFrame| match f {
        ServerFrame::Error { code, temporary, .. } => {
            assert!(!temporary);
            code
        }
        other => panic!("expected the token to be refused, got {other:?}"),
    };

    // A token of another tenant or another device does not replace the session's token.
    let later = synchub::auth::unix_now() + 3600;
    assert_eq!(refused(auth(&mut a, device_token("store-2", &user_of("pos-a"), "pos-a", later)).await), ErrorCode::Forbidden);
    assert_eq!(refused(auth(&mut b, device_token(TENANT, &user_of("pos-b"), "pos-other", later)).await), ErrorCode::Forbidden);
    assert_eq!(refused(auth(&mut b, device_token("store-2", &user_of("pos-b"), "pos-b", later)).await), ErrorCode::Forbidden);
    assert_eq!(refused(auth(&mut b, device_token(TENANT, "someone-else", "pos-b", later)).await), ErrorCode::Forbidden);
    let stale = synchub::auth::unix_now() - 60;
    assert_eq!(refused(auth(&mut b, device_token(TENANT, &user_of("pos-b"), "pos-b", stale)).await), ErrorCode::TokenExpired);
    // The right identity with a fresh token: auth_ok with its expiry.
    match auth(&mut b, device_token(TENANT, &user_of("pos-b"), "pos-b", later)).await {
        ServerFrame::AuthOk { expires_at, .. } => assert_eq!(expires_at, later),
        other => panic!("expected auth_ok, got {other:?}"),
    }
    assert!(unix_now_f64() < exp as f64, "the refresh happened before the first token expired");

    // A's token (still the first one) expires: error token_expired, then close 4002, not
    // before the token's exp (leeway 0) and not much after it.
    let err = a
        .expect(|f| match f {
            ServerFrame::Error { id: None, code, .. } => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(err, ErrorCode::TokenExpired);
    assert_eq!(a.expect_close().await, 4002);
    let closed_at = unix_now_f64();
    assert!(closed_at >= exp as f64 - 0.05, "closed at {closed_at}, before the token's exp {exp}");
    assert!(closed_at <= exp as f64 + 2.0, "closed at {closed_at}, long after the token's exp {exp}");

    // B outlives its first token's expiry and can still push.
    let wait = (exp as f64 + 1.5 - unix_now_f64()).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let (_, changes) = new_products(1, 1, 0);
    push_applied(&mut b, changes).await;
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_none());
    assert!(b.closed.is_none(), "the refreshed session is still open");
    assert!(b.inbox.is_empty(), "no error for the refreshed session: {:?}", b.inbox);
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. MessagePack session next to a JSON session
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn messagepack_session_interoperates_with_json() {
    let hub = TestHub::start().await;
    let (mut j, epoch, _) = Client::device(&hub, TENANT, "pos-json").await;
    let p1 = Uuid::new_v4();
    let r1 = push_applied(&mut j, vec![upsert("products", json!({"id": p1}), product(p1, "Tea", 300), 1, now_ms(), 0)]).await;
    let s1 = r1[0].seq.unwrap();

    let mut m = Client::connect(hub.addr, Encoding::MsgPack).await;
    let hello_id = m.next_id();
    m.send(&ClientFrame::Hello {
        mode: Default::default(),
        id: hello_id,
        versions: vec![1],
        token: token(TENANT, &user_of("pos-mp"), "Employee", Some("pos-mp")),
        device_id: None,
        position: Some(Position { epoch: epoch.clone(), seq: 0 }),
    })
    .await;
    match recv_binary(&mut m).await {
        ServerFrame::Welcome { id, device_id, epoch: e, head_seq, .. } => {
            assert_eq!((id, device_id.as_str(), e.as_str(), head_seq), (hello_id, "pos-mp", epoch.as_str(), s1));
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    match recv_binary(&mut m).await {
        ServerFrame::CatchUp { deltas, seq, head_seq } => {
            assert_eq!((seq, head_seq), (s1, s1));
            assert_seqs(&deltas, 1, s1, "MessagePack catch-up");
            assert_eq!(deltas[0].row.as_ref().unwrap()["name"], json!("Tea"));
            assert_eq!(deltas[0].row.as_ref().unwrap()["price_cents"], json!(300));
            assert_eq!(deltas[0].origin.as_deref(), Some("pos-json"));
        }
        other => panic!("expected catch_up, got {other:?}"),
    }
    assert_eq!(recv_binary(&mut m).await, ServerFrame::UpToDate { seq: s1 });

    // MessagePack push → binary ack; the JSON device gets the delta as text.
    let p2 = Uuid::new_v4();
    let change = upsert("products", json!({"id": p2}), product(p2, "Scone", 275), 1, now_ms(), 0);
    let push_id = m.next_id();
    let batch_id = Uuid::now_v7();
    m.send(&ClientFrame::Push { id: push_id, batch_id, changes: vec![change.clone()] }).await;
    let s2 = match recv_binary(&mut m).await {
        ServerFrame::Ack { id, batch_id: b, results } => {
            assert_eq!((id, b, results.len()), (push_id, batch_id, 1));
            assert_eq!((results[0].change_id, results[0].status), (change.change_id, ChangeStatus::Applied));
            results[0].seq.unwrap()
        }
        other => panic!("expected ack, got {other:?}"),
    };
    assert_eq!(s2, s1 + 1);
    match recv_text(&mut j).await {
        ServerFrame::Delta { deltas, seq } => {
            assert_eq!(seq, s2);
            assert_seqs(&deltas, s2, s2, "JSON device");
            let d = &deltas[0];
            assert_eq!((d.origin.as_deref(), d.change_id), (Some("pos-mp"), Some(change.change_id)));
            assert_eq!(d.row.as_ref().unwrap()["name"], json!("Scone"));
            assert_eq!(d.row.as_ref().unwrap()["price_cents"], json!(275));
        }
        other => panic!("expected a delta, got {other:?}"),
    }

    // JSON push → the MessagePack device gets it as a binary delta.
    let r3 = push_applied(&mut j, vec![upsert("products", json!({"id": p2}), json!({"price_cents": 295}), 2, now_ms(), s2)]).await;
    let s3 = r3[0].seq.unwrap();
    match recv_binary(&mut m).await {
        ServerFrame::Delta { deltas, seq } => {
            assert_eq!(seq, s3);
            assert_seqs(&deltas, s3, s3, "MessagePack device");
            let d = &deltas[0];
            assert_eq!(d.origin.as_deref(), Some("pos-json"));
            assert_eq!(d.row.as_ref().unwrap()["price_cents"], json!(295));
            assert_eq!(d.old.as_ref().unwrap(), &obj(json!({"price_cents": 275})));
        }
        other => panic!("expected a delta, got {other:?}"),
    }

    // Application ping and a snapshot over MessagePack too.
    let ping_id = m.next_id();
    m.send(&ClientFrame::Ping { id: ping_id }).await;
    assert_eq!(recv_binary(&mut m).await, ServerFrame::Pong { id: ping_id });
    let snap_id = m.next_id();
    m.send(&ClientFrame::Snapshot { id: snap_id, table: "products".into(), after: None, limit: None }).await;
    match recv_binary(&mut m).await {
        ServerFrame::SnapshotPage { id, rows, seq, next_after, .. } => {
            assert_eq!((id, seq, next_after), (snap_id, s3, None));
            let got: Vec<(Value, u64)> = rows.iter().map(|r| (Value::Object(r.row.clone()), r.version)).collect();
            assert_eq!(got, pg_products(&hub.db, None, 1000).await);
        }
        other => panic!("expected a snapshot page, got {other:?}"),
    }
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. One session per device
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn second_session_of_a_device_replaces_the_first() {
    let hub = TestHub::start().await;
    let (mut other, _, _) = Client::device(&hub, TENANT, "pos-other").await;
    let (mut first, epoch, pos) = Client::device(&hub, TENANT, "pos-a").await;
    let (_, changes) = new_products(1, 1, 0);
    let r1 = push_applied(&mut first, changes).await;
    let s1 = r1[0].seq.unwrap();

    let mut second = hub.client().await;
    let (welcome_epoch, head) =
        second.hello(&token(TENANT, &user_of("pos-a"), "Employee", Some("pos-a")), None, Some(Position { epoch: epoch.clone(), seq: pos })).await;
    assert_eq!((welcome_epoch, head), (epoch.clone(), s1));
    assert_eq!(first.expect_close().await, 4010, "the older session is closed as replaced");

    // The newer session catches up (its own earlier change included) and works.
    let (deltas, upto) = second.until_up_to_date().await;
    assert_eq!(upto, s1);
    assert_seqs(&deltas, pos + 1, s1, "catch-up of the new session");
    let (_, changes) = new_products(1, 2, 0);
    let r2 = push_applied(&mut second, changes).await;
    let s2 = r2[0].seq.unwrap();
    assert_eq!(s2, s1 + 1);
    let (deltas, _) = other.next_deltas().await;
    assert_eq!(deltas[0].seq, s1);
    let (deltas, _) = other.next_deltas().await;
    assert_eq!((deltas[0].seq, deltas[0].origin.as_deref()), (s2, Some("pos-a")));
    let (_, changes) = new_products(1, 1, 0);
    let r3 = push_applied(&mut other, changes).await;
    let (deltas, seq) = second.next_deltas().await;
    assert_eq!(seq, r3[0].seq.unwrap());
    assert_seqs(&deltas, s2 + 1, s2 + 1, "live delta to the new session");
    assert!(second.closed.is_none());
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Graceful shutdown
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn graceful_shutdown_finishes_the_push_in_flight_and_devices_resume_on_a_new_hub() {
    let mut hub = TestHub::start().await;
    let (mut a, epoch, a_pos) = Client::device(&hub, TENANT, "pos-a").await;
    let (mut b, _, b_pos) = Client::device(&hub, TENANT, "pos-b").await;

    // Hold a lock on the products table so A's push is certainly in flight (its transaction
    // waits) when the shutdown begins.
    let mut lock = hub.db.begin().await.unwrap();
    sqlx::query("lock table products in access exclusive mode").execute(&mut *lock).await.unwrap();
    let (ids1, batch1) = new_products(200, 1, 0);
    let push1 = a.next_id();
    let batch1_id = Uuid::now_v7();
    a.send(&ClientFrame::Push { id: push1, batch_id: batch1_id, changes: batch1.clone() }).await;
    let waiting = std::time::Instant::now();
    loop {
        let blocked: bool = sqlx::query_scalar(
            "select exists(select 1 from pg_locks where not granted and database = (select oid from pg_database where datname = current_database()))",
        )
        .fetch_one(&hub.db)
        .await
        .unwrap();
        if blocked {
            break;
        }
        assert!(waiting.elapsed() < WAIT, "the push never reached the database");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (ids2, batch2) = new_products(5, 201, 0);
    let push2 = a.next_id();
    let running = hub.running.take().unwrap();
    let started = std::time::Instant::now();
    let devices = async {
        // The shutdown has told the sessions by now; a new push is refused, not applied.
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.send(&ClientFrame::Push { id: push2, batch_id: Uuid::now_v7(), changes: batch2.clone() }).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        lock.commit().await.unwrap();
        let a_out = frames_until_close(&mut a).await;
        let b_out = frames_until_close(&mut b).await;
        (a_out, b_out)
    };
    let ((), ((a_frames, a_close), (b_frames, b_close))) = tokio::join!(running.shutdown(), devices);
    assert!(started.elapsed() < Duration::from_secs(9), "shutdown finished within its bound");
    assert_eq!(a_close, Some(1001), "A closed with going_away; frames: {a_frames:?}");
    assert_eq!(b_close, Some(1001), "B closed with going_away");

    // The in-flight push was acked (after the shutdown began) and is committed; the push
    // sent during the shutdown was refused and is not.
    let acks: Vec<&Vec<ChangeResult>> = a_frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ack { id, results, .. } if *id == push1 => Some(results),
            ServerFrame::Ack { id, .. } if *id == push2 => panic!("a push sent during shutdown was applied"),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1, "the push in flight is acked before the close: {a_frames:?}");
    let results = acks[0];
    assert_eq!(results.len(), batch1.len());
    assert!(results.iter().all(|r| r.status == ChangeStatus::Applied), "{results:?}");
    let last1 = results.last().unwrap().seq.unwrap();
    assert_eq!(last1, a_pos + batch1.len() as u64);
    let refused = a_frames.iter().find_map(|f| match f {
        ServerFrame::Error { id: Some(id), code, temporary, .. } if *id == push2 => Some((*code, *temporary)),
        _ => None,
    });
    assert_eq!(refused, Some((ErrorCode::ShuttingDown, true)), "the late push is refused as shutting_down");
    let db = hub.db.clone();
    let count = move |ids: Vec<Uuid>| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>("select count(*) from products where id = any($1)").bind(ids).fetch_one(&db).await.unwrap()
        }
    };
    assert_eq!(count(ids1.clone()).await, batch1.len() as i64, "the acked batch is committed");
    assert_eq!(count(ids2.clone()).await, 0, "the refused batch is not");
    let cursor: i64 = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = 'pos-a'")
        .bind(TENANT)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(cursor, batch1.len() as i64);
    let b_live: Vec<Delta> = b_frames
        .iter()
        .flat_map(|f| match f {
            ServerFrame::Delta { deltas, .. } => deltas.clone(),
            other => panic!("B got {other:?}"),
        })
        .collect();
    let b_pos_after = b_live.last().map_or(b_pos, |d| d.seq);
    assert_seqs(&b_live, b_pos + 1, b_pos_after, "B before the shutdown");

    // The old hub refuses connections; a new hub on the same database takes over.
    assert!(tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", hub.addr)).await.is_err(), "the old hub is gone");
    let running = synchub::server::start(test_config(hub.database_url.clone())).await.expect("new hub starts");
    hub.addr = running.addr;
    hub.running = Some(running);

    let mut a2 = hub.client().await;
    let (_, head) =
        a2.hello(&token(TENANT, &user_of("pos-a"), "Employee", Some("pos-a")), None, Some(Position { epoch: epoch.clone(), seq: last1 })).await;
    assert_eq!(head, last1);
    let (deltas, upto) = a2.until_up_to_date().await;
    assert!(deltas.is_empty());
    assert_eq!(upto, last1);
    let mut b2 = hub.client().await;
    b2.hello(&token(TENANT, &user_of("pos-b"), "Employee", Some("pos-b")), None, Some(Position { epoch: epoch.clone(), seq: b_pos_after })).await;
    let (b_rest, upto) = b2.until_up_to_date().await;
    assert_eq!(upto, last1);
    assert_seqs(&b_rest, b_pos_after + 1, last1, "B's catch-up on the new hub");

    // A re-sends the refused batch; it applies once and B receives it live.
    let results = push_applied(&mut a2, batch2).await;
    assert_eq!(results[0].seq, Some(last1 + 1));
    let mut got = Vec::new();
    while got.len() < 5 {
        let (deltas, _) = b2.next_deltas().await;
        got.extend(deltas);
    }
    assert_seqs(&got, last1 + 1, last1 + 5, "B live on the new hub");
    assert_eq!(count(ids2).await, 5);
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Heartbeat timeout
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn silent_client_is_closed_after_the_heartbeat_timeout() {
    let hub = TestHub::start_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 500;
    })
    .await;
    let (mut silent, _, _) = Client::device(&hub, TENANT, "pos-silent").await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "pos-reader").await;

    // For 3 s (six heartbeat timeouts) the reader keeps reading (its library answers the hub's
    // pings) and the silent client does not touch its socket.
    assert!(reader.recv_timeout(Duration::from_secs(3)).await.is_none());
    assert!(reader.closed.is_none(), "a client that answers pings stays connected: {:?}", reader.closed);
    let drained = drain_raw(&mut silent, WAIT).await;
    assert!(drained.frames.is_empty(), "{:?}", drained.frames);
    assert_eq!(
        drained.close,
        Some(4011),
        "a client that neither sends nor answers pings is closed with heartbeat_timeout (socket ended: {:?})",
        drained.ended
    );

    let (_, changes) = new_products(1, 1, 0);
    push_applied(&mut reader, changes).await;
    hub.shutdown().await;
}

/// Batches pipelined on one socket are merged in the order sent, even while the tenant actor's
/// mailbox is full of other sessions' requests: every change applies, none is refused
/// `seq_gap`, and the acks come back in the order of the pushes.
#[actix_web::test]
async fn pipelined_pushes_are_merged_in_order_while_the_tenant_mailbox_is_full() {
    let hub = TestHub::start_with(|c| c.tenant_mailbox = 1).await;
    let (mut writer, _, _) = Client::device(&hub, "store-p", "pos-w").await;
    // Other devices of the tenant keep its mailbox busy with hellos and pings.
    let mut others = Vec::new();
    for n in 0..8 {
        others.push(Client::device(&hub, "store-p", &format!("pos-{n}")).await.0);
    }
    let id = Uuid::now_v7();
    let mut sent = Vec::new();
    for seq in 1..=60u64 {
        let fields = if seq == 1 { product(id, "Tea", 100) } else { json!({"price_cents": 100 + seq}) };
        let request = writer.next_id();
        writer.send(&ClientFrame::Push { id: request, batch_id: Uuid::now_v7(), changes: vec![upsert("products", json!({"id": id}), fields, seq, now_ms(), 0)] }).await;
        sent.push(request);
        if seq % 10 == 0 {
            for other in &mut others {
                let ping = other.next_id();
                other.send(&ClientFrame::Ping { id: ping }).await;
            }
        }
    }
    let mut acked = Vec::new();
    while acked.len() < sent.len() {
        match writer.recv().await {
            ServerFrame::Ack { id, results, .. } => {
                assert_eq!(results.len(), 1);
                assert!(matches!(results[0].status, ChangeStatus::Applied | ChangeStatus::Merged), "push {id}: {:?}", results[0]);
                acked.push(id);
            }
            ServerFrame::Error { id, code, message, .. } => panic!("push {id:?} refused: {code:?} {message}"),
            _ => {}
        }
    }
    assert_eq!(acked, sent, "acks come in the order of the pushes");
    let price: i32 = sqlx::query_scalar("select price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(price, 160);
    hub.shutdown().await;
}
