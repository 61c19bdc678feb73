//! No client's input fails another client's change. Input that Postgres would refuse, or that
//! could never be committed (a change id used twice, an id Postgres cannot store, a key too
//! large to index, a value a trigger refuses), is rejected for good with its own code: the
//! device's cursor moves past it, a re-sent batch is answered `duplicate`, and other changes
//! and other devices' batches in the same group commit. Postgres's own text never reaches the
//! client.

mod common;

use common::*;
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, ErrorCode, ServerFrame};
use serde_json::json;
use synchub::config::{MergePolicy, Secret, ServiceToken, TableConfig};
use synchub::ids::{DeviceId, TenantId, UserId};
use synchub::storage::apply::{ApplyLimits, BatchInput, GroupOutput};
use synchub::storage::row_cache::RowCache;
use uuid::Uuid;

const TENANT: &str = "store-1";

fn statuses(results: &[ChangeResult]) -> Vec<(ChangeStatus, Option<ErrorCode>)> {
    results.iter().map(|r| (r.status, r.reason)).collect()
}

async fn cursor(hub: &TestHub, device: &str) -> Option<i64> {
    sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
        .bind(TENANT)
        .bind(device)
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

fn batch(device: &str, changes: Vec<Change>) -> BatchInput {
    BatchInput::pushed(DeviceId::new(device), UserId::new(format!("user-{device}")), Uuid::now_v7(), changes)
}

/// Commit `batches` as one group, straight through the store (as the tenant actor would when
/// they queued together), so that they share a transaction for certain.
async fn commit_together(hub: &TestHub, batches: &[BatchInput]) -> GroupOutput {
    let store = hub.running.as_ref().unwrap().hub.store.clone();
    let tenant = TenantId::new(TENANT);
    store.tenant_head(&tenant).await.unwrap();
    let limits = ApplyLimits { max_field_bytes: 65_536, max_key_bytes: 1024, max_clock_skew_ms: 300_000 };
    let mut conn = store.group_connection().await.unwrap();
    store.commit_group(&mut conn, &tenant, batches, limits, None, &mut RowCache::off()).await.expect("the group commits")
}

fn new_product(device_seq: u64) -> Change {
    let id = Uuid::now_v7();
    upsert("products", json!({"id": id}), product(id, "Tea", 250), device_seq, now_ms(), 0)
}

#[actix_web::test]
async fn a_change_id_used_twice_in_one_push_is_rejected_and_the_device_moves_on() {
    let hub = TestHub::start().await;
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    let first = new_product(1);
    let again = Change { change_id: first.change_id, ..new_product(2) };
    let batch = vec![first, again, new_product(3)];
    let results = d.push(batch.clone()).await;
    use ChangeStatus::*;
    assert_eq!(statuses(&results), vec![(Applied, None), (Rejected, Some(ErrorCode::ChangeIdReused)), (Applied, None)]);
    assert_eq!(cursor(&hub, "pos-1").await, Some(3));
    // Re-sent, it is a duplicate throughout: the rejection was for good.
    assert_eq!(statuses(&d.push(batch).await), vec![(Duplicate, None); 3]);
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_change_id_another_device_committed_fails_neither_its_batch_nor_the_group() {
    // A change is its device's and device_seq's (the log keeps no index of change ids across
    // devices): a change id that another device used names a change of its own.
    let hub = TestHub::start().await;
    let taken = new_product(1);
    let out = commit_together(&hub, &[batch("pos-b", vec![taken.clone()])]).await;
    assert_eq!(out.results[0][0].status, ChangeStatus::Applied);

    // pos-a reuses pos-b's change id; pos-c's batch shares the group.
    let reused = Change { change_id: taken.change_id, ..new_product(1) };
    let out = commit_together(&hub, &[batch("pos-a", vec![reused.clone(), new_product(2)]), batch("pos-c", vec![new_product(1)])]).await;
    use ChangeStatus::*;
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(statuses(&out.results[0]), vec![(Applied, None), (Applied, None)]);
    assert_eq!(statuses(&out.results[1]), vec![(Applied, None)]);
    assert_eq!(out.deltas.len(), 3, "pos-a's two changes and pos-c's");
    assert_eq!((cursor(&hub, "pos-a").await, cursor(&hub, "pos-c").await), (Some(2), Some(1)));

    // Over a socket the same: applied, then duplicate with its own seq when re-sent; never
    // `unavailable`.
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-d").await;
    let reused = Change { change_id: taken.change_id, ..new_product(1) };
    let first = d.push(vec![reused.clone()]).await;
    assert_eq!(statuses(&first), vec![(Applied, None)]);
    let again = d.push(vec![reused]).await;
    assert_eq!(statuses(&again), vec![(Duplicate, None)]);
    assert_eq!(again[0].seq, first[0].seq, "acked with the seq it was committed at");
    hub.shutdown().await;
}

#[actix_web::test]
async fn ids_postgres_cannot_store_are_refused_where_they_enter() {
    const SERVICE: &str = "service-token-0123456789";
    let hub = TestHub::start_with(|config| {
        config.service_tokens = vec![ServiceToken { name: "bridge".into(), token: Secret(SERVICE.into()), tenants: vec![] }];
    })
    .await;
    // hello.device_id, where the token names no device.
    for device in ["pos\u{0}1", "pos\n1", &"p".repeat(257)] {
        let mut c = hub.client().await;
        let id = c.next_id();
        let token = token(TENANT, "user-1", "Employee", None);
        c.send(&ClientFrame::Hello { id, versions: vec![1], token, device_id: Some(device.to_string()), position: None, mode: Default::default() })
            .await;
        assert_eq!(c.expect_error(id).await, ErrorCode::Forbidden, "{device:?}");
        assert_eq!(c.expect_close().await, 4001);
    }
    // Token claims.
    for (tenant, user) in [(TENANT, "user\u{0}1"), ("store\u{0}1", "user-1")] {
        let mut c = hub.client().await;
        let id = c.next_id();
        let token = token(tenant, user, "Employee", Some("pos-1"));
        c.send(&ClientFrame::Hello { id, versions: vec![1], token, device_id: None, position: None, mode: Default::default() }).await;
        assert_eq!(c.expect_error(id).await, ErrorCode::InvalidToken, "{tenant:?} {user:?}");
        assert_eq!(c.expect_close().await, 4001);
    }
    // A service writer's device id.
    let body = json!({"device_id": "bridge\u{0}", "batch_id": Uuid::now_v7(), "changes": [new_product(1)]});
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/tenants/{TENANT}/push", hub.addr))
        .bearer_auth(SERVICE)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["code"], json!("invalid_batch"));
    // The tenant's devices push as ever.
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    assert_eq!(statuses(&d.push(vec![new_product(1)]).await), vec![(ChangeStatus::Applied, None)]);
    hub.shutdown().await;
}

/// A table of the test's own, keyed by text (the demo tables are keyed by uuid).
async fn hub_with_notes() -> TestHub {
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql("create table notes (tenant_id text not null, id text not null, body text, primary key (tenant_id, id))")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    TestHub::start_on(url, |config| {
        config.tables.push(TableConfig { name: "notes".into(), tenant_column: "tenant_id".into(), policy: MergePolicy::Lww, ..Default::default() });
    })
    .await
}

#[actix_web::test]
async fn a_key_too_large_to_index_is_rejected_alone() {
    let hub = hub_with_notes().await;
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    // Random text does not compress: past Postgres's index entry limit (about 2.7 KB).
    let huge: String = (0..6000).map(|_| char::from(b'!' + rand_byte() % 90)).collect();
    let results = d
        .push(vec![
            upsert("notes", json!({"id": huge}), json!({"body": "x"}), 1, now_ms(), 0),
            upsert("notes", json!({"id": "n-1"}), json!({"body": "kept"}), 2, now_ms(), 0),
        ])
        .await;
    assert_eq!(statuses(&results), vec![(ChangeStatus::Rejected, Some(ErrorCode::InvalidKey)), (ChangeStatus::Applied, None)]);
    assert_eq!(cursor(&hub, "pos-1").await, Some(2));
    hub.shutdown().await;
}

fn rand_byte() -> u8 {
    Uuid::new_v4().as_bytes()[0]
}

#[actix_web::test]
async fn values_the_database_refuses_are_rejected_in_the_hubs_words() {
    let hub = TestHub::start().await;
    // The application's own rules: a unique SKU per tenant, and a trigger that refuses a name
    // with a message of its own.
    sqlx::raw_sql(
        "create unique index products_sku on products (tenant_id, sku);
         create function refuse_name() returns trigger language plpgsql as $$
         begin
             if new.name = 'refused' then raise exception 'secret detail of %', new.tenant_id; end if;
             return new;
         end $$;
         create trigger refuse_name before insert or update on products for each row execute function refuse_name();",
    )
    .execute(&hub.db)
    .await
    .unwrap();
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    let (p1, p2, p3, p4) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let t = now_ms();
    let results = d
        .push(vec![
            upsert("products", json!({"id": p1}), json!({"sku": "S-1", "name": "Tea", "price_cents": 1}), 1, t, 0),
            upsert("products", json!({"id": p2}), json!({"sku": "S-1", "name": "Coffee", "price_cents": 1}), 2, t, 0),
            upsert("products", json!({"id": p3}), json!({"sku": "S-3", "name": "refused", "price_cents": 1}), 3, t, 0),
            upsert("products", json!({"id": p4}), json!({"sku": "S-4", "name": "Scone", "price_cents": "abc"}), 4, t, 0),
            new_product(5),
        ])
        .await;
    use ChangeStatus::*;
    let refused = (Rejected, Some(ErrorCode::InvalidValue));
    assert_eq!(statuses(&results), vec![(Applied, None), refused, refused, refused, (Applied, None)]);
    let messages: Vec<&str> = results[1..4].iter().map(|r| r.message.as_deref().unwrap()).collect();
    assert_eq!(
        messages,
        vec![
            "a value that must be unique is already taken",
            "the table's triggers or rules refused the change",
            "a value does not fit its column's type",
        ]
    );
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_batch_that_fails_for_an_unknown_reason_fails_alone() {
    let hub = TestHub::start().await;
    // An application trigger that writes a table the hub's tenant role may not write: every
    // write to customers fails with a privilege error, which is neither the change's values nor
    // a passing outage.
    sqlx::raw_sql(
        "create table audit (note text);
         revoke all on audit from public;
         create function audit_customer() returns trigger language plpgsql as $$
         begin insert into audit values (new.name); return new; end $$;
         create trigger audit_customer after insert on customers for each row execute function audit_customer();",
    )
    .execute(&hub.db)
    .await
    .unwrap();
    let customer = upsert("customers", json!({"id": Uuid::now_v7()}), json!({"name": "Ann"}), 1, now_ms(), 0);
    let out = commit_together(&hub, &[batch("pos-a", vec![customer]), batch("pos-c", vec![new_product(1), new_product(2)])]).await;
    assert_eq!(out.failed.iter().map(|(b, e)| (*b, e.code())).collect::<Vec<_>>(), vec![(0, ErrorCode::Unavailable)]);
    assert_eq!(statuses(&out.results[1]), vec![(ChangeStatus::Applied, None); 2]);
    assert_eq!(out.deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!((cursor(&hub, "pos-a").await, cursor(&hub, "pos-c").await), (None, Some(2)));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_pushed_batch_never_sees_unavailable_for_its_own_input() {
    // The same as the first test, over one socket per device, with both devices' batches in
    // flight together: whatever grouping the tenant actor chooses, the good batch applies.
    let hub = TestHub::start().await;
    let (mut bad, _, _) = Client::device(&hub, TENANT, "pos-bad").await;
    let (mut good, _, _) = Client::device(&hub, TENANT, "pos-good").await;
    let first = new_product(1);
    let poison = vec![first.clone(), Change { change_id: first.change_id, ..new_product(2) }];
    let (bad_id, good_id) = (bad.next_id(), good.next_id());
    bad.send(&ClientFrame::Push { id: bad_id, batch_id: Uuid::now_v7(), changes: poison }).await;
    good.send(&ClientFrame::Push { id: good_id, batch_id: Uuid::now_v7(), changes: vec![new_product(1)] }).await;
    let ack = |id: u64| move |f: &ServerFrame| match f {
        ServerFrame::Ack { id: got, results, .. } if *got == id => Some(Ok(statuses(results))),
        ServerFrame::Error { id: Some(got), code, .. } if *got == id => Some(Err(*code)),
        _ => None,
    };
    use ChangeStatus::*;
    assert_eq!(good.expect(ack(good_id)).await, Ok(vec![(Applied, None)]));
    assert_eq!(bad.expect(ack(bad_id)).await, Ok(vec![(Applied, None), (Rejected, Some(ErrorCode::ChangeIdReused))]));
    hub.shutdown().await;
}

#[actix_web::test]
async fn filter_and_snapshot_values_postgres_cannot_hold_get_the_clients_own_code() {
    use protocol::{Condition, FilterOp};
    let hub = TestHub::start().await;
    let (mut dash, _) = Client::dashboard(&hub, TENANT, "manager-1", "Manager").await;
    let nul = Condition { column: "name".into(), op: FilterOp::Eq, value: json!("Tea\u{0}") };
    let id = dash.send_subscribe("s1", Some("products"), vec![nul], true, None).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::InvalidFilter);
    // A snapshot page after a key Postgres cannot read.
    let id = dash.next_id();
    let after = Some(protocol::Object::from_iter([("id".to_string(), json!("not\u{0}a-uuid"))]));
    dash.send(&ClientFrame::Snapshot { id, table: "products".into(), after, limit: None }).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::InvalidKey);
    // The session goes on.
    let (_, rows) = dash.subscribe_table("s2", "products", vec![], true).await;
    assert!(rows.is_empty());
    hub.shutdown().await;
}

/// RFC 7519's NumericDate may be fractional: such a token is in force until its `exp`, not
/// expired at 0 (which closed the session with 4002 a second after welcome).
#[actix_web::test]
async fn a_token_with_a_fractional_exp_lives_until_its_exp() {
    let hub = TestHub::start().await;
    let exp = synchub::auth::unix_now() + 3600;
    let fractional = |device: &str| {
        let claims = json!({"sub": "user-1", "role": "Employee", "tenant_id": TENANT, "device_id": device, "exp": exp as f64 + 0.5});
        synchub::auth::mint_hs256(SECRET, &claims)
    };
    let mut c = hub.client().await;
    c.hello(&fractional("pos-1"), None, None).await;
    let id = c.next_id();
    c.send(&ClientFrame::Auth { id, token: fractional("pos-1") }).await;
    let expires_at = c
        .expect(|f| match f {
            ServerFrame::AuthOk { id: got, expires_at } if *got == id => Some(*expires_at),
            ServerFrame::Error { id: Some(got), code, .. } if *got == id => panic!("auth refused: {code:?}"),
            _ => None,
        })
        .await;
    assert_eq!(expires_at, exp);
    assert_eq!(statuses(&c.push(vec![new_product(1)]).await), vec![(ChangeStatus::Applied, None)]);
    hub.shutdown().await;
}
